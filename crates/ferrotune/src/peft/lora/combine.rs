//! PEFT's `add_weighted_adapter`: a new LoRA adapter made from several attached ones.
//! - `linear`: A = Σ sign(wᵢsᵢ)·sqrt(|wᵢsᵢ|)·Aᵢ, B = Σ sqrt(|wᵢsᵢ|)·Bᵢ (same rank required).
//!   Cheap but only an approximation of Σ wᵢΔWᵢ (the cross terms BᵢAⱼ remain).
//! - `cat`: A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: exactly Σ wᵢΔWᵢ, rank Σ rᵢ.
//! - `svd`: the best rank-k approximation of Σ wᵢΔWᵢ (k: `svd_rank`, default the largest rank).
//!
//! sᵢ is adapter i's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA). The new config is the
//! first adapter's with `r = lora_alpha = ` the new rank, the union of the target modules and no
//! rank or alpha patterns, as PEFT writes it. The SVD works on the factors (QR of the stacked
//! Bᵢ and Aᵢᵀ, then an SVD of the small core), so it never forms an (out × in) matrix per
//! module and needs no LAPACK.
use super::config::{LoraConfig, ModuleSpec};
use super::layer::LoraAdapter;
use super::model::as_lora;
use crate::model::Model;
use crate::peft::modules_to_save::as_saved_module;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// How adapters are combined (PEFT's `combination_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combination {
    Linear,
    Cat,
    Svd,
}

impl std::str::FromStr for Combination {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Combination::Linear),
            "cat" => Ok(Combination::Cat),
            "svd" => Ok(Combination::Svd),
            other => Err(Error::msg(format!(
                "unknown combination `{other}` (linear, cat, svd)"
            ))),
        }
    }
}

/// One adapter to combine: its name on the model, its config and its weight.
pub struct WeightedAdapter<'a> {
    pub name: &'a str,
    pub config: &'a LoraConfig,
    pub weight: f64,
}

/// The rank PEFT allocates for an adapter: `r`, or the largest in `rank_pattern`.
fn max_rank(c: &LoraConfig) -> usize {
    c.rank_pattern.values().copied().fold(c.r, usize::max)
}

/// Combine `adapters` into a new adapter `new_name` attached to `model`; returns its config.
/// Errors (one line) for an unknown adapter, mismatched ranks with `linear`, mixed
/// `target_modules` kinds, `modules_to_save` copies, or a name already taken.
pub fn add_weighted_adapter(
    model: &mut dyn Model,
    adapters: &[WeightedAdapter],
    new_name: &str,
    how: Combination,
    svd_rank: Option<usize>,
) -> Result<LoraConfig> {
    let first = adapters
        .first()
        .ok_or_else(|| Error::msg("combine: name at least one adapter"))?;
    if crate::peft::adapter_names(model)
        .iter()
        .any(|n| n == new_name)
    {
        return Err(Error::msg(format!(
            "combine: an adapter named `{new_name}` is already attached"
        )));
    }
    for a in adapters {
        if !model
            .linears()
            .iter()
            .any(|l| l.adapters().any(|(n, _)| n == a.name))
        {
            return Err(crate::peft::no_such_adapter(model, a.name));
        }
        if !a.weight.is_finite() {
            return Err(Error::msg(format!(
                "combine: adapter `{}` has weight {}",
                a.name, a.weight
            )));
        }
        let copies = model.linears().iter().any(|l| {
            l.adapters()
                .any(|(n, ad)| n == a.name && as_saved_module(ad).is_some())
        });
        if copies {
            return Err(Error::msg(format!(
                "combine: adapter `{}` trains whole modules (modules_to_save, e.g. a classifier); only pure LoRA adapters can be combined",
                a.name
            )));
        }
        if a.config.use_dora {
            return Err(Error::msg(format!(
                "combine: adapter `{}` is a DoRA adapter (use_dora); its magnitude vectors cannot be combined (PEFT refuses too)",
                a.name
            )));
        }
    }
    // PEFT: a single adapter is always combined linearly.
    let how = if adapters.len() == 1 {
        Combination::Linear
    } else {
        how
    };
    let ranks: Vec<usize> = adapters.iter().map(|a| max_rank(a.config)).collect();
    let new_rank = match how {
        Combination::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) {
                return Err(Error::msg(format!(
                    "combine --how linear: every adapter must have the same r (got {ranks:?}); use cat or svd"
                )));
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
        Combination::Svd => svd_rank.unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1)),
    };
    if new_rank == 0 || new_rank > super::config::MAX_RANK {
        return Err(Error::msg(format!(
            "combine: rank {new_rank} is out of range"
        )));
    }
    let targets = match &first.config.target_modules {
        Some(ModuleSpec::List(_)) | None => {
            let mut all: Vec<String> = Vec::new();
            for a in adapters {
                match &a.config.target_modules {
                    Some(ModuleSpec::List(l)) => all.extend(l.iter().cloned()),
                    None => {}
                    Some(ModuleSpec::One(_)) => {
                        return Err(Error::msg(
                            "combine: the adapters' target_modules mix lists and regex strings (PEFT refuses this too)",
                        ))
                    }
                }
            }
            all.sort();
            all.dedup();
            ModuleSpec::List(all)
        }
        Some(ModuleSpec::One(_)) => {
            let mut parts = Vec::new();
            for a in adapters {
                match &a.config.target_modules {
                    Some(ModuleSpec::One(s)) => parts.push(format!("({s})")),
                    _ => {
                        return Err(Error::msg(
                            "combine: the adapters' target_modules mix lists and regex strings (PEFT refuses this too)",
                        ))
                    }
                }
            }
            ModuleSpec::One(parts.join("|"))
        }
    };
    let config = LoraConfig {
        r: new_rank,
        lora_alpha: new_rank as f64,
        target_modules: Some(targets),
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        ..first.config.clone()
    };
    let p = config.module_params("");
    let (alpha, scale) = (p.alpha, p.scale);
    let dev = model.device().clone();
    for lin in model.linears_mut() {
        // (weight, A, B, scaling) of each combined adapter on this module.
        let parts: Vec<(f64, Tensor, Tensor, f64)> = adapters
            .iter()
            .filter_map(|a| {
                lin.adapters()
                    .find(|(n, _)| *n == a.name)
                    .and_then(|(_, ad)| as_lora(ad))
                    .map(|l| {
                        (
                            a.weight,
                            l.a().as_tensor().detach(),
                            l.b().as_tensor().detach(),
                            l.scale(),
                        )
                    })
            })
            .collect();
        if parts.is_empty() {
            continue;
        }
        let (in_f, out_f) = (lin.in_features(), lin.out_features());
        if how == Combination::Svd && new_rank > in_f.min(out_f) {
            return Err(Error::msg(format!(
                "combine: svd rank {new_rank} is more than `{}` can hold ({out_f} x {in_f}: at most {})",
                lin.name(),
                in_f.min(out_f)
            )));
        }
        let (a, b) = match how {
            Combination::Linear => combine_linear(&parts)?,
            Combination::Cat => combine_cat(&parts)?,
            Combination::Svd => combine_svd(&parts, new_rank, &dev)?,
        };
        // Zero-padded to the new rank, as PEFT fills the leading rows / columns of a fresh
        // zero adapter.
        for t in [&a, &b] {
            let sum = t
                .to_dtype(candle_core::DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            if !sum.is_finite() {
                return Err(Error::msg(format!(
                    "combine: the combined adapter on `{}` is not finite (a weight too large, or an input adapter holding NaN / inf)",
                    lin.name()
                )));
            }
        }
        let a = pad_rows(&a, new_rank, in_f)?;
        let b = pad_rows(&b.t()?, new_rank, out_f)?.t()?;
        let adapter = LoraAdapter::from_weights(a, b, alpha, scale, 0.0, 0)?;
        lin.add_adapter(new_name, Box::new(adapter));
    }
    Ok(config)
}

fn pad_rows(t: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    let have = t.dim(0)?;
    Ok(if have < rows {
        Tensor::cat(
            &[
                t.clone(),
                Tensor::zeros((rows - have, cols), t.dtype(), t.device())?,
            ],
            0,
        )?
    } else {
        t.narrow(0, 0, rows)?
    })
}

fn combine_linear(parts: &[(f64, Tensor, Tensor, f64)]) -> Result<(Tensor, Tensor)> {
    let mut a: Option<Tensor> = None;
    let mut b: Option<Tensor> = None;
    for (w, pa, pb, s) in parts {
        let ws = w * s;
        let (wa, wb) = (ws.abs().sqrt() * ws.signum(), ws.abs().sqrt());
        let (ta, tb) = ((pa * wa)?, (pb * wb)?);
        a = Some(match a {
            None => ta,
            Some(x) => (x + ta)?,
        });
        b = Some(match b {
            None => tb,
            Some(x) => (x + tb)?,
        });
    }
    match (a, b) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(Error::msg("combine: no adapter to combine")),
    }
}

fn combine_cat(parts: &[(f64, Tensor, Tensor, f64)]) -> Result<(Tensor, Tensor)> {
    let a: Vec<Tensor> = parts
        .iter()
        .map(|(w, pa, _, s)| pa * (w * s))
        .collect::<candle_core::Result<_>>()?;
    let b: Vec<Tensor> = parts.iter().map(|(_, _, pb, _)| pb.clone()).collect();
    Ok((Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?))
}

/// The rank-`k` truncated SVD of Σ wᵢsᵢBᵢAᵢ as (A = Vhₖ, B = Uₖ·Sₖ), PEFT's factors.
fn combine_svd(
    parts: &[(f64, Tensor, Tensor, f64)],
    k: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    // ΔW = Bc · Ac with Bc = [B₁ … ] (out × R), Ac = [w₁s₁A₁; …] (R × in).
    let (ac, bc) = combine_cat(parts)?;
    let ac = ac.to_dtype(DType::F64)?;
    let bc = bc.to_dtype(DType::F64)?;
    let (rr, in_f) = ac.dims2()?;
    let out_f = bc.dim(0)?;
    let bv: Vec<Vec<f64>> = bc.to_vec2()?;
    let at: Vec<Vec<f64>> = ac.t()?.to_vec2()?;
    // Bc = Qb Rb, Acᵀ = Qa Ra  ⇒  ΔW = Qb (Rb Raᵀ) Qaᵀ.
    let (qb, rb) = qr(&bv, out_f, rr);
    let (qa, ra) = qr(&at, in_f, rr);
    let mut core = vec![vec![0f64; rr]; rr];
    for (i, row) in core.iter_mut().enumerate() {
        for (j, c) in row.iter_mut().enumerate() {
            *c = (0..rr).map(|t| rb[i][t] * ra[j][t]).sum();
        }
    }
    let (u, s, v) = jacobi_svd(&core);
    // Singular values in decreasing order.
    let mut order: Vec<usize> = (0..rr).collect();
    order.sort_by(|&x, &y| s[y].partial_cmp(&s[x]).unwrap_or(std::cmp::Ordering::Equal));
    let keep = k.min(rr);
    let mut b_out = vec![0f64; out_f * k];
    let mut a_out = vec![0f64; k * in_f];
    for (c, &j) in order.iter().take(keep).enumerate() {
        for row in 0..out_f {
            let uj: f64 = (0..rr).map(|t| qb[row][t] * u[t][j]).sum();
            b_out[row * k + c] = uj * s[j];
        }
        for col in 0..in_f {
            a_out[c * in_f + col] = (0..rr).map(|t| qa[col][t] * v[t][j]).sum();
        }
    }
    Ok((
        Tensor::from_vec(a_out, (k, in_f), dev)?.to_dtype(DType::F32)?,
        Tensor::from_vec(b_out, (out_f, k), dev)?.to_dtype(DType::F32)?,
    ))
}

/// Thin QR of an (n × r) matrix by Gram-Schmidt with re-orthogonalisation (twice is enough in
/// f64): Q (n × r, orthonormal columns; a dependent column becomes zero) and R (r × r).
fn qr(m: &[Vec<f64>], n: usize, r: usize) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut q = vec![vec![0f64; r]; n];
    let mut rm = vec![vec![0f64; r]; r];
    for j in 0..r {
        let mut v: Vec<f64> = (0..n).map(|i| m[i][j]).collect();
        let norm0 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for _pass in 0..2 {
            for p in 0..j {
                let d: f64 = (0..n).map(|i| q[i][p] * v[i]).sum();
                rm[p][j] += d;
                for (i, vi) in v.iter_mut().enumerate() {
                    *vi -= d * q[i][p];
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 * norm0.max(f64::MIN_POSITIVE) && norm > 0.0 {
            rm[j][j] = norm;
            for i in 0..n {
                q[i][j] = v[i] / norm;
            }
        }
    }
    (q, rm)
}

/// SVD of a small square matrix by one-sided Jacobi rotations: (U, S, V) with M = U diag(S) Vᵀ.
fn jacobi_svd(m: &[Vec<f64>]) -> (Vec<Vec<f64>>, Vec<f64>, Vec<Vec<f64>>) {
    let n = m.len();
    let mut a: Vec<Vec<f64>> = m.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for row in &a {
                    alpha += row[p] * row[p];
                    beta += row[q] * row[q];
                    gamma += row[p] * row[q];
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for row in a.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
                for row in v.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let s: Vec<f64> = (0..n)
        .map(|j| a.iter().map(|row| row[j] * row[j]).sum::<f64>().sqrt())
        .collect();
    let u: Vec<Vec<f64>> = a
        .iter()
        .map(|row| {
            (0..n)
                .map(|j| if s[j] > 0.0 { row[j] / s[j] } else { 0.0 })
                .collect()
        })
        .collect();
    (u, s, v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::rand_tensor;

    fn dense(parts: &[(f64, Tensor, Tensor, f64)]) -> Tensor {
        let mut acc: Option<Tensor> = None;
        for (w, a, b, s) in parts {
            let d = (b.matmul(a).unwrap() * (w * s)).unwrap();
            acc = Some(match acc {
                None => d,
                Some(x) => (x + d).unwrap(),
            });
        }
        acc.unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cat_is_exact_and_svd_of_full_rank_is_exact() {
        let parts = vec![
            (
                0.7,
                rand_tensor(&[3, 10], DType::F32, 1).unwrap(),
                rand_tensor(&[8, 3], DType::F32, 2).unwrap(),
                2.0,
            ),
            (
                -0.4,
                rand_tensor(&[2, 10], DType::F32, 3).unwrap(),
                rand_tensor(&[8, 2], DType::F32, 4).unwrap(),
                0.5,
            ),
        ];
        let want = dense(&parts);
        let (a, b) = combine_cat(&parts).unwrap();
        assert!(max_abs(&(b.matmul(&a).unwrap() - &want).unwrap()) < 1e-5);
        let (a, b) = combine_svd(&parts, 5, &Device::Cpu).unwrap();
        assert!(max_abs(&(b.matmul(&a).unwrap() - &want).unwrap()) < 1e-5);
        // Rank 1: the leading singular triple; the rest of ΔW is what is lost, and no rank-1
        // matrix loses less (Eckart–Young): compare with the power-iteration estimate.
        let (a1, b1) = combine_svd(&parts, 1, &Device::Cpu).unwrap();
        let err = (b1.matmul(&a1).unwrap() - &want).unwrap();
        let fro = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // ‖ΔW‖² = Σσ², ‖ΔW − σ₁u₁v₁ᵀ‖² = ‖ΔW‖² − σ₁², and σ₁² ≥ ‖ΔW‖²/rank.
        let (total, rest) = (fro(&want), fro(&err));
        assert!(rest < total * (1.0 - 1.0 / 5.0) + 1e-4, "{rest} vs {total}");
        // The rows of A are orthonormal (Vh).
        let g = a.matmul(&a.t().unwrap()).unwrap();
        let eye = Tensor::eye(5, DType::F32, &Device::Cpu).unwrap();
        assert!(max_abs(&(g - eye).unwrap()) < 1e-4);
    }
}
