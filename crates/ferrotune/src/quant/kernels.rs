//! Kernel dispatch: picks the instruction set once at run time and offers safe, slice-based
//! entry points (single-threaded; `mod.rs` splits the work across threads).
use super::format::{self, ActInt, Fmt, QAct, QK};
use std::sync::OnceLock;

/// The instruction-set level a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (on top of AVX2).
    Avx512,
}

impl Isa {
    /// Whether this CPU can run kernels of this level.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => super::x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => super::x86::has_avx512(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best level this CPU supports, capped by `FERROTUNE_QUANT_ISA` (`scalar`, `avx2`,
    /// `avx512`) when set, which is how to check a slower path end to end.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("FERROTUNE_QUANT_ISA").as_deref() {
                Ok("scalar") => Isa::Scalar,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            [Isa::Avx512, Isa::Avx2, Isa::Scalar]
                .into_iter()
                .find(|i| *i <= cap && i.available())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// Quantise `rows` activation rows of `k` values each (`k` a multiple of 32).
#[cfg(test)]
pub(crate) fn quantize_act<T: ActInt>(isa: Isa, x: &[f32], rows: usize, k: usize) -> QAct<T> {
    assert_eq!(x.len(), rows * k);
    let mut act = QAct::zeros(rows, k);
    quantize_into(isa, x, &mut act.qs, &mut act.ds);
    act
}

/// Quantise whole blocks of `x` into `q` / `ds` (used per row range by the threaded callers).
pub(crate) fn quantize_into<T: ActInt>(isa: Isa, x: &[f32], q: &mut [T], ds: &mut [[f32; 2]]) {
    assert!(x.len().is_multiple_of(QK) && q.len() == x.len() && ds.len() * QK == x.len());
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports the level (checked above); lengths checked above; `q` holds
        // `x.len()` values of the type `T::PREC` names.
        Isa::Avx2 | Isa::Avx512 => unsafe {
            use super::{format::ActPrecision, x86::*};
            let qp = q.as_mut_ptr() as *mut u8;
            match (T::PREC, isa) {
                (ActPrecision::I8 | ActPrecision::LlamaCpp, Isa::Avx2) => quantize_avx2(x, qp, ds),
                (ActPrecision::I8 | ActPrecision::LlamaCpp, _) => quantize_avx512(x, qp, ds),
                (ActPrecision::I16, Isa::Avx2) => quantize16_avx2(x, qp, ds),
                (ActPrecision::I16, _) => quantize16_avx512(x, qp, ds),
            }
        },
        _ => {
            for ((xb, qb), d) in x
                .chunks_exact(QK)
                .zip(q.chunks_exact_mut(QK))
                .zip(ds.iter_mut())
            {
                *d = format::quantize_block_scalar(xb, qb);
            }
        }
    }
}

/// Dequantise whole blocks of `fmt` (`out.len() == 32 * bytes.len() / block_bytes`).
pub(crate) fn dequant(isa: Isa, fmt: Fmt, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(out.len() * fmt.block_bytes(), bytes.len() * QK);
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: lengths checked above; the CPU supports AVX2 (implied by either level).
        Isa::Avx2 | Isa::Avx512 => unsafe { super::x86::dequant_avx2(fmt, bytes, out) },
        _ => format::dequant_blocks(fmt, bytes, out),
    }
}

/// `out[i] = W[i, :] . x` for `out.len()` weight rows starting at the beginning of `w`, with
/// `x` = activation row `ar` of `act`.
pub(crate) fn gemv<T: ActInt>(
    isa: Isa,
    fmt: Fmt,
    w: &[u8],
    act: &QAct<T>,
    ar: usize,
    out: &mut [f32],
) {
    let nb = act.nb();
    assert!(ar < act.rows && w.len() >= out.len() * nb * fmt.block_bytes());
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            let (aq, ads) = (act.row_qs(ar).as_ptr(), act.row_ds(ar).as_ptr());
            let (n, wp, op) = (out.len(), w.as_ptr(), out.as_mut_ptr());
            use super::{format::ActPrecision, x86::*};
            // SAFETY: `w` holds `n` rows of `nb` blocks and `act` row `ar` holds `nb` blocks
            // (asserted above); the CPU supports the level; `T` is the type `T::PREC` names.
            unsafe {
                match (T::PREC, isa) {
                    (ActPrecision::I8 | ActPrecision::LlamaCpp, Isa::Avx2) => {
                        gemv_avx2(fmt, wp, n, nb, aq as _, ads, op)
                    }
                    (ActPrecision::I8 | ActPrecision::LlamaCpp, _) => {
                        gemv_avx512(fmt, wp, n, nb, aq as _, ads, op)
                    }
                    (ActPrecision::I16, Isa::Avx2) => gemv16_avx2(fmt, wp, n, nb, aq as _, ads, op),
                    (ActPrecision::I16, _) => gemv16_avx512(fmt, wp, n, nb, aq as _, ads, op),
                }
            }
        }
        _ => format::gemv_scalar(fmt, w, act, ar, out),
    }
}

/// `out[r * ldo + c] = W[c, :] . x_r` for every activation row `r` of `act` and weight rows
/// `c < n_w` at the start of `w`.
///
/// # Safety
/// `out` must be valid for writes at `r * ldo + c` for all `r < act.rows`, `c < n_w`, and no
/// other thread may access those elements during the call.
pub(crate) unsafe fn gemm<T: ActInt>(
    isa: Isa,
    fmt: Fmt,
    w: &[u8],
    n_w: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.nb();
    let row_bytes = nb * fmt.block_bytes();
    assert!(w.len() >= n_w * row_bytes && n_w <= ldo);
    assert!(act.qs.len() == act.rows * act.k && act.ds.len() == act.rows * nb);
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    if n_w == 0 || act.rows == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            use super::{format::ActPrecision, x86::*};
            let a = ActPtrs {
                qs: act.qs.as_ptr() as *const u8,
                ds: act.ds.as_ptr(),
                rows: act.rows,
                k: act.k,
            };
            let wp = w.as_ptr();
            // SAFETY: `w` and `act` bounds asserted above, `out` per the contract; the CPU
            // supports the level; `T` is the type `T::PREC` names.
            match (T::PREC, isa) {
                (ActPrecision::I8 | ActPrecision::LlamaCpp, Isa::Avx2) => {
                    gemm_avx2(fmt, wp, n_w, a, out, ldo)
                }
                (ActPrecision::I8 | ActPrecision::LlamaCpp, _) => {
                    gemm_avx512(fmt, wp, n_w, a, out, ldo)
                }
                (ActPrecision::I16, Isa::Avx2) => gemm16_avx2(fmt, wp, n_w, a, out, ldo),
                (ActPrecision::I16, _) => gemm16_avx512(fmt, wp, n_w, a, out, ldo),
            }
        }
        _ => format::gemm_scalar(fmt, w, n_w, act, out, ldo),
    }
}

/// [`gemm`] for Q8_0 weight rows whose values all lie in -63..=63 ([`narrow_q8_backward`]
/// copies): with 8-bit activations at AVX2 (without VNNI) a kernel that needs no sign step;
/// otherwise the Q8_0 kernel.
///
/// # Safety
/// As [`gemm`]; and every weight value of `w` must lie in -63..=63.
pub(crate) unsafe fn gemm_q8_narrow<T: ActInt>(
    isa: Isa,
    w: &[u8],
    n_w: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && T::PREC == format::ActPrecision::I8 && n_w > 0 && act.rows > 0 {
        let nb = act.nb();
        assert!(w.len() >= n_w * nb * Fmt::Q8_0.block_bytes() && n_w <= ldo);
        assert!(act.qs.len() == act.rows * act.k && act.ds.len() == act.rows * nb);
        assert!(
            isa.available(),
            "Avx2 kernels are not supported on this CPU"
        );
        let a = super::x86::ActPtrs {
            qs: act.qs.as_ptr() as *const u8,
            ds: act.ds.as_ptr(),
            rows: act.rows,
            k: act.k,
        };
        // SAFETY: bounds asserted above, `out` and the value range per the contract.
        return super::x86::gemm_q8_narrow_avx2(w.as_ptr(), n_w, a, out, ldo);
    }
    gemm(isa, Fmt::Q8_0, w, n_w, act, out, ldo)
}

/// Whether the backward pass's transposed weight copies are built with Q8_0 values narrowed to
/// -63..=63 ([`gemm_q8_narrow`]): at the AVX2 level (no VNNI), where full-range signed 8-bit
/// products need a sign step that costs a fifth of the kernel's speed. One bit of the copy's
/// precision is the price: it carries the input gradient only (the forward keeps its weights),
/// for a 4-bit base the copy's rounding error stays an order of magnitude below the base's own.
pub(crate) fn narrow_q8_backward() -> bool {
    Isa::best() == Isa::Avx2
}

/// `out[r * ldo + c] = W[c, :] . x_r` for every activation row `r` of `act` and weight rows
/// `c < n_w` at the start of `w`, each output computed exactly as [`gemv`] computes it for that
/// activation row alone (bit-identical), with each weight block read once for all rows.
///
/// # Safety
/// As [`gemm`]: `out` must be valid for writes at `r * ldo + c` for all `r < act.rows`,
/// `c < n_w`, and no other thread may access those elements during the call.
pub(crate) unsafe fn gemv_multi<T: ActInt>(
    isa: Isa,
    fmt: Fmt,
    w: &[u8],
    n_w: usize,
    act: &QAct<T>,
    out: *mut f32,
    ldo: usize,
) {
    let nb = act.nb();
    let row_bytes = nb * fmt.block_bytes();
    assert!(w.len() >= n_w * row_bytes && n_w <= ldo);
    assert!(act.qs.len() == act.rows * act.k && act.ds.len() == act.rows * nb);
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    if n_w == 0 || act.rows == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            use super::{format::ActPrecision, x86::*};
            let a = ActPtrs {
                qs: act.qs.as_ptr() as *const u8,
                ds: act.ds.as_ptr(),
                rows: act.rows,
                k: act.k,
            };
            let wp = w.as_ptr();
            // SAFETY: `w` and `act` bounds asserted above, `out` per the contract; the CPU
            // supports the level; `T` is the type `T::PREC` names.
            match (T::PREC, isa) {
                (ActPrecision::I8 | ActPrecision::LlamaCpp, Isa::Avx2) => {
                    gemv_multi_avx2(fmt, wp, n_w, a, out, ldo)
                }
                (ActPrecision::I8 | ActPrecision::LlamaCpp, _) => {
                    gemv_multi_avx512(fmt, wp, n_w, a, out, ldo)
                }
                (ActPrecision::I16, Isa::Avx2) => gemv16_multi_avx2(fmt, wp, n_w, a, out, ldo),
                (ActPrecision::I16, _) => gemv16_multi_avx512(fmt, wp, n_w, a, out, ldo),
            }
        }
        _ => {
            // The portable path: `gemv`'s own per-row dot product, row by row.
            let (aq, ads) = (&act.qs, &act.ds);
            for r in 0..act.rows {
                let (q, d) = (&aq[r * act.k..(r + 1) * act.k], &ads[r * nb..(r + 1) * nb]);
                for c in 0..n_w {
                    let v =
                        format::dot_row_scalar(fmt, &w[c * row_bytes..(c + 1) * row_bytes], q, d);
                    *out.add(r * ldo + c) = v;
                }
            }
        }
    }
}

/// `out[r * ldo + c] = W[c, :] . x_r` for the `m` f32 activation rows of `x` (`k` values each)
/// and weight rows `c < n_w` at the start of `w`, with the weights dequantised to f32 in
/// registers and f32 FMAs (`DecodeArith::F32`): no activation rounding, and each output is
/// bit-identical whatever `m`, the other rows and the kernel level (the portable path
/// reproduces the SIMD lane order).
///
/// # Safety
/// As [`gemm`]: `out` must be valid for writes at `r * ldo + c` for all `r < m`, `c < n_w`,
/// and no other thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_f32(
    isa: Isa,
    fmt: Fmt,
    w: &[u8],
    n_w: usize,
    x: &[f32],
    m: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    assert!(k.is_multiple_of(QK) && x.len() == m * k);
    let nb = k / QK;
    let row_bytes = nb * fmt.block_bytes();
    assert!(w.len() >= n_w * row_bytes && n_w <= ldo);
    assert!(
        isa.available(),
        "{isa:?} kernels are not supported on this CPU"
    );
    if n_w == 0 || m == 0 {
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `w` and `x` bounds asserted above, `out` per the contract; the CPU supports
        // AVX2 + FMA + F16C (implied by either level).
        Isa::Avx2 | Isa::Avx512 => {
            super::x86::gemv_f32_avx2(fmt, w.as_ptr(), n_w, nb, x.as_ptr(), m, k, out, ldo)
        }
        _ => {
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                for c in 0..n_w {
                    let v =
                        format::dot_row_f32_scalar(fmt, &w[c * row_bytes..(c + 1) * row_bytes], xr);
                    *out.add(r * ldo + c) = v;
                }
            }
        }
    }
}
