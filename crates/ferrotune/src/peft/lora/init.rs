//! The LoRA initialisations that move part of the base weight into the adapter, as PEFT's
//! `LoraLayer.pissa_init` / `olora_init` compute them (W: (out, in), s: the module's scaling):
//! - PiSSA (Meng et al. 2024): the top-r singular triplets `W ≈ U_r S_r V_rᵀ`;
//!   `A = diag(sqrt(S_r / s)) V_rᵀ`, `B = U_r diag(sqrt(S_r / s))`, so `s·BA = U_r S_r V_rᵀ`.
//!   `"pissa_niter_K"` takes the triplets from `torch.svd_lowrank(W, r, niter=K)`'s randomized
//!   algorithm instead (a seeded Gaussian sketch here, torch's global generator in PEFT).
//! - OLoRA (Büyükakyüz 2024): `W = QR`; `A = R[:r]`, `B = Q[:, :r]` (no division by s).
//!
//! Both replace the base weight by the residual `W − s·BA`, so the adapted layer starts exactly
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
        Some(k) => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut gauss = |rows: usize, cols: usize| Mat {
                rows,
                cols,
                data: (0..rows * cols)
                    .map(|_| standard_normal(&mut rng))
                    .collect(),
            };
            svd_lowrank(&wm, r, k, &mut gauss)
        }
    }
    .map_err(candle_core::Error::Msg)?;
    let root: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    // A = diag(√(S/s)) Vᵀ (r × in), B = U diag(√(S/s)) (out × r).
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
    finish(&wm, a, b, scale)
}

/// OLoRA on `w` (out, in), rank `r`, scaling `scale`.
pub fn olora(w: &Tensor, r: usize, scale: f64) -> Result<MutatedInit> {
    let wm = Mat::from_tensor(w)?;
    let (q, rr) = qr_leading(&wm, r);
    finish(&wm, rr, q, scale)
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
}
