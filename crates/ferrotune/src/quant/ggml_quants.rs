//! GGML's reference quantizers (`ggml/src/ggml-quants.c`: `quantize_row_q4_0_ref` ...
//! `quantize_row_q6_K_ref`), ported line by line so that a GGUF we write holds the bytes
//! llama.cpp's `llama_model_quantize` writes for the same f32 input: without an importance
//! matrix, `ggml_quantize_chunk` -> `quantize_q4_K` etc. take these `_ref` paths.
//!
//! Every float operation is kept in f32 and in C's evaluation order (`w*l*x` is `(w*l)*x`), and
//! `nearest_int` is GGML's magic-number rounding (ties to even), so the results are bit-exact;
//! `tests/fixtures/gguf_quants/` (written by `reference/gguf_quant_fixtures.py` through the
//! ggml library llama-cpp-python ships) holds us to that.
use half::{bf16, f16};
use rayon::prelude::*;

/// The tensor types a GGUF export writes (ggml's `enum ggml_type` values in [`GgmlType::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Values per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

impl GgmlType {
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// ggml's type id, as a GGUF tensor entry stores it.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_K",
            GgmlType::Q5K => "q5_K",
            GgmlType::Q6K => "q6_K",
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of one row of `n` values (`ggml_row_size`); `n` must be a multiple of the block.
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// candle's name for the type (our GGUF reader hands tensors to candle).
    pub fn to_candle(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as C;
        match self {
            GgmlType::F32 => C::F32,
            GgmlType::F16 => C::F16,
            GgmlType::BF16 => C::BF16,
            GgmlType::Q4_0 => C::Q4_0,
            GgmlType::Q4_1 => C::Q4_1,
            GgmlType::Q5_0 => C::Q5_0,
            GgmlType::Q5_1 => C::Q5_1,
            GgmlType::Q8_0 => C::Q8_0,
            GgmlType::Q4K => C::Q4K,
            GgmlType::Q5K => C::Q5K,
            GgmlType::Q6K => C::Q6K,
        }
    }
}

/// Encode `x` (rows of `n_per_row` values) as `t`: the bytes a GGUF tensor of that type holds.
/// Rows are independent, so they are encoded in parallel; the result does not depend on it.
/// `n_per_row` must be a positive multiple of `t`'s block size and divide `x.len()`.
pub fn quantize_rows(t: GgmlType, x: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    let bs = t.block_size();
    if n_per_row == 0 || !n_per_row.is_multiple_of(bs) || !x.len().is_multiple_of(n_per_row) {
        return Err(format!(
            "{}: rows of {n_per_row} values are not a whole number of {bs}-value blocks (or {} values are not whole rows)",
            t.name(),
            x.len()
        ));
    }
    let rb = t.row_bytes(n_per_row);
    let n_rows = x.len() / n_per_row;
    let mut out = vec![0u8; n_rows * rb];
    // About 64k values per task: enough work to amortise the hand-off.
    let rows_per_task = (65_536 / n_per_row).max(1);
    out.par_chunks_mut(rb * rows_per_task)
        .zip(x.par_chunks(n_per_row * rows_per_task))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_exact_mut(rb).zip(xs.chunks_exact(n_per_row)) {
                quantize_row(t, xrow, orow);
            }
        });
    Ok(out)
}

/// One row (a whole number of blocks) into `out` (exactly its bytes).
fn quantize_row(t: GgmlType, x: &[f32], out: &mut [u8]) {
    let bs = t.block_size();
    let ts = t.type_size();
    match t {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&fp32_to_bf16(*v).to_le_bytes());
            }
        }
        _ => {
            for (xb, ob) in x.chunks_exact(bs).zip(out.chunks_exact_mut(ts)) {
                match t {
                    GgmlType::Q4_0 => q4_0(xb, ob),
                    GgmlType::Q4_1 => q4_1(xb, ob),
                    GgmlType::Q5_0 => q5_0(xb, ob),
                    GgmlType::Q5_1 => q5_1(xb, ob),
                    GgmlType::Q8_0 => q8_0(xb, ob),
                    GgmlType::Q4K => q4_k(xb, ob),
                    GgmlType::Q5K => q5_k(xb, ob),
                    GgmlType::Q6K => q6_k(xb, ob),
                    _ => unreachable!("float types handled above"),
                }
            }
        }
    }
}

/// ggml's `GGML_FP32_TO_BF16` (round to nearest even; a NaN stays a quiet NaN), as the `gguf`
/// package's numpy conversion writes it.
pub fn fp32_to_bf16(v: f32) -> bf16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return bf16::from_bits(((u >> 16) | 64) as u16);
    }
    bf16::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16)
}

fn put_f16(out: &mut [u8], v: f32) {
    out[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn fp16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// GGML's `nearest_int`: round to nearest, ties to even, through the float's mantissa
/// (valid for |v| <= 4194303, as GGML asserts).
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0f32;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// The value of largest magnitude (the first one on ties) and its magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, d);
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = ((x0 + 8.5) as i8).min(15) as u8;
        let xi1 = ((x1 + 8.5) as i8).min(15) as u8;
        y[2 + j] = xi0 | (xi1 << 4);
    }
}

fn q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[0..2], d);
    put_f16(&mut y[2..4], min);
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let xi0 = ((x0 + 0.5) as i8).min(15) as u8;
        let xi1 = ((x1 + 0.5) as i8).min(15) as u8;
        y[4 + j] = xi0 | (xi1 << 4);
    }
}

fn q5_0(x: &[f32], y: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = x[j] * id;
        let x1 = x[16 + j] * id;
        let xi0 = ((x0 + 16.5) as i8).min(31) as u8;
        let xi1 = ((x1 + 16.5) as i8).min(31) as u8;
        y[6 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(&mut y[0..2], d);
    put_f16(&mut y[2..4], min);
    let mut qh = 0u32;
    for j in 0..16 {
        let x0 = (x[j] - min) * id;
        let x1 = (x[16 + j] - min) * id;
        let xi0 = (x0 + 0.5) as u8;
        let xi1 = (x1 + 0.5) as u8;
        y[8 + j] = (xi0 & 0x0f) | ((xi1 & 0x0f) << 4);
        qh |= (((xi0 & 0x10) >> 4) as u32) << j;
        qh |= (((xi1 & 0x10) >> 4) as u32) << (j + 16);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(y, d);
    for j in 0..32 {
        y[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
}

/// `make_qkx2_quants`: scale and (negated) min of an asymmetric `nmax`-level fit, weighted,
/// searching `nstep + 1` scales around the plain one. Fills `l` with the levels.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min));
        l[i] = li.clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        let diff = diff * diff;
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let w = weights[i];
            let lf = li as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                let diff = diff * diff;
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights (what `quantize_row_q6_K_ref`
/// calls): a symmetric fit of levels `-nmax..nmax-1` weighted by `x^2`, searching 18 scales.
/// `l` gets the levels offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let n = x.len();
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (li + nmax) as i8;
        let w = x[i] * x[i];
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let li = nearest_int(iscale * xi).clamp(-nmax, nmax - 1);
            let w = xi * xi;
            let lf = li as f32;
            sumlx += w * xi * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (nmax + li) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` from a K-quant's 12 bytes.
fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The shared first half of Q4_K and Q5_K: per 32-value sub-block an asymmetric fit with
/// `nmax` levels, the 6-bit scales and mins packed into `scales` (12 bytes), `d`/`dmin`
/// returned, and the final levels in `l`.
#[allow(clippy::too_many_arguments)]
fn k_scales_mins(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    scales_out: &mut [u8],
    l: &mut [u8; QK_K],
) -> (f32, f32) {
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; QK_K / 32];
    let mut scales = [0f32; QK_K / 32];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            rdelta,
            nstep,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    scales_out[..12].fill(0);
    for j in 0..QK_K / 32 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            scales_out[j] = ls;
            scales_out[j + 4] = lm;
        } else {
            scales_out[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            scales_out[j - 4] |= (ls >> 4) << 6;
            scales_out[j] |= (lm >> 4) << 6;
        }
    }
    let d = fp16_round(max_scale / 63.0);
    let dmin = fp16_round(max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (sc, m) = get_scale_min_k4(j, scales_out);
        let dd = d * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for ii in 0..32 {
            let li = nearest_int((x[32 * j + ii] + dm) / dd);
            l[32 * j + ii] = li.clamp(0, nmax) as u8;
        }
    }
    (max_scale / 63.0, max_min / 63.0)
}

/// Q4_K: d, dmin (f16), scales[12], qs[128].
fn q4_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (d, dmin) = k_scales_mins(x, 15, -1.0, 0.1, 20, &mut y[4..16], &mut l);
    put_f16(&mut y[0..2], d);
    put_f16(&mut y[2..4], dmin);
    let q = &mut y[16..144];
    for (jb, j) in (0..QK_K).step_by(64).enumerate() {
        for k in 0..32 {
            q[32 * jb + k] = l[j + k] | (l[j + k + 32] << 4);
        }
    }
}

/// Q5_K: d, dmin (f16), scales[12], qh[32], qs[128].
fn q5_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (d, dmin) = k_scales_mins(x, 31, -0.5, 0.1, 15, &mut y[4..16], &mut l);
    put_f16(&mut y[0..2], d);
    put_f16(&mut y[2..4], dmin);
    let (qh, ql) = y[16..176].split_at_mut(32);
    qh.fill(0);
    let (mut m1, mut m2) = (1u8, 2u8);
    for (nb, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let mut l1 = l[n + j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = l[n + j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql[32 * nb + j] = l1 | (l2 << 4);
        }
        m1 <<= 2;
        m2 <<= 2;
    }
}

/// Q6_K: ql[128], qh[64], scales[16] (i8), d (f16).
fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..QK_K / 16 {
        let s = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < 1e-15 {
        y.fill(0);
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d = fp16_round(1.0 / iscale);
    y[208..210].copy_from_slice(&f16::from_f32(1.0 / iscale).to_le_bytes());
    let mut sc = [0i8; QK_K / 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        y[192 + ib] = sc[ib] as u8;
    }
    for j in 0..QK_K / 16 {
        let dd = d * sc[j] as f32;
        if dd == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let li = nearest_int(x[16 * j + ii] / dd).clamp(-32, 31);
            l[16 * j + ii] = (li + 32) as i8;
        }
    }
    let lu = |i: usize| l[i] as u8;
    for (half, j) in (0..QK_K).step_by(128).enumerate() {
        let ql = 64 * half;
        let qh = 128 + 32 * half;
        for k in 0..32 {
            let q1 = lu(j + k) & 0xf;
            let q2 = lu(j + k + 32) & 0xf;
            let q3 = lu(j + k + 64) & 0xf;
            let q4 = lu(j + k + 96) & 0xf;
            y[ql + k] = q1 | (q3 << 4);
            y[ql + k + 32] = q2 | (q4 << 4);
            y[qh + k] = (lu(j + k) >> 4)
                | ((lu(j + k + 32) >> 4) << 2)
                | ((lu(j + k + 64) >> 4) << 4)
                | ((lu(j + k + 96) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/gguf_quants")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn input() -> (Vec<f32>, usize) {
        let meta: serde_json::Value = serde_json::from_slice(&fixture("meta.json")).unwrap();
        let n = meta["n_per_row"].as_u64().unwrap() as usize;
        let x: Vec<f32> = fixture("input.f32")
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(x.len(), n * meta["rows"].as_u64().unwrap() as usize);
        (x, n)
    }

    /// Our bytes equal ggml's (`ggml_quantize_chunk` of llama-cpp-python's build) for every
    /// type; a mismatch names the first differing block.
    #[test]
    fn quantizers_match_ggml_bytes() {
        let (x, n) = input();
        for (t, file) in [
            (GgmlType::Q4_0, "q4_0.bin"),
            (GgmlType::Q4_1, "q4_1.bin"),
            (GgmlType::Q5_0, "q5_0.bin"),
            (GgmlType::Q5_1, "q5_1.bin"),
            (GgmlType::Q8_0, "q8_0.bin"),
            (GgmlType::Q4K, "q4_K.bin"),
            (GgmlType::Q5K, "q5_K.bin"),
            (GgmlType::Q6K, "q6_K.bin"),
            (GgmlType::BF16, "bf16.bin"),
        ] {
            let want = fixture(file);
            let got = quantize_rows(t, &x, n).unwrap();
            assert_eq!(got.len(), want.len(), "{t:?}");
            if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
                panic!(
                    "{t:?}: first differing byte {i} (block {}, byte {} in it): ours {} ggml {}",
                    i / t.type_size(),
                    i % t.type_size(),
                    got[i],
                    want[i]
                );
            }
        }
    }

    /// Through candle's dequantizers, each type gives back the input to within its precision.
    #[test]
    fn quantized_rows_decode_close_to_the_input() {
        let (x, n) = input();
        for (t, tol) in [
            (GgmlType::Q8_0, 0.01),
            (GgmlType::Q6K, 0.03),
            (GgmlType::Q5K, 0.06),
            (GgmlType::Q5_0, 0.06),
            (GgmlType::Q4K, 0.12),
            (GgmlType::Q4_0, 0.15),
        ] {
            let bytes = quantize_rows(t, &x, n).unwrap();
            let q = candle_core::quantized::QTensor::new(
                candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Borrowed(&bytes),
                    &candle_core::Device::Cpu,
                    t.to_candle(),
                )
                .unwrap(),
                (x.len() / n, n),
            )
            .unwrap();
            let back = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Relative to each row's spread (row 2 holds a 40.0 outlier).
            for (r, (a, b)) in x.chunks(n).zip(back.chunks(n)).enumerate() {
                let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    err <= tol * spread,
                    "{t:?} row {r}: max error {err} vs spread {spread}"
                );
            }
        }
    }

    #[test]
    fn bad_row_lengths_are_refused() {
        let e = quantize_rows(GgmlType::Q4K, &[0.0; 576], 576).unwrap_err();
        assert!(e.contains("576") && e.contains("256"), "{e}");
        assert!(quantize_rows(GgmlType::Q8_0, &[0.0; 33], 32).is_err());
        assert!(quantize_rows(GgmlType::F16, &[1.0; 3], 3).is_ok());
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-2.6), -3);
        assert_eq!(nearest_int(63.49), 63);
    }
}
