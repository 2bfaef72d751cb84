//! Shared CPU machinery for the fused ops: a float trait over f32/f64, slice kernels written so
//! the compiler vectorises them, AVX2 multiversioning, and helpers to reach candle's storages.
//!
//! Why multiversioning: the default x86_64 target only has SSE2, so auto-vectorised loops would
//! use 4-wide f32 vectors. [`multiversion!`] compiles a kernel body a second time inside an
//! `#[target_feature(enable = "avx2,fma")]` frame and picks it at runtime, the way gemm does.
//! Every helper a body calls must be `#[inline(always)]` so it is compiled into that frame.
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// The float types our CPU kernels are written for (f32 for speed, f64 for tight gradient checks).
pub(crate) trait Float: WithDType + std::ops::Neg<Output = Self> {
    const ZERO: Self;
    const ONE: Self;
    /// e^x. For f32 a branch-free polynomial (≈1 ulp) that vectorises, unlike a libm call.
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
}

impl Float for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
}

impl Float for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
}

/// Cephes-style expf: e^x = 2^n · e^r with n = round(x·log2 e) and |r| ≤ ln2/2, then a degree-6
/// polynomial for e^r. Rounding uses the 1.5·2^23 trick and 2^n is built from the exponent bits,
/// so there is no float→int conversion and no branch; NaN propagates, exp(-inf) = 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.336_54; // below this e^x is subnormal: return 0
    const HI: f32 = 88.0; // keeps n ≤ 127 so 2^n is a normal float (e^88 ≈ 1.65e38)
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x < LO {
        LO
    } else if x > HI {
        HI
    } else {
        x
    };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    // The low mantissa bits of t hold n (offset by MAGIC's bit pattern 0x4B40_0000).
    let pow2n = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    let y = er * pow2n;
    if x < LO {
        0.0
    } else {
        y
    }
}

/// Whether the running CPU can take the AVX2 copies of the kernels.
#[inline]
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `multiversion!(pub(crate) fn name<T>(args..) -> R = body;)` defines `name`, which runs the
/// `#[inline(always)]` generic function `body` in an AVX2 frame when the CPU has AVX2.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::ops::kernels::Float>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$T: $crate::ops::kernels::Float>($($arg: $ty),*) $(-> $ret)? {
                    $body::<$T>($($arg),*)
                }
                if $crate::ops::kernels::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked at runtime just above.
                    return unsafe { avx2::<$T>($($arg),*) };
                }
            }
            $body::<$T>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Lanes of the explicit accumulators: the compiler will not reassociate a float sum, so
/// reductions keep 32 independent partial sums (4 AVX2 registers of f32) and add them up as a tree.
const LANES: usize = 32;

#[inline(always)]
fn reduce_lanes<T: Float>(mut acc: [T; LANES]) -> T {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// Σ a·b.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += *x * *y;
    }
    reduce_lanes(acc)
}

/// Σ a·b·c.
#[inline(always)]
pub(crate) fn dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    for (l, ((x, y), z)) in ra.iter().zip(rb).zip(rc).enumerate() {
        acc[l] += *x * *y * *z;
    }
    reduce_lanes(acc)
}

/// max of a non-empty slice (NaN entries are skipped here; they still propagate through exp).
#[inline(always)]
pub(crate) fn max<T: Float>(a: &[T]) -> T {
    let first = a[0];
    let mut acc = [first; LANES];
    let ca = a.chunks_exact(LANES);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    for (l, x) in ra.iter().enumerate() {
        acc[l] = if *x > acc[l] { *x } else { acc[l] };
    }
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = if acc[i + w] > acc[i] { acc[i + w] } else { acc[i] };
        }
        w /= 2;
    }
    acc[0]
}

/// x ← exp(x − m); returns Σ of the new x.
#[inline(always)]
pub(crate) fn exp_shift_sum<T: Float>(x: &mut [T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut cx = x.chunks_exact_mut(LANES);
    for c in &mut cx {
        for l in 0..LANES {
            let e = (c[l] - m).exp();
            c[l] = e;
            acc[l] += e;
        }
    }
    for (l, v) in cx.into_remainder().iter_mut().enumerate() {
        let e = (*v - m).exp();
        *v = e;
        acc[l] += e;
    }
    reduce_lanes(acc)
}

/// x ← a·x.
#[inline(always)]
pub(crate) fn scale<T: Float>(x: &mut [T], a: T) {
    for v in x.iter_mut() {
        *v *= a;
    }
}

/// y ← y + a·x.
#[inline(always)]
pub(crate) fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

/// Rows per parallel task: a few tasks per thread for balance, but at least ~16k elements per
/// task so rayon's per-task cost (microseconds) never dominates small decode-time tensors.
pub(crate) fn rows_per_task(n_rows: usize, row_len: usize) -> usize {
    const MIN_ELEMS: usize = 16 * 1024;
    let min_rows = MIN_ELEMS.div_ceil(row_len.max(1));
    let balanced = n_rows.div_ceil(4 * rayon::current_num_threads());
    balanced.max(min_rows).max(1)
}

/// Runs `f(chunk_index, chunk)` over `out.chunks_mut(chunk_len)` and collects the results.
/// With a single chunk it runs on the calling thread: a rayon round trip costs more than the
/// whole of a one-token decode step's norm or rope.
pub(crate) fn map_chunks_mut<T, R, F>(out: &mut [T], chunk_len: usize, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(usize, &mut [T]) -> R + Sync + Send,
{
    let chunk_len = chunk_len.max(1);
    if out.len() <= chunk_len {
        vec![f(0, out)]
    } else {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .map(|(i, c)| f(i, c))
            .collect()
    }
}

/// [`map_chunks_mut`] without results.
pub(crate) fn for_each_chunk_mut<T, F>(out: &mut [T], chunk_len: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    let chunk_len = chunk_len.max(1);
    if out.len() <= chunk_len {
        f(0, out)
    } else {
        out.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// The dtype our CPU kernels can take for these tensors: all on the CPU, all f32 or all f64.
/// `None` means "use the composed reference ops" (GPU, f16/bf16, mixed dtypes).
pub(crate) fn cpu_kernel_dtype(ts: &[&Tensor]) -> Option<DType> {
    let dt = ts.first()?.dtype();
    let ok = matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt);
    ok.then_some(dt)
}

/// The part of `s` that a contiguous `l` covers.
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: internal error: expected a contiguous input"),
    }
}

/// The whole CPU buffer behind a storage guard, for kernels that index it with a layout's strides.
pub(crate) fn cpu_data<'a, T: WithDType>(s: &'a Storage, op: &str) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => c.as_slice::<T>(),
        _ => bail!("{op}: internal error: expected a CPU tensor"),
    }
}

/// The part of a CPU storage guard that a contiguous layout covers.
pub(crate) fn cpu_contiguous<'a, T: WithDType>(s: &'a Storage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => contiguous(c, l, op),
        _ => bail!("{op}: internal error: expected a CPU tensor"),
    }
}

/// Wraps a kernel's output as a (non-tracked) tensor on the CPU.
pub(crate) fn tensor_from_vec<T: WithDType>(v: Vec<T>, shape: &candle_core::Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_naive_sums() {
        for n in [1usize, 5, 31, 32, 33, 64, 100] {
            let a: Vec<f64> = (0..n).map(|i| ((i * 7 % 13) as f64 - 6.0) / 3.0).collect();
            let b: Vec<f64> = (0..n).map(|i| ((i * 5 % 11) as f64 - 5.0) / 2.0).collect();
            let c: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-12);
            let naive3: f64 = a.iter().zip(&b).zip(&c).map(|((x, y), z)| x * y * z).sum();
            assert!((dot3(&a, &b, &c) - naive3).abs() < 1e-12);
            let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max(&a), m);
            let mut e = a.clone();
            let s = exp_shift_sum(&mut e, m);
            let naive_s: f64 = a.iter().map(|v| (v - m).exp()).sum();
            assert!((s - naive_s).abs() < 1e-12);
        }
    }
}
