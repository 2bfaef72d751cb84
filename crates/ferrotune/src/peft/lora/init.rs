//! The LoRA initialisations that move part of the base weight into the adapter, as PEFT's
//! `LoraLayer.pissa_init` / `olora_init` compute them (W: (out, in), s: the module's scaling):
//! - PiSSA (Meng et al. 2024): the top-r singular triplets `W ≈ U_r S_r V_rᵀ`;
//!   `A = diag(sqrt(S_r / s)) V_rᵀ`, `B = U_r diag(sqrt(S_r / s))`, so `s·BA = U_r S_r V_rᵀ`.
//!   `"pissa_niter_K"` takes the triplets from `torch.svd_lowrank(W, r, niter=K)`'s randomized
//!   algorithm instead (a seeded Gaussian sketch here, torch's global generator in PEFT).
//! - OLoRA (Büyükakyüz 2024): `W = QR`; `A = R[:r]`, `B = Q[:, :r]` (no division by s).
//! - LoftQ (Li et al. 2023, PEFT's `loftq_init`): the base becomes a quantized weight and the
//!   adapter the best rank-r fix of its error ([`loftq`]).
//!
//! PiSSA and OLoRA replace the base weight by the residual `W − s·BA`, so the adapted layer starts exactly
//! where the base was. PEFT decomposes in f32 with LAPACK; we do it in f64 (`crate::linalg`),
//! which agrees to f32 rounding on the product BA and the residual (the factors of an SVD are
//! only defined up to the signs of singular-vector pairs; the QR factors are LAPACK's).
use crate::linalg::{qr_leading, svd_lowrank, svd_top, Mat};
use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A, B and the residual base weight of a mutating init, f32 on the CPU.
pub struct MutatedInit {
    /// (r, in)
    pub a: Tensor,
    /// (out, r)
    pub b: Tensor,
    /// (out, in): `W − scale·B A`.
    pub residual: Tensor,
}

fn finish(w: &Mat, a: Mat, b: Mat, scale: f64) -> Result<MutatedInit> {
    let ba = b.matmul(&a)?;
    let residual = Mat {
        data: w
            .data
            .iter()
            .zip(&ba.data)
            .map(|(x, y)| x - scale * y)
            .collect(),
        ..w.clone()
    };
    let dev = Device::Cpu;
    Ok(MutatedInit {
        a: a.to_tensor(&dev)?.to_dtype(DType::F32)?,
        b: b.to_tensor(&dev)?.to_dtype(DType::F32)?,
        residual: residual.to_tensor(&dev)?.to_dtype(DType::F32)?,
    })
}

/// PiSSA on `w` (out, in), rank `r`, scaling `scale` (> 0); `niter`: `Some(K)` for
/// `"pissa_niter_K"`, whose Gaussian sketch is drawn from `seed`.
pub fn pissa(
    w: &Tensor,
    r: usize,
    scale: f64,
    niter: Option<usize>,
    seed: u64,
) -> Result<MutatedInit> {
    let wm = Mat::from_tensor(w)?;
    let (u, s, v) = match niter {
        None => svd_top(&wm, r),
        Some(k) => svd_lowrank(&wm, r, k, &mut gaussian_sketch(seed)),
    }
    .map_err(candle_core::Error::Msg)?;
    let (a, b) = balanced_factors(u, &s, &v, scale);
    finish(&wm, a, b, scale)
}

/// `A = diag(√(S/s)) Vᵀ` (r × in) and `B = U diag(√(S/s))` (out × r) from the rank-r triplets
/// U (out × r), S, V (in × r): `s·BA = U S Vᵀ`, the two factors of equal size.
fn balanced_factors(u: Mat, s: &[f64], v: &Mat, scale: f64) -> (Mat, Mat) {
    let r = s.len();
    let root: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    let mut a = v.transpose();
    for (i, f) in root.iter().enumerate() {
        for x in &mut a.data[i * a.cols..(i + 1) * a.cols] {
            *x *= f;
        }
    }
    let mut b = u;
    for row in b.data.chunks_mut(r) {
        for (x, f) in row.iter_mut().zip(&root) {
            *x *= f;
        }
    }
    (a, b)
}

/// Columns sketched beyond the rank, and subspace iterations, of LoftQ's truncated SVD.
const LOFTQ_OVERSAMPLE: usize = 16;
const LOFTQ_NITER: usize = 4;

/// LoftQ (Li et al. 2023) on `w` (out, in), rank `r`, scaling `scale`, as PEFT's `loftq_init`
/// alternates it: quantize the target (W at first), take the best rank-r approximation
/// `L R` of the error `W − deq(Q)`, and quantize `W − L R` next; after `iter` rounds the base
/// is the last `Q` and the adapter starts at `s·B₀A₀ = L R`. `quantize` returns a weight and
/// its dequantized f32 values. Returns (Q, A₀, B₀), A₀ and B₀ f32 on the CPU.
///
/// Two differences from PEFT, both deliberate: the factors are divided by `√s`, so the adapter
/// adds the error fix itself whatever `lora_alpha` is (PEFT's `L, R` are right only when
/// `lora_alpha = r`; at alpha = 2r its adapter starts at twice the fix); and the rank-r
/// approximation is a randomized SVD (`r + 16` columns, 4 subspace iterations, seeded), where
/// PEFT runs a full one: the error of a quantization is close to noise, whose singular values
/// decay slowly, and the full SVD of every weight would take minutes on a CPU.
pub fn loftq<Q>(
    w: &Tensor,
    r: usize,
    scale: f64,
    iter: usize,
    seed: u64,
    quantize: &mut dyn FnMut(&Tensor) -> crate::Result<(Q, Tensor)>,
) -> crate::Result<(Q, Tensor, Tensor)> {
    let wm = Mat::from_tensor(w)?;
    let k = wm.rows.min(wm.cols);
    if r == 0 || r > k {
        return Err(crate::Error::msg(format!(
            "LoftQ: rank {r} is not within 1..={k} for a {}x{} weight",
            wm.rows, wm.cols
        )));
    }
    let mut gauss = gaussian_sketch(seed);
    let dev = Device::Cpu;
    let mut target = w.to_device(&dev)?.to_dtype(DType::F32)?;
    let mut round = 1;
    loop {
        let (q, deq) = quantize(&target)?;
        let dm = Mat::from_tensor(&deq)?;
        if (dm.rows, dm.cols) != (wm.rows, wm.cols) {
            return Err(crate::Error::msg(format!(
                "LoftQ: the quantized weight is {}x{}, the weight {}x{}",
                dm.rows, dm.cols, wm.rows, wm.cols
            )));
        }
        let err = Mat {
            data: wm.data.iter().zip(&dm.data).map(|(x, y)| x - y).collect(),
            ..wm.clone()
        };
        let sketch = (r + LOFTQ_OVERSAMPLE).min(k);
        let (u, s, v) =
            svd_lowrank(&err, sketch, LOFTQ_NITER, &mut gauss).map_err(crate::Error::msg)?;
        let (a, b) = balanced_factors(u.first_cols(r), &s[..r], &v.first_cols(r), scale);
        if round >= iter {
            let a0 = a.to_tensor(&dev)?.to_dtype(DType::F32)?;
            let b0 = b.to_tensor(&dev)?.to_dtype(DType::F32)?;
            return Ok((q, a0, b0));
        }
        target = finish(&wm, a, b, scale)?.residual;
        round += 1;
    }
}

/// OLoRA on `w` (out, in), rank `r`, scaling `scale`.
pub fn olora(w: &Tensor, r: usize, scale: f64) -> Result<MutatedInit> {
    let wm = Mat::from_tensor(w)?;
    let (q, rr) = qr_leading(&wm, r);
    finish(&wm, rr, q, scale)
}

/// Standard-normal (rows × cols) sketches for the randomized SVD, drawn from `seed`.
fn gaussian_sketch(seed: u64) -> impl FnMut(usize, usize) -> Mat {
    let mut rng = StdRng::seed_from_u64(seed);
    move |rows, cols| Mat {
        rows,
        cols,
        data: (0..rows * cols)
            .map(|_| standard_normal(&mut rng))
            .collect(),
    }
}

/// Box–Muller (rand 0.9 has no normal distribution without rand_distr).
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_w(out: usize, inp: usize, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// The residual plus s·BA is W again; PiSSA's BA is the best rank-r approximation (its
    /// residual has the smallest Frobenius norm among the inits), its factors balanced
    /// (AAᵀ = BᵀB = diag(S/s)); OLoRA's B has orthonormal columns.
    #[test]
    fn inits_split_the_weight_exactly() {
        for (out, inp) in [(10, 7), (6, 9)] {
            let w = rand_w(out, inp, 1);
            let (r, scale) = (3, 2.5);
            let p = pissa(&w, r, scale, None, 0).unwrap();
            let o = olora(&w, r, scale).unwrap();
            for (name, m) in [("pissa", &p), ("olora", &o)] {
                assert_eq!(m.a.dims(), [r, inp]);
                assert_eq!(m.b.dims(), [out, r]);
                let back = (&m.residual + (m.b.matmul(&m.a).unwrap() * scale).unwrap()).unwrap();
                assert!(max_abs(&(back - &w).unwrap()) < 1e-5, "{name}");
            }
            let fro =
                |t: &Tensor| -> f32 { t.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap() };
            assert!(fro(&p.residual) < fro(&o.residual));
            let aat = p.a.matmul(&p.a.t().unwrap()).unwrap();
            let btb = p.b.t().unwrap().matmul(&p.b).unwrap();
            assert!(max_abs(&(aat - btb).unwrap()) < 1e-4);
            let qtq = o.b.t().unwrap().matmul(&o.b).unwrap();
            let eye = Tensor::eye(r, DType::F32, &Device::Cpu).unwrap();
            assert!(max_abs(&(qtq - eye).unwrap()) < 1e-5);
            // The randomized SVD converges to the full one with subspace iterations.
            let fast = pissa(&w, r, scale, Some(60), 7).unwrap();
            let d = max_abs(&(fast.residual - &p.residual).unwrap());
            assert!(d < 1e-3, "pissa_niter_60 vs pissa: {d}");
        }
    }

    /// LoftQ: the quantized base plus s·B₀A₀ is closer to W than the quantized W alone, and
    /// closer with more rounds (which move the base); the rank is checked.
    #[test]
    fn loftq_fixes_part_of_the_quantization_error() {
        use crate::quant::{bnb::FourBitKind, BaseQuant};
        let bq = BaseQuant::FourBit {
            kind: FourBitKind::Nf4,
            double_quant: true,
        };
        let calls = std::cell::Cell::new(0);
        let mut quantize = |t: &Tensor| -> crate::Result<(Tensor, Tensor)> {
            calls.set(calls.get() + 1);
            let d = bq.quantize(t)?.unwrap().dequantize()?;
            Ok((d.clone(), d))
        };
        let w = rand_w(96, 128, 4);
        let fro = |t: &Tensor| -> f64 {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let plain = fro(&(quantize(&w).unwrap().0 - &w).unwrap());
        let (r, scale) = (8, 2.0);
        let mut last = plain;
        for iter in [1, 3] {
            calls.set(0);
            let (q, a, b) = loftq(&w, r, scale, iter, 5, &mut quantize).unwrap();
            assert_eq!(calls.get(), iter, "one quantization per round");
            assert_eq!(
                (a.dims(), b.dims()),
                ([r, 128].as_slice(), [96, r].as_slice())
            );
            let fixed = (&q + (b.matmul(&a).unwrap() * scale).unwrap()).unwrap();
            let err = fro(&(fixed - &w).unwrap());
            assert!(
                err < 0.95 * last,
                "{iter} rounds: error {err}, before {last}"
            );
            // one round keeps the plain quantized base; more move it to W − s·B₀A₀'s
            let moved = max_abs(&(&q - quantize(&w).unwrap().0).unwrap());
            assert_eq!(
                moved == 0.0,
                iter == 1,
                "{iter} rounds: base moved by {moved}"
            );
            last = err;
        }
        assert!(loftq(&w, 0, scale, 1, 5, &mut quantize).is_err());
        assert!(loftq(&w, 97, scale, 1, 5, &mut quantize).is_err());
    }
}
