//! Tests for quantized weights. Every expected value comes from an unfused reference: the weight
//! dequantised by candle (`QTensor::dequantize`) and an f64 matmul, or from finite differences.
//!
//! Error bound used for the forward kernels: activation `x_j` of block `b` is replaced by
//! `d_b * round(x_j / d_b)` with `d_b = max_{j in b} |x_j| / QMAX` (`QMAX` = 32767 for 16-bit
//! activations, 127 for 8-bit), so it moves by at most `d_b / 2`. Hence for output `i`:
//!   `|y_i - sum_j W_ij x_j| <= sum_b (d_b / 2) * sum_{j in b} |W_ij|`  (plus f32 rounding).
//! (The Q4 offset terms use the same rounded activations, so the bound covers them.) Tests check
//! this bound per element and, as a summary, the relative L2 error of the whole output: at most
//! 3e-2 for 8 bits (measured up to 2e-2) and `REL_L2_I16` for 16 bits.
use super::format::{ActInt, Fmt, QK};
use super::kernels::{self, Isa};
use super::*;
use candle_core::Var;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const OWN: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
const PRECS: [ActPrecision; 2] = [ActPrecision::I16, ActPrecision::I8];

/// Relative L2 error bound of 16-bit activations against the f32 matmul of the dequantised
/// weight. Measured up to 7e-5 on these tests' small shapes, about 3e-5 on large ones (8 bits:
/// about 8e-3, 250x more).
const REL_L2_I16: f64 = 1e-4;

fn qmax(p: ActPrecision) -> f64 {
    match p {
        ActPrecision::I16 => i16::QMAX as f64,
        ActPrecision::I8 | ActPrecision::LlamaCpp => i8::QMAX as f64,
    }
}

fn rel_l2_bound(p: ActPrecision) -> f64 {
    match p {
        ActPrecision::I16 => REL_L2_I16,
        ActPrecision::I8 | ActPrecision::LlamaCpp => 3e-2,
    }
}

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    // Box-Muller; plus an occasional 8x outlier, as in real activations and weights
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            let big = if rng.random::<f32>() < 0.01 { 8.0 } else { 1.0 };
            z * scale * big
        })
        .collect()
}

fn weight(rng: &mut StdRng, n: usize, k: usize, dtype: GgmlDType) -> (QuantWeight, Vec<f32>) {
    let w = Tensor::from_vec(randn(rng, n * k, 0.05), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    // the reference: candle's own dequantisation of the same blocks
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (QuantWeight::from_qtensor(q).unwrap(), deq)
}

/// `x (m x k) @ w^T (k x n)` in f64.
fn ref_matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            y[r * n + c] = (0..k)
                .map(|j| x[r * k + j] as f64 * w[c * k + j] as f64)
                .sum();
        }
    }
    y
}

/// Per-element bound on the activation-quantisation error (see the module comment), plus a small
/// allowance for f32 accumulation.
fn act_error_bound(
    prec: ActPrecision,
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut bound = vec![0f64; m * n];
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wc = &w[c * k..(c + 1) * k];
            let mut b = 0f64;
            let mut mag = 0f64;
            for (xb, wb) in xr.chunks(QK).zip(wc.chunks(QK)) {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                let wl1: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                b += amax / qmax(prec) / 2.0 * wl1;
                mag += xb
                    .iter()
                    .zip(wb)
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum::<f64>();
            }
            bound[r * n + c] = b * 1.001 + 1e-5 * mag + 1e-6;
        }
    }
    bound
}

/// Checks the per-element bound and the relative L2 bound; returns the relative L2 error.
#[allow(clippy::too_many_arguments)]
fn check_against_reference(
    what: &str,
    prec: ActPrecision,
    y: &[f32],
    x: &[f32],
    deq: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> f64 {
    let yr = ref_matmul(x, deq, m, k, n);
    let bound = act_error_bound(prec, x, deq, m, k, n);
    for i in 0..m * n {
        let e = (y[i] as f64 - yr[i]).abs();
        assert!(
            e <= bound[i],
            "{what}: element {i}: got {} want {} (err {e:.3e} > bound {:.3e})",
            y[i],
            yr[i],
            bound[i]
        );
    }
    let rel = rel_l2(y, &yr);
    assert!(
        rel <= rel_l2_bound(prec),
        "{what} {prec:?}: relative L2 error {rel:.3e}"
    );
    rel
}

fn rel_l2(y: &[f32], yr: &[f64]) -> f64 {
    let num: f64 = y.iter().zip(yr).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = yr.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn isas() -> Vec<Isa> {
    let v: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    println!("kernel levels tested on this CPU: {v:?}");
    v
}

#[test]
fn own_kernels_match_dequantised_reference() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut worst = [0f64; 2];
    // odd row counts exercise the 4-row groups and the tiles' tails
    for &(n, k) in &[(67usize, 96usize), (16, 32), (130, 576)] {
        for dtype in OWN {
            let (w, deq) = weight(&mut rng, n, k, dtype);
            for isa in isas() {
                for threads in [1, 2] {
                    for m in [1usize, 2, 5, 9] {
                        let x = randn(&mut rng, m * k, 1.0);
                        for (pi, prec) in PRECS.into_iter().enumerate() {
                            let mut y = vec![0f32; m * n];
                            if m == 1 {
                                w.matvec_with(isa, prec, threads, &x, &mut y);
                            } else {
                                w.matmul_with(isa, prec, threads, &x, m, &mut y);
                            }
                            let what = format!("{dtype:?} {n}x{k} m={m} {isa:?} threads={threads}");
                            let rel = check_against_reference(&what, prec, &y, &x, &deq, m, k, n);
                            worst[pi] = worst[pi].max(rel);
                        }
                    }
                }
            }
        }
    }
    println!(
        "worst relative L2 error: I16 {:.2e}, I8 {:.2e}",
        worst[0], worst[1]
    );
}

/// The point of 16-bit activations: on the same inputs their error is about 258x smaller than
/// with 8 bits (the quantisation step is 32767 / 127 times finer). Summed over many outputs so a
/// lucky 8-bit rounding cannot make the ratio small.
#[test]
fn i16_activations_are_over_100x_closer_than_i8() {
    let mut rng = StdRng::seed_from_u64(13);
    let (n, k, m) = (256, 576, 4);
    for dtype in OWN {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let x = randn(&mut rng, m * k, 1.0);
        let yr = ref_matmul(&x, &deq, m, k, n);
        let mut rel = [0f64; 2];
        for (pi, prec) in PRECS.into_iter().enumerate() {
            let mut y = vec![0f32; m * n];
            w.matmul_with(Isa::best(), prec, 1, &x, m, &mut y);
            let mut y1 = vec![0f32; n];
            w.matvec_with(Isa::best(), prec, 1, &x[..k], &mut y1);
            // decode and batched paths see the same quantised activations
            let r0 = &y[..n];
            let scale = r0.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in y1.iter().zip(r0) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{dtype:?} {prec:?}: {a} vs {b}"
                );
            }
            rel[pi] = rel_l2(&y, &yr);
        }
        println!(
            "{dtype:?} {n}x{k}: relative L2 error I16 {:.2e}, I8 {:.2e} ({:.0}x)",
            rel[0],
            rel[1],
            rel[1] / rel[0]
        );
        assert!(
            rel[0] * 100.0 < rel[1],
            "{dtype:?}: I16 error {:.3e} is not 100x below I8's {:.3e}",
            rel[0],
            rel[1]
        );
    }
}

#[test]
fn public_forward_matches_reference_and_shapes() {
    let prec = QuantSettings::default().activation;
    let mut rng = StdRng::seed_from_u64(2);
    let (n, k) = (48, 64);
    for dtype in OWN {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let x = randn(&mut rng, 2 * 3 * k, 1.0);
        let xt = Tensor::from_vec(x.clone(), (2, 3, k), &Device::Cpu).unwrap();
        let y = w.forward(&xt).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        check_against_reference(&format!("{dtype:?} forward"), prec, &yv, &x, &deq, 6, k, n);
        // single row through the Tensor API and the raw decode path give the same numbers
        let x1 = Tensor::from_vec(x[..k].to_vec(), k, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let y1 = w
            .forward(&x1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut y2 = vec![0f32; n];
        w.matvec_into(&x[..k], &mut y2);
        assert_eq!(y1, y2);
        // bf16 input comes back as bf16
        let yb = w.forward(&xt.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        assert!(w
            .forward(&Tensor::zeros((2, k + 32), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}

#[test]
fn quantised_activations_identical_on_every_isa() {
    fn check<T: ActInt>(x: &[f32], k: usize) {
        let base = kernels::quantize_act::<T>(Isa::Scalar, x, 3, k);
        for isa in isas() {
            let a = kernels::quantize_act::<T>(isa, x, 3, k);
            assert_eq!(a.qs, base.qs, "{:?} {isa:?} quantised values", T::PREC);
            assert_eq!(a.ds, base.ds, "{:?} {isa:?} block scales and sums", T::PREC);
        }
        // symmetric range: the largest value of each block maps to +-QMAX, never beyond
        assert!(base.qs.iter().all(|&v| v.widen().abs() as f32 <= T::QMAX));
        assert!(base.qs.iter().any(|&v| v.widen().abs() as f32 == T::QMAX));
        // the block sums are exact
        for (qb, &[d, s]) in base.qs.chunks(QK).zip(&base.ds) {
            assert_eq!(s, d * qb.iter().map(|v| v.widen()).sum::<i32>() as f32);
        }
        // a block of values so small that 1 / d would overflow is all zero, with d = 0
        assert_eq!(base.ds[5], [0.0, 0.0]);
        assert!(base.qs[5 * QK..6 * QK].iter().all(|&v| v == T::default()));
    }
    let mut rng = StdRng::seed_from_u64(3);
    let k = 320;
    let mut x = randn(&mut rng, 3 * k, 1.0);
    x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block: d = 0
    x[70] = 1e-30; // tiny values next to normal ones
    x[5 * QK..6 * QK].iter_mut().for_each(|v| *v = 1e-38);
    x[5 * QK + 3] = -2e-38;
    check::<i8>(&x, k);
    check::<i16>(&x, k);
}

#[test]
fn isa_paths_agree() {
    // same quantised activations into every kernel level: only f32 summation order may differ
    // 37 weight rows: whole and partial panels; 2, 6 and 7 activation rows: every row tile
    // (1 to 4) of the batched kernels' shapes
    let mut rng = StdRng::seed_from_u64(4);
    let (n, k) = (37, 352);
    for dtype in OWN {
        let fmt = Fmt::from_ggml(dtype).unwrap();
        let (w, _) = weight(&mut rng, n, k, dtype);
        let Repr::Own { data, .. } = &w.repr else {
            unreachable!()
        };
        for m in [2, 6, 7] {
            let x = randn(&mut rng, m * k, 1.0);
            check_isa_paths::<i8>(fmt, data, &x, m, k, n);
            check_isa_paths::<i16>(fmt, data, &x, m, k, n);
        }
    }
}

fn check_isa_paths<T: ActInt>(fmt: Fmt, data: &[u8], x: &[f32], m: usize, k: usize, n: usize) {
    let act = kernels::quantize_act::<T>(Isa::Scalar, x, m, k);
    let run = |isa: Isa| {
        let mut gv = vec![0f32; m * n];
        for r in 0..m {
            kernels::gemv(isa, fmt, data, &act, r, &mut gv[r * n..(r + 1) * n]);
        }
        let mut gm = vec![0f32; m * n];
        // SAFETY: gm is m x n.
        unsafe { kernels::gemm(isa, fmt, data, n, &act, gm.as_mut_ptr(), n) };
        (gv, gm)
    };
    let (sv, _) = run(Isa::Scalar);
    let scale = sv.iter().fold(0f32, |a, v| a.max(v.abs()));
    let prec = T::PREC;
    for isa in isas() {
        let (gv, gm) = run(isa);
        for i in 0..m * n {
            assert!(
                (gv[i] - sv[i]).abs() <= 1e-5 * scale,
                "{fmt:?} {prec:?} {isa:?} gemv[{i}] {} vs scalar {}",
                gv[i],
                sv[i]
            );
            assert!(
                (gm[i] - sv[i]).abs() <= 1e-5 * scale,
                "{fmt:?} {prec:?} {isa:?} gemm[{i}] {} vs scalar {}",
                gm[i],
                sv[i]
            );
        }
    }
}

#[test]
fn dequantisation_identical_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(12);
    for dtype in OWN {
        let (w, deq) = weight(&mut rng, 9, 160, dtype);
        let Repr::Own { fmt, data } = &w.repr else {
            unreachable!()
        };
        for isa in isas() {
            let mut out = vec![0f32; 9 * 160];
            kernels::dequant(isa, *fmt, data, &mut out);
            assert_eq!(out, deq, "{dtype:?} {isa:?}");
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, k) = (1000, 256);
    for dtype in OWN {
        let (w, _) = weight(&mut rng, n, k, dtype);
        let x = randn(&mut rng, 6 * k, 1.0);
        for prec in PRECS {
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            w.matvec_with(Isa::best(), prec, 1, &x[..k], &mut a);
            w.matvec_with(Isa::best(), prec, 2, &x[..k], &mut b);
            assert_eq!(a, b, "{dtype:?} {prec:?} matvec");
            let mut a = vec![0f32; 6 * n];
            let mut b = vec![0f32; 6 * n];
            w.matmul_with(Isa::best(), prec, 1, &x, 6, &mut a);
            w.matmul_with(Isa::best(), prec, 2, &x, 6, &mut b);
            assert_eq!(a, b, "{dtype:?} {prec:?} matmul");
        }
    }
}

/// Every GGML type candle can quantise to: forward (ours or candle's), backward, embedding,
/// permutation and dequantisation all agree with candle's dequantised weight.
#[test]
fn every_ggml_type_works() {
    use GgmlDType::*;
    let mut rng = StdRng::seed_from_u64(6);
    let (n, k, m) = (40, 512, 3);
    for dtype in [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K,
    ] {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        assert_eq!(w.shape(), (n, k));
        assert_eq!(w.ggml_dtype(), Some(dtype));
        assert_eq!(
            w.storage_bytes(),
            n * k / dtype.block_size() * dtype.type_size()
        );
        let got = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, deq, "{dtype:?} dequantize");

        // forward: candle quantises activations to Q8_K / Q8_1 for its own kernels, with errors of
        // the same kind as ours; the f32/f16/bf16 types multiply exactly
        let x = randn(&mut rng, m * k, 1.0);
        let y = w
            .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let rel = rel_l2(&y, &ref_matmul(&x, &deq, m, k, n));
        println!("{dtype:?}: forward relative L2 error {rel:.2e}");
        assert!(
            rel <= 3e-2,
            "{dtype:?} forward: relative L2 error {rel:.3e}"
        );

        // backward to the input: exact up to f32 rounding
        let gy = randn(&mut rng, m * n, 1.0);
        let gx = w
            .backward_input(&Tensor::from_vec(gy.clone(), (m, n), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        check_close(
            &format!("{dtype:?} backward"),
            &gx,
            &ref_backward(&gy, &deq, m, n, k),
            1e-5,
        );

        // embedding rows and exact row permutation
        let ids = [3u32, 0, 39, 3];
        let e = w
            .embedding(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                &e[i * k..(i + 1) * k],
                &deq[id as usize * k..(id as usize + 1) * k],
                "{dtype:?} embedding"
            );
        }
        assert!(w.embedding(&[40]).is_err());
        let perm: Vec<usize> = (0..n).rev().collect();
        let p = w.permute_rows(&perm).unwrap();
        let pd = p
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, &src) in perm.iter().enumerate() {
            assert_eq!(
                &pd[i * k..(i + 1) * k],
                &deq[src * k..(src + 1) * k],
                "{dtype:?} permute_rows"
            );
        }
    }
}

/// `gy (m x n) @ w (n x k)` in f64.
fn ref_backward(gy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut gx = vec![0f64; m * k];
    for r in 0..m {
        for c in 0..n {
            let g = gy[r * n + c] as f64;
            for j in 0..k {
                gx[r * k + j] += g * w[c * k + j] as f64;
            }
        }
    }
    gx
}

fn check_close(what: &str, got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |a, v| a.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= rel * scale,
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn backward_input_tiles_cover_large_shapes() {
    // more rows than one dequantisation tile, several column chunks, both thread counts
    let mut rng = StdRng::seed_from_u64(7);
    let (n, k, m) = (600, 1024, 5);
    for dtype in OWN {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let gy = randn(&mut rng, m * n, 1.0);
        let want = ref_backward(&gy, &deq, m, n, k);
        for threads in [1, 2] {
            let gx = w.backward_slice(&gy, m, threads).unwrap();
            check_close(
                &format!("{dtype:?} backward threads={threads}"),
                &gx,
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn q8_transposed_backward_is_close_to_exact() {
    let mut rng = StdRng::seed_from_u64(17);
    let (k, m) = (1024, 7);
    for dtype in OWN {
        // 608 output rows: whole Q8_0 blocks along `out`, so the transposed copy is used
        let n = 608;
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let gy = randn(&mut rng, m * n, 1.0);
        let want = ref_backward(&gy, &deq, m, n, k);
        let gyt = Tensor::from_vec(gy.clone(), (m, n), &Device::Cpu).unwrap();
        let got: Vec<f32> = w
            .backward_input_with(&gyt, BackwardWeights::Q8Transposed)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = rel_l2(&got, &want);
        // Q8_0 moves each weight, and the 8-bit gradient blocks each gradient entry, by at most
        // 1/254 of its block's largest magnitude: for Gaussian values with 1% 8x outliers about
        // 0.8% relative in L2 each (1.2% together); the narrow copy of an AVX2-only CPU moves
        // each weight by up to 1/126 (1.8-1.9% together); nonzero, or the copy was not used
        assert!(
            err < 3e-2 && err > 1e-6,
            "{dtype:?}: relative L2 error {err}"
        );
        eprintln!("{dtype:?}: q8 transposed backward relative L2 error {err:.2e}");
        assert!(w.transposed.get().is_some_and(|t| t.is_some()));
        // 600 rows do not split into Q8_0 blocks: the exact path runs instead
        let (w, deq) = weight(&mut rng, 600, k, dtype);
        let gy = randn(&mut rng, m * 600, 1.0);
        let want = ref_backward(&gy, &deq, m, 600, k);
        let gyt = Tensor::from_vec(gy, (m, 600), &Device::Cpu).unwrap();
        let got: Vec<f32> = w
            .backward_input_with(&gyt, BackwardWeights::Q8Transposed)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        check_close(&format!("{dtype:?} fallback"), &got, &want, 1e-5);
    }
}

#[test]
fn narrow_q8_kernel_matches_the_q8_kernels() {
    // Q8_0 rows with values in -63..=63 (the narrow backward copies, extremes included): the
    // AVX2 kernel without a sign step against the scalar and every other Q8_0 kernel on the
    // same quantised activations; only f32 summation order (and the offset term's rounding)
    // may differ. 37 rows and 2, 6, 7 activation rows: whole and partial panels, every row tile.
    let mut rng = StdRng::seed_from_u64(23);
    let (n, k) = (37, 352);
    let nb = k / QK;
    let mut data = vec![0u8; n * nb * 34];
    for (i, blk) in data.chunks_exact_mut(34).enumerate() {
        let d = half::f16::from_f32(rng.random_range(0.001f32..0.05));
        blk[..2].copy_from_slice(&d.to_bits().to_le_bytes());
        for (j, q) in blk[2..].iter_mut().enumerate() {
            *q = match (i + j) % 11 {
                0 => 63i8,
                1 => -63,
                _ => rng.random_range(-63i8..=63),
            } as u8;
        }
    }
    for m in [2, 6, 7] {
        let mut x = randn(&mut rng, m * k, 1.0);
        x[5] = 40.0; // a block whose activations reach +-127
        let act = kernels::quantize_act::<i8>(Isa::Scalar, &x, m, k);
        let mut want = vec![0f32; m * n];
        // SAFETY: want is m x n.
        unsafe { kernels::gemm(Isa::Scalar, Fmt::Q8_0, &data, n, &act, want.as_mut_ptr(), n) };
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for isa in isas() {
            let mut got = vec![f32::NAN; m * n];
            // SAFETY: got is m x n; every weight value lies in -63..=63.
            unsafe { kernels::gemm_q8_narrow(isa, &data, n, &act, got.as_mut_ptr(), n) };
            for i in 0..m * n {
                assert!(
                    (got[i] - want[i]).abs() <= 1e-5 * scale,
                    "{isa:?} m={m} [{i}]: {} vs scalar {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

#[test]
fn narrow_transposed_copy_stays_in_range_and_close() {
    // The copy both qmax values build: narrow values stay in -63..=63 (the kernel's
    // precondition). Its rounding step is twice the full copy's: on these Gaussian weights
    // with 1% 8x outliers the input gradient's relative L2 error (8-bit gradient blocks
    // included) goes from about 1.2% to 1.9%.
    let mut rng = StdRng::seed_from_u64(29);
    let (n, k, m) = (608, 256, 5);
    for dtype in OWN {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let gy = randn(&mut rng, m * n, 1.0);
        let want = ref_backward(&gy, &deq, m, n, k);
        let mut errs = vec![];
        for (qmax, narrow) in [(127.0, false), (63.0, true)] {
            let t = w.build_transposed_q8(qmax).unwrap().unwrap();
            let Repr::Own { data, .. } = &t.repr else {
                unreachable!()
            };
            let widest = data
                .chunks_exact(34)
                .flat_map(|b| b[2..].iter().map(|&q| (q as i8).unsigned_abs()))
                .max()
                .unwrap();
            assert!(
                widest as f32 <= qmax && widest as f32 > qmax / 2.0,
                "{dtype:?} {widest}"
            );
            // SAFETY: the output holds m x k values, all written.
            let got = unsafe {
                written_vec(m * k, |o| {
                    t.matmul_act::<i8>(Isa::best(), ActPrecision::I8, narrow, 2, &gy, m, o)
                })
            };
            errs.push(rel_l2(&got, &want));
        }
        eprintln!(
            "{dtype:?}: transposed copy error full {:.2e}, narrow {:.2e}",
            errs[0], errs[1]
        );
        assert!(errs[0] < 2e-2 && errs[1] < 3e-2, "{dtype:?}: {errs:?}");
        assert!(
            errs[1] > errs[0] * 1.2 && errs[1] < errs[0] * 2.5,
            "{dtype:?}: {errs:?}"
        );
    }
}

#[test]
fn linear_gradient_reaches_x_only() {
    let mut rng = StdRng::seed_from_u64(8);
    let (n, k) = (24, 256);
    // Q4K covers the path where candle runs the forward
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K] {
        let (w, deq) = weight(&mut rng, n, k, dtype);
        let w = Arc::new(w);
        let x = Var::from_vec(randn(&mut rng, 2 * 3 * k, 1.0), (2, 3, k), &Device::Cpu).unwrap();
        let r = randn(&mut rng, 2 * 3 * n, 1.0);
        let rt = Tensor::from_vec(r.clone(), (2, 3, n), &Device::Cpu).unwrap();
        let y = linear(x.as_tensor(), &w).unwrap();
        assert_eq!(y.dims(), &[2, 3, n]);
        // forward through the op equals the plain forward
        let yf = w.forward(x.as_tensor()).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            yf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let loss = (y * &rt).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
        let gx = gx.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        check_close(
            &format!("{dtype:?} grad x"),
            &gx,
            &ref_backward(&r, &deq, 6, n, k),
            1e-5,
        );
        // nothing of the weight's shape was ever given a gradient
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            assert_ne!(
                g.dims(),
                &[n, k],
                "{dtype:?}: a weight-shaped gradient was computed"
            );
            assert_ne!(
                g.dims(),
                &[k, n],
                "{dtype:?}: a weight-shaped gradient was computed"
            );
        }
    }
}

/// Central finite differences of `L(x) = sum(linear(x) * r)`.
///
/// With arbitrary `x` the forward rounds activations (to 16 or 8 bits), so finite differences
/// carry that rounding noise. Here `x` lies on the quantisation grid: each 32-block is `d_b * q`
/// with integer `q`, one element pinned at `QMAX d_b` (so the block scale is `d_b`), and the
/// direction `v` moves the other elements by integer multiples of `d_b` without reaching `QMAX`.
/// Both evaluations are then computed without activation rounding, `L` is exactly linear along
/// `v`, and the finite difference must equal `<grad, v>` to f32 accuracy.
#[test]
fn linear_gradient_finite_differences() {
    let qm = qmax(QuantSettings::default().activation) as i32;
    // d_b a power of two, so `QMAX d_b`, its division by QMAX and `x / d_b` are all exact; about
    // 2^-6 / 127 to 2^-2 / 127 whatever QMAX is, so x stays within +-2
    let shift = (qm as f32 / 127.0).log2().round() as i32;
    let mut rng = StdRng::seed_from_u64(9);
    let (n, k, m) = (32, 128, 2);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (w, _) = weight(&mut rng, n, k, dtype);
        let w = Arc::new(w);
        let nb = m * k / QK;
        let d: Vec<f32> = (0..nb)
            .map(|_| 2f32.powi(rng.random_range(-13..-9) - shift))
            .collect();
        let on_grid = |q: &dyn Fn(usize) -> i32| -> Vec<f32> {
            (0..m * k).map(|i| d[i / QK] * q(i) as f32).collect()
        };
        let q0: Vec<i32> = (0..m * k)
            .map(|i| {
                if i % QK == 0 {
                    qm
                } else {
                    rng.random_range(-(qm * 100 / 127)..=qm * 100 / 127)
                }
            })
            .collect();
        let x0 = on_grid(&|i| q0[i]);
        let r = randn(&mut rng, m * n, 1.0);
        let rt = Tensor::from_vec(r.clone(), (m, n), &Device::Cpu).unwrap();
        let loss = |x: &[f32]| -> f64 {
            let xt = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu).unwrap();
            let y = linear(&xt, &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            y.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let x = Var::from_vec(x0.clone(), (m, k), &Device::Cpu).unwrap();
        let l = (linear(x.as_tensor(), &w).unwrap() * &rt)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = l
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for trial in 0..5 {
            let u: Vec<i32> = (0..m * k)
                .map(|i| {
                    if i % QK == 0 {
                        0
                    } else {
                        rng.random_range(-(qm * 3 / 127)..=qm * 3 / 127)
                    }
                })
                .collect();
            let v = on_grid(&|i| u[i]);
            let xp = on_grid(&|i| q0[i] + u[i]);
            let xm = on_grid(&|i| q0[i] - u[i]);
            let fd = (loss(&xp) - loss(&xm)) / 2.0;
            let gv: f64 = g.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum();
            // f32 accumulation over k terms of size |x||W|
            let scale: f64 = g
                .iter()
                .zip(&v)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum::<f64>()
                + loss(&xp).abs();
            assert!(
                (fd - gv).abs() <= 1e-5 * scale,
                "{dtype:?} trial {trial}: finite difference {fd} vs gradient {gv}"
            );
            assert!(
                gv.abs() > 1e-3 * scale,
                "{dtype:?} trial {trial}: degenerate direction"
            );
        }
    }
}

#[test]
fn permute_rows_is_exact() {
    let mut rng = StdRng::seed_from_u64(10);
    let (n, k) = (50, 64);
    for dtype in OWN {
        let (w, _) = weight(&mut rng, n, k, dtype);
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        let p = w.permute_rows(&perm).unwrap();
        assert_eq!(p.storage_bytes(), w.storage_bytes());
        let (Repr::Own { data: a, .. }, Repr::Own { data: b, .. }) = (&w.repr, &p.repr) else {
            unreachable!()
        };
        let rb = w.row_bytes();
        for (i, &src) in perm.iter().enumerate() {
            assert_eq!(
                &b[i * rb..(i + 1) * rb],
                &a[src * rb..(src + 1) * rb],
                "{dtype:?} row {i}"
            );
        }
        // outputs are permuted exactly too (each row's dot product runs the same instructions)
        let x = randn(&mut rng, k, 1.0);
        let (mut y, mut yp) = (vec![0f32; n], vec![0f32; n]);
        w.matvec_into(&x, &mut y);
        p.matvec_into(&x, &mut yp);
        for (i, &src) in perm.iter().enumerate() {
            assert_eq!(yp[i], y[src]);
        }
        assert!(w.permute_rows(&perm[1..]).is_err());
        let mut dup = perm.clone();
        dup[0] = dup[1];
        assert!(w.permute_rows(&dup).is_err());
    }
}

#[test]
fn bad_shapes_are_errors() {
    let w = Tensor::zeros((4, 40), DType::F32, &Device::Cpu).unwrap();
    let e = QuantWeight::quantize(&w, GgmlDType::Q4_1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("40") && e.contains("32"), "{e}");
    assert!(!e.contains('\n'));
    let w3 = Tensor::zeros((2, 4, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(QuantWeight::quantize(&w3, GgmlDType::Q8_0).is_err());
}

/// Real tensors from the SmolLM2 GGUF (fetched by scripts/fetch-models.sh; CI fetches it).
#[test]
fn from_real_gguf_tensor() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh to fetch the test models",
        path.display()
    );
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.0.attn_k.weight",
    ] {
        let q = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
        let dtype = q.dtype();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (n, k) = q.shape().dims2().unwrap();
        let w = QuantWeight::from_qtensor(q).unwrap();
        assert_eq!(w.shape(), (n, k), "{name}");
        let got = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, deq, "{name} ({dtype:?}) dequantize");
        let mut rng = StdRng::seed_from_u64(11);
        let x = randn(&mut rng, 3 * k, 1.0);
        let mut y = vec![0f32; n];
        {
            w.matvec_into(&x[..k], &mut y);
            check_against_reference(
                &format!("{name} ({dtype:?}) matvec"),
                w.settings().activation,
                &y,
                &x[..k],
                &deq,
                1,
                k,
                n,
            );
        }
        if Fmt::from_ggml(dtype).is_some() {
            for prec in PRECS {
                let mut y3 = vec![0f32; 3 * n];
                w.matmul_with(Isa::best(), prec, 2, &x, 3, &mut y3);
                let rel = check_against_reference(
                    &format!("{name} ({dtype:?}) matmul"),
                    prec,
                    &y3,
                    &x,
                    &deq,
                    3,
                    k,
                    n,
                );
                println!("{name} {prec:?}: relative L2 error {rel:.2e}");
            }
        }
        println!("{name}: {n}x{k} {dtype:?} ok");
    }
}

/// Largest possible integer partial sums: every 4-bit weight at 15 (or Q8 weight at +-127) against
/// activations all at +-QMAX, on every kernel level, both precisions and both the matvec and
/// batched kernels. An i16 overflow in a `vpmaddubsw` path or an i32 one in the 16-bit paths
/// would show up as a wildly wrong result here.
#[test]
fn extreme_values_do_not_overflow() {
    let (n, k, m): (usize, usize, usize) = (24, 256, 5);
    for dtype in OWN {
        // each 32-block: 31 values at +1 and one at 0 (Q4: nibbles 15 and 0), or all at +-1 (Q8)
        let wv: Vec<f32> = (0..n * k)
            .map(|i| match dtype {
                GgmlDType::Q8_0 => {
                    if (i / k).is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    }
                }
                _ => {
                    if i % QK == 0 {
                        0.0
                    } else {
                        1.0
                    }
                }
            })
            .collect();
        let q =
            QTensor::quantize(&Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let w = QuantWeight::from_qtensor(q).unwrap();
        // activation rows: all +1, all -1, and alternating blocks
        let x: Vec<f32> = (0..m * k)
            .map(|i| match (i / k) % 3 {
                0 => 1.0,
                1 => -1.0,
                _ => {
                    if (i / QK).is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    }
                }
            })
            .collect();
        for isa in isas() {
            for prec in PRECS {
                let mut y = vec![0f32; m * n];
                w.matmul_with(isa, prec, 1, &x, m, &mut y);
                check_against_reference(
                    &format!("{dtype:?} {isa:?} extreme matmul"),
                    prec,
                    &y,
                    &x,
                    &deq,
                    m,
                    k,
                    n,
                );
                let mut y1 = vec![0f32; n];
                w.matvec_with(isa, prec, 1, &x[k..2 * k], &mut y1);
                check_against_reference(
                    &format!("{dtype:?} {isa:?} extreme matvec"),
                    prec,
                    &y1,
                    &x[k..2 * k],
                    &deq,
                    1,
                    k,
                    n,
                );
            }
        }
    }
}

/// A weight's settings pick the kernels behind the public API (`forward`, `matvec_into`,
/// `linear`, `backward_input`): each gives bit-for-bit the explicit result. Two copies of one
/// weight with different settings run side by side, each with its own (no process-wide state).
#[test]
fn weight_settings_select_the_kernels() {
    let mut rng = StdRng::seed_from_u64(14);
    let (n, k, m) = (64, 192, 3);
    let (w, _) = weight(&mut rng, n, k, GgmlDType::Q4_1);
    let w = Arc::new(w);
    let other = Arc::new(w.permute_rows(&(0..n).collect::<Vec<_>>()).unwrap());
    assert_eq!(other.settings(), w.settings(), "a copy keeps the settings");
    let x = randn(&mut rng, m * k, 1.0);
    let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let g = randn(&mut rng, m * n, 1.0);
    let gt = Tensor::from_vec(g, (m, n), &Device::Cpu).unwrap();
    let run = |w: &Arc<QuantWeight>| {
        let y = linear(&xt, w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut y1 = vec![0f32; n];
        w.matvec_into(&x[..k], &mut y1);
        let gx = w
            .backward_input(&gt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (y, y1, gx)
    };
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for prec in PRECS {
        for backward in [BackwardWeights::Exact, BackwardWeights::Q8Transposed] {
            let s = QuantSettings {
                activation: prec,
                backward,
            };
            w.set_settings(s);
            assert_eq!(w.settings(), s);
            // the other copy is untouched
            let o = QuantSettings {
                activation: if prec == ActPrecision::I8 {
                    ActPrecision::I16
                } else {
                    ActPrecision::I8
                },
                backward: BackwardWeights::Exact,
            };
            other.set_settings(o);
            let (y, y1, gx) = run(&w);
            let mut want = vec![0f32; m * n];
            w.matmul_with(Isa::best(), prec, num_threads(), &x, m, &mut want);
            assert_eq!(y, want, "{s:?} linear");
            let mut want1 = vec![0f32; n];
            w.matvec_with(Isa::best(), prec, num_threads(), &x[..k], &mut want1);
            assert_eq!(y1, want1, "{s:?} matvec_into");
            assert_eq!(gx, flat(w.backward_input_with(&gt, backward).unwrap()));
            let (oy, _, ogx) = run(&other);
            let mut owant = vec![0f32; m * n];
            other.matmul_with(Isa::best(), o.activation, num_threads(), &x, m, &mut owant);
            assert_eq!(oy, owant, "the other weight runs with its own precision");
            assert_ne!(oy, y, "the two precisions really are different kernels");
            assert_eq!(
                ogx,
                flat(
                    other
                        .backward_input_with(&gt, BackwardWeights::Exact)
                        .unwrap()
                )
            );
            if backward == BackwardWeights::Q8Transposed {
                assert_ne!(gx, ogx, "the two backward methods differ");
            }
        }
    }
}

/// llama.cpp's result for one weight row (raw GGML blocks) and activation row, written from its
/// x86 `quantize_row_q8_0` / `quantize_row_q8_1` and `ggml_vec_dot_*` (f64 sums): the reference
/// for [`ActPrecision::LlamaCpp`].
fn llama_cpp_dot(fmt: Fmt, row: &[u8], x: &[f32]) -> f64 {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32() as f64;
    let mut acc = 0f64;
    for (blk, xb) in row.chunks_exact(fmt.block_bytes()).zip(x.chunks_exact(QK)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let q: Vec<i32> = xb
            .iter()
            .map(|v| (v * id).round_ties_even() as i32)
            .collect();
        let dx = half::f16::from_f32(amax / 127.0).to_f32() as f64;
        let dw = f16(&blk[0..2]);
        let (mut iprod, isum) = (0i64, q.iter().sum::<i32>());
        for j in 0..QK {
            let wq = match fmt {
                Fmt::Q8_0 => blk[2 + j] as i8 as i64,
                Fmt::Q4_0 | Fmt::Q4_1 => {
                    let qs = &blk[if fmt == Fmt::Q4_1 { 4 } else { 2 }..];
                    let nib = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 } as i64;
                    nib - if fmt == Fmt::Q4_0 { 8 } else { 0 }
                }
            };
            iprod += wq * q[j] as i64;
        }
        acc += dw * dx * iprod as f64;
        if fmt == Fmt::Q4_1 {
            let s = half::f16::from_f32(amax / 127.0 * isum as f32).to_f32() as f64;
            acc += f16(&blk[2..4]) * s;
        }
    }
    acc
}

#[test]
fn llama_cpp_activations_give_llama_cpp_dot_products() {
    let mut rng = StdRng::seed_from_u64(31);
    let (m, k, n) = (3, 256, 24);
    let x = randn(&mut rng, m * k, 1.0);
    for (dtype, fmt) in OWN.into_iter().zip([Fmt::Q4_0, Fmt::Q4_1, Fmt::Q8_0]) {
        let w = Tensor::from_vec(randn(&mut rng, n * k, 0.05), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let raw = q.data().unwrap().to_vec();
        let qw = QuantWeight::from_qtensor(q).unwrap();
        let rb = raw.len() / n;
        let want: Vec<f64> = (0..m)
            .flat_map(|r| {
                let xr = &x[r * k..(r + 1) * k];
                raw.chunks_exact(rb)
                    .map(move |row| llama_cpp_dot(fmt, row, xr))
            })
            .collect();
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        let err = |y: &[f32]| {
            y.iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0f64, f64::max)
                / scale
        };
        for isa in isas() {
            let run = |prec: ActPrecision| {
                let mut rows = vec![0f32; m * n];
                qw.matvec_rows_with(isa, prec, 2, &x, m, &mut rows);
                let mut batched = vec![0f32; m * n];
                qw.matmul_with(isa, prec, 2, &x, m, &mut batched);
                let mut one = vec![0f32; n];
                qw.matvec_with(isa, prec, 1, &x[..k], &mut one);
                (rows, batched, one)
            };
            let (rows, batched, one) = run(ActPrecision::LlamaCpp);
            let (e_rows, e_batched, e_one) = (err(&rows), err(&batched), err(&one[..]));
            // only the order of f32 additions differs from llama.cpp
            for (what, e) in [("rows", e_rows), ("batched", e_batched)] {
                assert!(
                    e < 2e-6,
                    "{fmt:?} {isa:?} {what}: {e:e} from llama.cpp's dot products"
                );
            }
            let e1 = one
                .iter()
                .zip(&want[..n])
                .map(|(a, b)| (*a as f64 - b).abs());
            assert!(e1.fold(0f64, f64::max) / scale < 2e-6 && e_one.is_finite());
            // our own 8-bit rounding (f32 scales) is measurably further from llama.cpp
            let (i8_rows, _, _) = run(ActPrecision::I8);
            assert!(
                err(&i8_rows) > 20.0 * e_rows,
                "{fmt:?} {isa:?}: I8 {:e} vs LlamaCpp {e_rows:e}",
                err(&i8_rows)
            );
        }
    }
}

#[test]
fn llama_cpp_rounding_ties_to_even_and_f16_scales() {
    // max 127: the multiplier is exactly 1, so 2.5 and -2.5 are ties
    let mut x = [0f32; QK];
    x[..5].copy_from_slice(&[127.0, 2.5, 3.5, -2.5, 0.3]);
    let mut q = [0i8; QK];
    let [d, s] = super::format::quantize_block_llama(Fmt::Q4_1, &x, &mut q);
    assert_eq!(&q[..5], &[127, 2, 4, -2, 0]);
    assert_eq!(d, 1.0);
    assert_eq!(s, 131.0);
    // a scale f16 cannot hold is rounded to the nearest f16, as llama.cpp stores it
    x[0] = 100.0;
    let [d, s] = super::format::quantize_block_llama(Fmt::Q8_0, &x, &mut q);
    assert_eq!(d, half::f16::from_f32(100.0 / 127.0).to_f32());
    assert_ne!(d, 100.0 / 127.0);
    assert_eq!(s, d * q.iter().map(|v| *v as i32).sum::<i32>() as f32);
    // all zeros: zero scale, no NaN
    let [d, s] = super::format::quantize_block_llama(Fmt::Q4_1, &[0.0; QK], &mut q);
    assert_eq!((d, s, q), (0.0, 0.0, [0i8; QK]));
    // an infinite activation: a zero block, not NaN scales
    x[3] = f32::INFINITY;
    let [d, s] = super::format::quantize_block_llama(Fmt::Q4_1, &x, &mut q);
    assert_eq!((d, s, q), (0.0, 0.0, [0i8; QK]));
}

#[test]
fn act_bits_environment_values() {
    assert_eq!(act_bits_from_env(Some("llamacpp")), ActPrecision::LlamaCpp);
    assert_eq!(act_bits_from_env(Some("8")), ActPrecision::I8);
    assert_eq!(act_bits_from_env(Some("16")), ActPrecision::I16);
    assert_eq!(act_bits_from_env(None), ActPrecision::I16);
    // anything else keeps the precise default
    assert_eq!(act_bits_from_env(Some("4")), ActPrecision::I16);
    assert_eq!(act_bits_from_env(Some(" 8")), ActPrecision::I16);
}

/// A 4-bit weight with random codes and absmax (the table is NF4's shape, not exactly it: the
/// kernels take any table), `nested` with double-quantised scales.
fn four_bit(rng: &mut StdRng, n: usize, k: usize, nested: bool) -> QuantWeight {
    let mut table = [0f32; 16];
    for (i, t) in table.iter_mut().enumerate() {
        *t = (i as f32 - 7.0) / 8.0 + rng.random::<f32>() * 1e-3;
    }
    let blocks = n * k / 64;
    let scales = if nested {
        let mut code = Box::new([0f32; 256]);
        for (i, c) in code.iter_mut().enumerate() {
            *c = (i as f32 - 127.5) / 128.0;
        }
        BlockScales::Nested {
            codes: (0..blocks).map(|_| rng.random::<u8>()).collect(),
            code,
            nested_absmax: (0..blocks.div_ceil(256))
                .map(|_| 0.02 + rng.random::<f32>() * 0.02)
                .collect(),
            nested_blocksize: 256,
            offset: 0.05,
        }
    } else {
        BlockScales::Plain(
            (0..blocks)
                .map(|_| 0.01 + rng.random::<f32>() * 0.1)
                .collect(),
        )
    };
    let w = FourBitWeight {
        table,
        blocksize: 64,
        packed: (0..n * k / 2).map(|_| rng.random::<u8>()).collect(),
        scales,
    };
    QuantWeight::from_four_bit(n, k, true, w).unwrap()
}

fn int8_rows(rng: &mut StdRng, n: usize, k: usize) -> QuantWeight {
    let w = Int8RowsWeight {
        data: (0..n * k).map(|_| rng.random::<i8>()).collect(),
        scb: (0..n).map(|_| rng.random::<f32>() * 0.3).collect(),
    };
    QuantWeight::from_int8_rows(n, k, w).unwrap()
}

#[test]
fn bnb_formats_forward_matches_dequantised_matmul() {
    let mut rng = StdRng::seed_from_u64(41);
    // (m, n, k): decode, a short prefill, and a training-sized batch with ragged tiles
    for (m, n, k) in [(1, 96, 128), (3, 40, 192), (70, 200, 320)] {
        for (name, w) in [
            ("nf4", four_bit(&mut rng, n, k, false)),
            ("nf4+dq", four_bit(&mut rng, n, k, true)),
            ("int8", int8_rows(&mut rng, n, k)),
        ] {
            let deq = w
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let x = randn(&mut rng, m * k, 1.0);
            let want = ref_matmul(&x, &deq, m, k, n);
            for isa in isas() {
                for threads in [1, 3] {
                    let mut y = vec![0f32; m * n];
                    w.decoded_forward_into(isa, threads, &x, m, &mut y);
                    check_close(
                        &format!("{name} {isa:?} m={m} t={threads}"),
                        &y,
                        &want,
                        1e-5,
                    );
                }
            }
            // the public entry points take the same path
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let y = w
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            check_close(&format!("{name} forward m={m}"), &y, &want, 1e-5);
            if m == 1 {
                let mut o = vec![0f32; n];
                w.matvec_into(&x, &mut o);
                check_close(&format!("{name} matvec_into"), &o, &want, 1e-5);
            }
        }
    }
}

#[test]
fn bnb_formats_decode_rows_and_blocks_consistently() {
    let mut rng = StdRng::seed_from_u64(42);
    let w = four_bit(&mut rng, 6, 256, true);
    let full = w.dequantize().unwrap().to_vec2::<f32>().unwrap();
    // any block range of any row equals the same slice of the whole matrix, on every level
    for isa in isas() {
        let mut part = vec![0f32; 128];
        w.decode_bnb(isa, 4, 1, 3, &mut part);
        assert_eq!(part, full[4][64..192], "{isa:?}");
    }
    // embeddings (rows by id) read the same values
    let e = w.embedding(&[5, 0]).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(e[0], full[5]);
    assert_eq!(e[1], full[0]);
    assert!(w.embedding(&[6]).is_err());
    assert!(w.permute_rows(&[0, 1, 2, 3, 4, 5]).is_err());
}

#[test]
fn bnb_formats_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(43);
    let (m, n, k) = (9, 64, 192);
    for w in [four_bit(&mut rng, n, k, true), int8_rows(&mut rng, n, k)] {
        let deq = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gy = randn(&mut rng, m * n, 1.0);
        let want = ref_backward(&gy, &deq, m, n, k);
        let g = Tensor::from_vec(gy, (m, n), &Device::Cpu).unwrap();
        let exact = w.backward_input_with(&g, BackwardWeights::Exact).unwrap();
        check_close(
            &format!("{w:?} exact"),
            &exact.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want,
            1e-5,
        );
        let q8 = w
            .backward_input_with(&g, BackwardWeights::Q8Transposed)
            .unwrap();
        check_close(
            &format!("{w:?} q8"),
            &q8.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &want,
            3e-2,
        );
    }
}

#[test]
fn bnb_formats_refuse_inconsistent_sizes() {
    let mut rng = StdRng::seed_from_u64(44);
    let w = FourBitWeight {
        table: [0.0; 16],
        blocksize: 64,
        packed: vec![0; 64 * 96 / 2],
        scales: BlockScales::Plain(vec![1.0; 64 * 96 / 64]),
    };
    // 96 is not a multiple of 64: blocks would span rows
    assert!(QuantWeight::from_four_bit(64, 96, true, w).is_err());
    let w = FourBitWeight {
        table: [0.0; 16],
        blocksize: 64,
        packed: vec![0; 10],
        scales: BlockScales::Plain(vec![1.0; 1]),
    };
    assert!(QuantWeight::from_four_bit(2, 64, true, w).is_err());
    let w = Int8RowsWeight {
        data: vec![0; 6],
        scb: vec![1.0; 3],
    };
    assert!(QuantWeight::from_int8_rows(2, 3, w).is_err());
    let ok = int8_rows(&mut rng, 2, 3);
    assert_eq!(ok.format(), WeightFormat::Int8);
    assert_eq!(ok.storage_bytes(), 6 + 8);
}

/// With 8-bit activations (training's default) a 4-bit weight runs on the Q8_0 integer
/// kernels; the result stays within the 8-bit activations' error of the exact product, and a
/// weight set back to 16 bits takes the exact f32 path again. On AVX2 the integer kernel takes
/// 16-bit activations (faster there), so only the Q8_0 weights' rounding is left: a smaller
/// error than AVX-512's 8-bit activations add to it.
#[test]
fn four_bit_with_8_bit_activations_runs_the_integer_kernels() {
    let mut rng = StdRng::seed_from_u64(45);
    let (m, n, k) = (40, 72, 256);
    for nested in [false, true] {
        let mut errors = std::collections::BTreeMap::new();
        let w = four_bit(&mut rng, n, k, nested);
        let deq = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x = randn(&mut rng, m * k, 1.0);
        let want = ref_matmul(&x, &deq, m, k, n);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        for isa in isas() {
            w.set_settings(QuantSettings {
                activation: ActPrecision::I8,
                backward: BackwardWeights::Exact,
            });
            let mut y = vec![0f32; m * n];
            w.decoded_forward_into(isa, 2, &x, m, &mut y);
            let e = rel_l2(&y, &want);
            assert!(e < 3e-2 && e > 1e-6, "{isa:?} nested={nested}: rel L2 {e}");
            errors.insert(isa, e);
            w.set_settings(QuantSettings::default());
            let y16 = w
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                rel_l2(&y16, &want) < 1e-6,
                "16-bit path: {}",
                rel_l2(&y16, &want)
            );
        }
        if let (Some(a2), Some(a512)) = (errors.get(&Isa::Avx2), errors.get(&Isa::Avx512)) {
            assert!(a2 < &(0.9 * a512), "rel L2: AVX2 {a2}, AVX-512 {a512}");
        }
    }
}

/// The block-exact decode arithmetic (`panel.rs`) computed straight from the row-major GGML
/// blocks, without the panel layout, in f32 as the module docs write it: what every decode
/// kernel must give bit for bit. Activations quantised by the portable code (identical on every
/// level: `quantised_activations_identical_on_every_isa`).
fn block_exact_from_blocks<T: ActInt>(
    fmt: Fmt,
    rows: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
) -> Vec<f32> {
    let (nb, bb) = (k / QK, fmt.block_bytes());
    let m = x.len() / k;
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        let mut qa = vec![T::default(); k];
        let mut ds = vec![[0f32; 2]; nb];
        kernels::quantize_into(Isa::Scalar, &x[r * k..(r + 1) * k], &mut qa, &mut ds);
        for c in 0..n {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = &rows[(c * nb + b) * bb..][..bb];
                let mut isum = 0i32;
                for v in 0..QK {
                    let q = match fmt {
                        Fmt::Q8_0 => blk[2 + v] as i8 as i32,
                        _ => {
                            let qs = &blk[bb - 16..];
                            (if v < 16 { qs[v] & 15 } else { qs[v - 16] >> 4 }) as i32
                        }
                    };
                    isum += q * qa[b * QK + v].widen();
                }
                let [dx, sx] = ds[b];
                let d = f16(&blk[..2]);
                acc = (isum as f32 * dx).mul_add(d, acc);
                acc = match fmt {
                    Fmt::Q4_1 => f16(&blk[2..4]).mul_add(sx, acc),
                    Fmt::Q4_0 => (-8.0 * d).mul_add(sx, acc),
                    Fmt::Q8_0 => acc,
                };
            }
            out[r * n + c] = acc;
        }
    }
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Decode steps (`decode_rows_with`, integer arithmetic) run on the panel layout: on every
/// kernel level, thread count and number of rows, each output is bit-identical to the
/// block-exact arithmetic on the original blocks, so a row decodes the same alone or batched;
/// and the result is within the activation-rounding bound of the dequantised matmul. Shapes
/// with a partial last panel (n = 40, 3) and one block per row (k = 32).
#[test]
fn decode_panels_are_block_exact_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(41);
    for (n, k) in [(40usize, 96usize), (16, 32), (3, 64), (72, 256)] {
        for dtype in OWN {
            let (w, deq) = weight(&mut rng, n, k, dtype);
            let Repr::Own { fmt, data } = &w.repr else {
                unreachable!()
            };
            for prec in PRECS {
                w.set_settings(QuantSettings {
                    activation: prec,
                    ..Default::default()
                });
                let m_max = 11;
                let x = randn(&mut rng, m_max * k, 1.0);
                let want = match prec {
                    ActPrecision::I16 => block_exact_from_blocks::<i16>(*fmt, data, n, k, &x),
                    _ => block_exact_from_blocks::<i8>(*fmt, data, n, k, &x),
                };
                check_against_reference(
                    &format!("{dtype:?} {n}x{k} block-exact decode"),
                    prec,
                    &want,
                    &x,
                    &deq,
                    m_max,
                    k,
                    n,
                );
                for isa in isas() {
                    for threads in [1, 2] {
                        for m in [1usize, 2, 3, 4, 5, 8, 9, 11] {
                            let mut y = vec![f32::NAN; m * n];
                            w.decode_rows_with(
                                isa,
                                DecodeArith::Int,
                                threads,
                                &x[..m * k],
                                m,
                                &mut y,
                            );
                            assert!(
                                same_bits(&y, &want[..m * n]),
                                "{dtype:?} {prec:?} {isa:?} {n}x{k} m={m} threads={threads}: \
                                 decode differs from the block-exact reference \
                                 (first: {:?} vs {:?})",
                                &y[..n.min(4)],
                                &want[..n.min(4)]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Extreme block sums (all nibbles 15 against activations of one sign, Q8_0 at +-127 x
/// +-32767) stay exact in the panel kernels' integer lanes: the AVX2 8-bit Q4 path sums in i16
/// lanes over a whole block.
#[test]
fn decode_panels_extreme_values_do_not_overflow() {
    let (n, k, m): (usize, usize, usize) = (24, 256, 3);
    for dtype in OWN {
        let wv: Vec<f32> = (0..n * k)
            .map(|i| match dtype {
                GgmlDType::Q8_0 => {
                    if (i / k) % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    }
                }
                _ => {
                    if i % QK == 0 {
                        0.0
                    } else {
                        1.0
                    }
                }
            })
            .collect();
        let q =
            QTensor::quantize(&Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap(), dtype).unwrap();
        let w = QuantWeight::from_qtensor(q).unwrap();
        let Repr::Own { fmt, data } = &w.repr else {
            unreachable!()
        };
        let x: Vec<f32> = (0..m * k).map(|i| [1.0, -1.0, 0.5][i / k]).collect();
        for prec in PRECS {
            w.set_settings(QuantSettings {
                activation: prec,
                ..Default::default()
            });
            let want = match prec {
                ActPrecision::I16 => block_exact_from_blocks::<i16>(*fmt, data, n, k, &x),
                _ => block_exact_from_blocks::<i8>(*fmt, data, n, k, &x),
            };
            for isa in isas() {
                let mut y = vec![0f32; m * n];
                w.decode_rows_with(isa, DecodeArith::Int, 1, &x, m, &mut y);
                assert!(
                    same_bits(&y, &want),
                    "{dtype:?} {prec:?} {isa:?}: {:?} vs {:?}",
                    &y[..4],
                    &want[..4]
                );
            }
        }
    }
}
