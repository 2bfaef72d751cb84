//! Shared CPU machinery for the fused ops: a float trait over f32/f64, slice kernels written so
//! the compiler vectorises them, AVX2 multiversioning, and helpers to reach candle's storages.
//!
//! Why multiversioning: the default x86_64 target only has SSE2, so auto-vectorised loops would
//! use 4-wide f32 vectors. [`multiversion!`] compiles a kernel body a second time inside an
//! `#[target_feature(enable = "avx2,fma")]` frame and picks it at runtime, the way gemm does.
//! Every helper a body calls must be `#[inline(always)]` so it is compiled into that frame.
//!
//! Loops without a reduction (axpy, scale, exp) vectorise well that way. Float reductions do
//! not: LLVM may not reassociate them, and its SLP vectoriser turned our explicit lane arrays
//! into 2- and 4-wide code. So the reductions on the hot paths (dot products, the attention
//! score and value loops) have hand-written AVX2+FMA versions for f32 in [`x86`], reached
//! through [`Float`]'s methods, with portable fallbacks for f64 and other CPUs.
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

    /// Σ a·b.
    #[inline(always)]
    fn dot(a: &[Self], b: &[Self]) -> Self {
        dot_portable(a, b)
    }

    /// Σ a·b·c.
    #[inline(always)]
    fn dot3(a: &[Self], b: &[Self], c: &[Self]) -> Self {
        dot3_portable(a, b, c)
    }

    /// `out[j] = scale · ⟨q, rows[j·rs ..][..q.len()]⟩` for every j < out.len().
    #[inline(always)]
    fn dot_rows(q: &[Self], rows: &[Self], rs: usize, scale: Self, out: &mut [Self]) {
        let d = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            *o = scale * dot_portable(q, &rows[j * rs..j * rs + d]);
        }
    }

    /// `out += Σ_j p[j] · rows[j·rs ..][..out.len()]`.
    #[inline(always)]
    fn axpy_rows(out: &mut [Self], p: &[Self], rows: &[Self], rs: usize) {
        let d = out.len();
        for (j, pj) in p.iter().enumerate() {
            axpy(out, *pj, &rows[j * rs..j * rs + d]);
        }
    }
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
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA are available (checked just above).
            return unsafe { x86::dot(a, b) };
        }
        dot_portable(a, b)
    }
    #[inline(always)]
    fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA are available (checked just above).
            return unsafe { x86::dot3(a, b, c) };
        }
        dot3_portable(a, b, c)
    }
    #[inline(always)]
    fn dot_rows(q: &[f32], rows: &[f32], rs: usize, scale: f32, out: &mut [f32]) {
        check_rows(rows, rs, out.len(), q.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2/FMA available; every row read lies inside `rows` (checked above).
            return unsafe { x86::dot_rows(q, rows, rs, scale, out) };
        }
        let d = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            *o = scale * dot_portable(q, &rows[j * rs..j * rs + d]);
        }
    }
    #[inline(always)]
    fn axpy_rows(out: &mut [f32], p: &[f32], rows: &[f32], rs: usize) {
        check_rows(rows, rs, p.len(), out.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2/FMA available; every row read lies inside `rows` (checked above).
            return unsafe { x86::axpy_rows(out, p, rows, rs) };
        }
        let d = out.len();
        for (j, pj) in p.iter().enumerate() {
            axpy(out, *pj, &rows[j * rs..j * rs + d]);
        }
    }
}

/// Panics unless `n` rows of length `d` at stride `rs` fit in `rows` (the unchecked kernels rely on it).
#[inline(always)]
fn check_rows<T>(rows: &[T], rs: usize, n: usize, d: usize) {
    assert!(
        n == 0 || (n - 1) * rs + d <= rows.len(),
        "row kernel: rows out of bounds"
    );
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
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001201e-1 rounds to 0.5 in f32
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

/// Lanes of the explicit accumulators in the portable reductions: the compiler will not
/// reassociate a float sum, so they keep 32 independent partial sums and add them up at the end
/// (this gets partly vectorised; the hot f32 reductions use [`x86`] instead).
const LANES: usize = 32;

/// Sums the lanes: 8-lane groups first, then a small tree.
#[inline(always)]
fn reduce_lanes<T: Float>(acc: [T; LANES]) -> T {
    let mut s = [T::ZERO; 8];
    for g in 0..LANES / 8 {
        for l in 0..8 {
            s[l] += acc[g * 8 + l];
        }
    }
    let s4 = [s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Σ a·b (AVX2 for f32 when available).
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    T::dot(a, b)
}

/// See [`Float::dot_rows`].
#[inline(always)]
pub(crate) fn dot_rows<T: Float>(q: &[T], rows: &[T], rs: usize, scale: T, out: &mut [T]) {
    T::dot_rows(q, rows, rs, scale, out)
}

/// See [`Float::axpy_rows`].
#[inline(always)]
pub(crate) fn axpy_rows<T: Float>(out: &mut [T], p: &[T], rows: &[T], rs: usize) {
    T::axpy_rows(out, p, rows, rs)
}

#[inline(always)]
fn dot_portable<T: Float>(a: &[T], b: &[T]) -> T {
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
    // The tail goes to its own scalar: indexing `acc` with a runtime lane would force the whole
    // accumulator array out of registers onto the stack.
    let mut tail = T::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        tail += *x * *y;
    }
    reduce_lanes(acc) + tail
}

/// Σ a·b·c (AVX2 for f32 when available).
#[inline(always)]
pub(crate) fn dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    T::dot3(a, b, c)
}

#[inline(always)]
fn dot3_portable<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    let mut tail = T::ZERO;
    for ((x, y), z) in ra.iter().zip(rb).zip(rc) {
        tail += *x * *y * *z;
    }
    reduce_lanes(acc) + tail
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
    let mut tail = first;
    for x in ra {
        tail = if *x > tail { *x } else { tail };
    }
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] = if acc[i + w] > acc[i] {
                acc[i + w]
            } else {
                acc[i]
            };
        }
        w /= 2;
    }
    if tail > acc[0] {
        tail
    } else {
        acc[0]
    }
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
    let mut tail = T::ZERO;
    for v in cx.into_remainder().iter_mut() {
        let e = (*v - m).exp();
        *v = e;
        tail += e;
    }
    reduce_lanes(acc) + tail
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

/// `n` values for an op's output, written by `fill` and not zero-filled first: each kernel
/// writes every value of its output, and zeroing a training step's outputs (SwiGLU, norms,
/// RoPE) took 1-2% of the step on the thread the other cores wait for.
///
/// # Safety
/// `fill` must write every one of the `n` values of the slice it is given before reading any
/// (any bits written are a valid `f32` / `f64`).
pub(crate) unsafe fn filled_vec<T: Float>(n: usize, fill: impl FnOnce(&mut [T])) -> Vec<T> {
    let mut v = Vec::<T>::with_capacity(n);
    fill(std::slice::from_raw_parts_mut(v.as_mut_ptr(), n));
    v.set_len(n);
    v
}

/// `dst (m × n, row-major) = [dst +] beta · lhs (m × k, row-major) · R` on rayon's threads,
/// where R's element `(kk, j)` is `rhs[kk * rhs_rs + j * rhs_cs]`. One call of gemm as candle's
/// matmul makes it, with the sum written into (`accumulate`) the destination instead of added
/// by a separate pass: `dst + 1 · acc` rounds once, as `dst + (acc)` does. With `accumulate`
/// off, `dst` is only written (it may be uninitialised memory, see [`filled_vec`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into(
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) -> Result<()> {
    let rhs_needed = match (k, n) {
        (0, _) | (_, 0) => 0,
        _ => (k - 1) * rhs_rs + (n - 1) * rhs_cs + 1,
    };
    if dst.len() != m * n || lhs.len() != m * k || rhs.len() < rhs_needed {
        bail!(
            "internal error: product shapes ({m} x {k}) x ({k} x {n}) do not match buffers of {}, {} and {} values",
            lhs.len(),
            rhs.len(),
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the bounds were checked above (row-major dst and lhs, rhs through its strides);
    // `dst` is borrowed mutably, so nothing else touches it during the call.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        )
    }
    Ok(())
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
pub(crate) fn contiguous<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
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
pub(crate) fn cpu_contiguous<'a, T: WithDType>(
    s: &'a Storage,
    l: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => contiguous(c, l, op),
        _ => bail!("{op}: internal error: expected a CPU tensor"),
    }
}

/// Wraps a kernel's output as a (non-tracked) tensor on the CPU.
pub(crate) fn tensor_from_vec<T: WithDType>(
    v: Vec<T>,
    shape: &candle_core::Shape,
) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

/// AVX2+FMA kernels for f32. Callers check [`has_avx2`] and the slice bounds first.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ a·b with four independent 8-lane FMA chains.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY (all pointer reads): i + 8 ≤ n ≤ both lengths in the vector loops, i < n in the tail.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * u;
                    *a =
                        _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut r = hsum(v);
            while i < n {
                r += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            r
        }
    }

    /// Σ a·b·c with four independent 8-lane FMA chains.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
        let n = a.len().min(b.len()).min(c.len());
        let (pa, pb, pc) = (a.as_ptr(), b.as_ptr(), c.as_ptr());
        // SAFETY (all pointer reads): i + 8 ≤ n ≤ all lengths in the vector loops, i < n in the tail.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    let o = i + 8 * u;
                    let ab = _mm256_mul_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)));
                    *a = _mm256_fmadd_ps(ab, _mm256_loadu_ps(pc.add(o)), *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let ab = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
                acc[0] = _mm256_fmadd_ps(ab, _mm256_loadu_ps(pc.add(i)), acc[0]);
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut r = hsum(v);
            while i < n {
                r += *pa.add(i) * *pb.add(i) * *pc.add(i);
                i += 1;
            }
            r
        }
    }

    /// `out[j] = scale · ⟨q, row j⟩`, four rows at a time so the four FMA chains are independent
    /// and one combined horizontal reduction serves all four.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(q: &[f32], rows: &[f32], rs: usize, scale: f32, out: &mut [f32]) {
        let d = q.len();
        let n = out.len();
        let d8 = d / 8 * 8;
        let (pq, pr) = (q.as_ptr(), rows.as_ptr());
        // SAFETY: the caller checked (n − 1)·rs + d ≤ rows.len(); all offsets are below that.
        unsafe {
            let tail = |j: usize| -> f32 {
                let mut r = 0f32;
                for x in d8..d {
                    r += *pq.add(x) * *pr.add(j * rs + x);
                }
                r
            };
            let mut j = 0;
            while j + 4 <= n {
                let (r0, r1, r2, r3) = (
                    pr.add(j * rs),
                    pr.add((j + 1) * rs),
                    pr.add((j + 2) * rs),
                    pr.add((j + 3) * rs),
                );
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut x = 0;
                while x < d8 {
                    let qv = _mm256_loadu_ps(pq.add(x));
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0.add(x)), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1.add(x)), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2.add(x)), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3.add(x)), a3);
                    x += 8;
                }
                // [a0 a1 a2 a3] → 4 sums: two rounds of hadd, then fold the 128-bit halves.
                let h01 = _mm256_hadd_ps(a0, a1);
                let h23 = _mm256_hadd_ps(a2, a3);
                let h = _mm256_hadd_ps(h01, h23);
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                let mut sums = [0f32; 4];
                _mm_storeu_ps(sums.as_mut_ptr(), s);
                for (u, sum) in sums.iter().enumerate() {
                    *out.get_unchecked_mut(j + u) = scale * (sum + tail(j + u));
                }
                j += 4;
            }
            while j < n {
                let r = pr.add(j * rs);
                let mut a = _mm256_setzero_ps();
                let mut x = 0;
                while x < d8 {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(x)), _mm256_loadu_ps(r.add(x)), a);
                    x += 8;
                }
                *out.get_unchecked_mut(j) = scale * (hsum(a) + tail(j));
                j += 1;
            }
        }
    }

    /// `out += Σ_j p[j] · row j`: `out` is walked in blocks of 64 floats held in eight registers
    /// while all rows stream past, so `out` is loaded and stored once per block, not once per row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_rows(out: &mut [f32], p: &[f32], rows: &[f32], rs: usize) {
        let d = out.len();
        let n = p.len();
        let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
        // SAFETY: the caller checked (n − 1)·rs + d ≤ rows.len(); column offsets are < d.
        unsafe {
            let mut x = 0;
            while x + 64 <= d {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(po.add(x + 8 * u));
                }
                for j in 0..n {
                    let pj = _mm256_set1_ps(*p.get_unchecked(j));
                    let r = pr.add(j * rs + x);
                    for (u, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(pj, _mm256_loadu_ps(r.add(8 * u)), *a);
                    }
                }
                for (u, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(po.add(x + 8 * u), *a);
                }
                x += 64;
            }
            while x + 8 <= d {
                let mut a = _mm256_loadu_ps(po.add(x));
                for j in 0..n {
                    a = _mm256_fmadd_ps(
                        _mm256_set1_ps(*p.get_unchecked(j)),
                        _mm256_loadu_ps(pr.add(j * rs + x)),
                        a,
                    );
                }
                _mm256_storeu_ps(po.add(x), a);
                x += 8;
            }
            while x < d {
                let mut a = *po.add(x);
                for j in 0..n {
                    a += *p.get_unchecked(j) * *pr.add(j * rs + x);
                }
                *po.add(x) = a;
                x += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_rows(q: &[f64], rows: &[f64], rs: usize, n: usize) -> Vec<f64> {
        (0..n)
            .map(|j| {
                q.iter()
                    .enumerate()
                    .map(|(x, qv)| qv * rows[j * rs + x])
                    .sum()
            })
            .collect()
    }

    /// The AVX2 row kernels (f32) and the portable ones (f64) against plain loops, over head
    /// dims that hit the 64-float blocks, the 8-float steps and the scalar tails.
    #[test]
    fn row_kernels_match_naive_loops() {
        for (d, n, extra) in [
            (64usize, 9usize, 0usize),
            (5, 3, 2),
            (70, 6, 3),
            (13, 1, 0),
            (136, 5, 8),
            (64, 0, 0),
        ] {
            let rs = d + extra;
            let rows64: Vec<f64> = (0..(n.max(1)) * rs)
                .map(|i| ((i * 37 % 101) as f64 - 50.0) / 25.0)
                .collect();
            let q64: Vec<f64> = (0..d).map(|i| ((i * 11 % 7) as f64 - 3.0) / 2.0).collect();
            let p64: Vec<f64> = (0..n).map(|j| (j as f64 + 1.0) / 7.0).collect();
            let want = naive_rows(&q64, &rows64, rs, n);
            let mut want_acc: Vec<f64> = (0..d).map(|x| x as f64 * 0.5).collect();
            for j in 0..n {
                for x in 0..d {
                    want_acc[x] += p64[j] * rows64[j * rs + x];
                }
            }
            // f64: portable path.
            let mut got = vec![0f64; n];
            dot_rows(&q64, &rows64, rs, 1.0, &mut got);
            let mut acc: Vec<f64> = (0..d).map(|x| x as f64 * 0.5).collect();
            axpy_rows(&mut acc, &p64, &rows64, rs);
            for (a, b) in got.iter().zip(&want).chain(acc.iter().zip(&want_acc)) {
                assert!((a - b).abs() < 1e-12, "f64 d={d} n={n}: {a} vs {b}");
            }
            // f32: AVX2 path on this machine.
            let f = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
            let mut got = vec![0f32; n];
            dot_rows(&f(&q64), &f(&rows64), rs, 2.0, &mut got);
            let mut acc: Vec<f32> = (0..d).map(|x| x as f32 * 0.5).collect();
            axpy_rows(&mut acc, &f(&p64), &f(&rows64), rs);
            for (a, b) in got
                .iter()
                .zip(want.iter().map(|w| 2.0 * w))
                .chain(acc.iter().zip(want_acc.iter().copied()))
            {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "f32 d={d} n={n}: {a} vs {b}"
                );
            }
            let d3 = dot3(&f(&q64), &f(&rows64[..d]), &f(&rows64[..d]));
            let want3: f64 = (0..d).map(|x| q64[x] * rows64[x] * rows64[x]).sum();
            assert!((d3 as f64 - want3).abs() < 1e-4 * (1.0 + want3.abs()));
            let dd = dot(&f(&q64), &f(&rows64[..d]));
            assert!(
                (dd as f64 - naive_rows(&q64, &rows64, rs, 1)[0]).abs()
                    < 1e-4 * (1.0 + dd.abs() as f64)
            );
        }
    }

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
