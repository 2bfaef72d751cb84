//! Storage and kernels for the bitsandbytes weight formats inside a [`super::QuantWeight`]:
//! 4-bit codes looked up in a 16-entry table (NF4, FP4) with one absmax per block of 64 values,
//! optionally itself 8-bit quantized ("double quantization"), and LLM.int8's row-wise int8.
//!
//! Layout (as bitsandbytes stores a weight, see `quant::bnb`): the `(out, in)` matrix flattened
//! row-major, two codes per byte with the first value in the high nibble, one absmax per
//! `blocksize` consecutive values. When `in` is a multiple of the blocksize every block lies in
//! one row, so rows can be decoded on their own: that is what the kernels need, and the
//! constructors refuse other shapes (the loader keeps those weights dense).
//!
//! Compute: unlike the GGML formats, the table values are not integers, so there is no integer
//! dot product to run. A row block decodes to f32 (`table[code] * absmax`, the same single f32
//! product bitsandbytes' `dequantize_4bit` computes, so decoded values are bit-identical), with
//! the table lookup done in registers: AVX2 selects from two 8-entry halves with
//! `vpermps` + `vblendvps` on the code's bit 3; AVX-512 does all 16 entries with one
//! `vpermps zmm`. Decode (one activation row) decodes each weight row into L1 and takes its dot
//! product with the input; batched work (prefill, training) decodes tiles of rows to f32 and
//! multiplies them with gemm, so the decoding costs `out * in` per call against the
//! `m * out * in` multiply-adds, and the multiply runs at f32 GEMM speed.
use super::kernels::Isa;

/// The per-block absmax of a 4-bit weight.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockScales {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization (QLoRA): the absmax values minus their mean `offset`, 8-bit
    /// quantized in blocks of `nested_blocksize` with bitsandbytes' dynamic code `code`; absmax
    /// `i` is `code[codes[i]] * nested_absmax[i / nested_blocksize] + offset`, in f32, as
    /// `dequantize_blockwise` followed by `+= offset` computes it.
    Nested {
        codes: Vec<u8>,
        code: Box<[f32; 256]>,
        nested_absmax: Vec<f32>,
        nested_blocksize: usize,
        offset: f32,
    },
}

impl BlockScales {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            BlockScales::Plain(v) => v.len(),
            BlockScales::Nested { codes, .. } => codes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absmax of block `i`.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            BlockScales::Plain(v) => v[i],
            BlockScales::Nested {
                codes,
                code,
                nested_absmax,
                nested_blocksize,
                offset,
            } => code[codes[i] as usize] * nested_absmax[i / nested_blocksize] + offset,
        }
    }

    /// Bytes held.
    pub fn storage_bytes(&self) -> usize {
        match self {
            BlockScales::Plain(v) => v.len() * 4,
            BlockScales::Nested {
                codes,
                nested_absmax,
                ..
            } => codes.len() + nested_absmax.len() * 4 + 256 * 4 + 4,
        }
    }

    /// Checks the nested statistics cover `blocks` blocks.
    fn check(&self, blocks: usize) -> Result<(), String> {
        if self.len() != blocks {
            return Err(format!("{} absmax values for {blocks} blocks", self.len()));
        }
        if let BlockScales::Nested {
            nested_absmax,
            nested_blocksize,
            ..
        } = self
        {
            if *nested_blocksize == 0 || nested_absmax.len() != blocks.div_ceil(*nested_blocksize) {
                return Err(format!(
                    "{} nested absmax values for {blocks} blocks in groups of {nested_blocksize}",
                    nested_absmax.len()
                ));
            }
        }
        Ok(())
    }
}

/// A 4-bit (NF4 / FP4) weight as bitsandbytes stores it (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct FourBitWeight {
    /// The 16 code values (bitsandbytes' NF4 or FP4 table).
    pub table: [f32; 16],
    pub blocksize: usize,
    /// `out * in / 2` bytes.
    pub packed: Vec<u8>,
    pub scales: BlockScales,
}

impl FourBitWeight {
    /// Checks sizes for an `(out, in)` matrix whose rows hold whole blocks.
    pub(crate) fn check(&self, out_dim: usize, in_dim: usize) -> Result<(), String> {
        let bs = self.blocksize;
        if bs == 0 || !bs.is_multiple_of(2) || !in_dim.is_multiple_of(bs) {
            return Err(format!(
                "a {out_dim}x{in_dim} weight in 4-bit blocks of {bs}: the row length must be a multiple of an even block size"
            ));
        }
        let n = out_dim * in_dim;
        if self.packed.len() * 2 != n {
            return Err(format!(
                "{} packed bytes for {n} values (expected {})",
                self.packed.len(),
                n / 2
            ));
        }
        self.scales.check(n / bs)
    }

    pub(crate) fn storage_bytes(&self) -> usize {
        self.packed.len() + self.scales.storage_bytes()
    }

    /// Decode blocks `b0..b1` of row `row` (row length `in_dim`) into `out`.
    pub(crate) fn decode(
        &self,
        isa: Isa,
        in_dim: usize,
        row: usize,
        b0: usize,
        b1: usize,
        out: &mut [f32],
    ) {
        let bs = self.blocksize;
        let nbr = in_dim / bs;
        debug_assert_eq!(out.len(), (b1 - b0) * bs);
        // scales for up to 64 blocks at a time (double quantization decodes them first)
        let mut scales = [0f32; 64];
        let mut b = b0;
        while b < b1 {
            let cnt = (b1 - b).min(64);
            let first = row * nbr + b;
            for (j, s) in scales[..cnt].iter_mut().enumerate() {
                *s = self.scales.get(first + j);
            }
            decode_blocks(
                isa,
                &self.table,
                bs,
                &self.packed[first * bs / 2..(first + cnt) * bs / 2],
                &scales[..cnt],
                &mut out[(b - b0) * bs..(b - b0 + cnt) * bs],
            );
            b += cnt;
        }
    }
}

impl FourBitWeight {
    /// Row `row` as Q8_0 blocks (34 bytes per 32 values; `in_dim` a multiple of 32 and of the
    /// block size): value `j` becomes `f16(absmax / 127) * round(127 * table[code_j])`. For the
    /// training forward with 8-bit activations, which then runs on the integer Q8_0 kernels:
    /// the weight moves by at most half of 1/127 of its block's absmax (plus the f16 rounding
    /// of the scale), the same order as the activations' own 8-bit rounding.
    pub(crate) fn row_to_q8_0(&self, in_dim: usize, row: usize, out: &mut [u8]) {
        let bs = self.blocksize;
        debug_assert!(in_dim.is_multiple_of(32) && bs.is_multiple_of(32));
        debug_assert_eq!(out.len(), in_dim / 32 * 34);
        let mut q = [0i8; 16];
        for (qi, t) in q.iter_mut().zip(&self.table) {
            *qi = (127.0 * t).round().clamp(-127.0, 127.0) as i8;
        }
        let nbr = in_dim / bs;
        let bytes = &self.packed[row * in_dim / 2..(row + 1) * in_dim / 2];
        #[cfg(target_arch = "x86_64")]
        let simd = Isa::best() >= Isa::Avx2;
        #[cfg(not(target_arch = "x86_64"))]
        let simd = false;
        for (j, ob) in out.chunks_exact_mut(34).enumerate() {
            let absmax = self.scales.get(row * nbr + j * 32 / bs);
            let d = half::f16::from_f32(absmax / 127.0);
            ob[..2].copy_from_slice(&d.to_bits().to_le_bytes());
            let src = &bytes[j * 16..(j + 1) * 16];
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 is available (`simd`); 16 source and 32 destination bytes.
                unsafe {
                    x86::codes_to_i8_avx2(&q, src, &mut ob[2..])
                };
                continue;
            }
            for (i, pair) in src.iter().enumerate() {
                ob[2 + 2 * i] = q[(pair >> 4) as usize] as u8;
                ob[3 + 2 * i] = q[(pair & 15) as usize] as u8;
            }
        }
    }
}

/// LLM.int8's weight-only form: one int8 row per output with its absmax (`SCB`); value
/// `(q * scb) / 127` as bitsandbytes' `int8_vectorwise_dequant` computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8RowsWeight {
    pub data: Vec<i8>,
    pub scb: Vec<f32>,
}

/// bitsandbytes multiplies by this f32 constant rather than dividing by 127.
pub const INV_127: f32 = 7.874015718698502e-3f64 as f32;

impl Int8RowsWeight {
    pub(crate) fn check(&self, out_dim: usize, in_dim: usize) -> Result<(), String> {
        if self.data.len() != out_dim * in_dim || self.scb.len() != out_dim {
            return Err(format!(
                "int8 weight {out_dim}x{in_dim}: {} values and {} row scales",
                self.data.len(),
                self.scb.len()
            ));
        }
        Ok(())
    }

    pub(crate) fn storage_bytes(&self) -> usize {
        self.data.len() + self.scb.len() * 4
    }

    pub(crate) fn decode(&self, in_dim: usize, row: usize, c0: usize, c1: usize, out: &mut [f32]) {
        let s = self.scb[row];
        for (o, &q) in out
            .iter_mut()
            .zip(&self.data[row * in_dim + c0..row * in_dim + c1])
        {
            *o = (q as f32 * s) * INV_127;
        }
    }
}

/// `out[j] = table[code_j] * scales[j / bs]` for whole blocks (`packed` holds 2 codes per byte,
/// high nibble first).
pub(crate) fn decode_blocks(
    isa: Isa,
    table: &[f32; 16],
    bs: usize,
    packed: &[u8],
    scales: &[f32],
    out: &mut [f32],
) {
    assert!(packed.len() * 2 == out.len() && scales.len() * bs == out.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if bs.is_multiple_of(32) => {
            // SAFETY: lengths asserted; the CPU has AVX-512 (the caller's `Isa` is available).
            unsafe { x86::decode_avx512(table, bs, packed, scales, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if bs.is_multiple_of(32) => {
            // SAFETY: as above, AVX2.
            unsafe { x86::decode_avx2(table, bs, packed, scales, out) }
        }
        _ => decode_scalar(table, bs, packed, scales, out),
    }
}

pub(crate) fn decode_scalar(
    table: &[f32; 16],
    bs: usize,
    packed: &[u8],
    scales: &[f32],
    out: &mut [f32],
) {
    for (i, &b) in packed.iter().enumerate() {
        let s = scales[2 * i / bs];
        out[2 * i] = table[(b >> 4) as usize] * s;
        out[2 * i + 1] = table[(b & 15) as usize] * s;
    }
}

/// `sum x[i] * y[i]`.
pub(crate) fn dot(isa: Isa, x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::dot_avx2(x, y) },
        _ => x.iter().zip(y).map(|(a, b)| a * b).sum(),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode_avx2(
        table: &[f32; 16],
        bs: usize,
        packed: &[u8],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let lut_lo = _mm256_loadu_ps(table.as_ptr());
        let lut_hi = _mm256_loadu_ps(table.as_ptr().add(8));
        let mask = _mm_set1_epi8(0x0f);
        let (pp, op) = (packed.as_ptr(), out.as_mut_ptr());
        // 16 bytes = 32 values per step; a block is a whole number of steps (bs % 32 == 0)
        for step in 0..packed.len() / 16 {
            let s = _mm256_set1_ps(*scales.get_unchecked(step * 32 / bs));
            let v = _mm_loadu_si128(pp.add(step * 16) as *const __m128i);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let lo = _mm_and_si128(v, mask);
            // codes in value order: byte i gives values 2i (high nibble) and 2i + 1
            let c = [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)];
            for (h, &ch) in c.iter().enumerate() {
                for q in 0..2 {
                    let idx = _mm256_cvtepu8_epi32(if q == 0 { ch } else { _mm_srli_si128(ch, 8) });
                    let a = _mm256_permutevar8x32_ps(lut_lo, idx);
                    let b = _mm256_permutevar8x32_ps(lut_hi, idx);
                    // bit 3 of the code, moved to the sign bit, picks the upper half
                    let sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
                    let val = _mm256_blendv_ps(a, b, sel);
                    _mm256_storeu_ps(op.add(step * 32 + h * 16 + q * 8), _mm256_mul_ps(val, s));
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub(super) unsafe fn decode_avx512(
        table: &[f32; 16],
        bs: usize,
        packed: &[u8],
        scales: &[f32],
        out: &mut [f32],
    ) {
        let lut = _mm512_loadu_ps(table.as_ptr());
        let mask = _mm_set1_epi8(0x0f);
        let (pp, op) = (packed.as_ptr(), out.as_mut_ptr());
        for step in 0..packed.len() / 16 {
            let s = _mm512_set1_ps(*scales.get_unchecked(step * 32 / bs));
            let v = _mm_loadu_si128(pp.add(step * 16) as *const __m128i);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
            let lo = _mm_and_si128(v, mask);
            let c = [_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo)];
            for (h, &ch) in c.iter().enumerate() {
                let val = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(ch), lut);
                _mm512_storeu_ps(op.add(step * 32 + h * 16), _mm512_mul_ps(val, s));
            }
        }
    }

    /// 16 bytes of packed codes (32 values, high nibble first) -> 32 bytes of `table[code]`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn codes_to_i8_avx2(table: &[i8; 16], src: &[u8], dst: &mut [u8]) {
        debug_assert!(src.len() >= 16 && dst.len() >= 32);
        let lut = _mm_loadu_si128(table.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0f);
        let v = _mm_loadu_si128(src.as_ptr() as *const __m128i);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        let lo = _mm_and_si128(v, mask);
        let a = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(hi, lo));
        let b = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(hi, lo));
        _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, a);
        _mm_storeu_si128(dst.as_mut_ptr().add(16) as *mut __m128i, b);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len();
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 8 * j)),
                    _mm256_loadu_ps(yp.add(i + 8 * j)),
                    *a,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(xp.add(i)),
                _mm256_loadu_ps(yp.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        let mut r = _mm_cvtss_f32(s);
        while i < n {
            r += *xp.add(i) * *yp.add(i);
            i += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_weight(seed: u64, n: usize, bs: usize) -> FourBitWeight {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut table = [0f32; 16];
        for (i, t) in table.iter_mut().enumerate() {
            *t = (i as f32 - 7.5) / 7.5 + (next() % 100) as f32 * 1e-4;
        }
        let packed = (0..n / 2).map(|_| next() as u8).collect();
        let scales = (0..n / bs).map(|_| (next() % 1000) as f32 / 97.0).collect();
        FourBitWeight {
            table,
            blocksize: bs,
            packed,
            scales: BlockScales::Plain(scales),
        }
    }

    #[test]
    fn simd_decode_is_bit_identical_to_scalar() {
        for bs in [32, 64, 128] {
            let w = random_weight(bs as u64, 4 * 256, bs);
            let BlockScales::Plain(scales) = &w.scales else {
                unreachable!()
            };
            let mut want = vec![0f32; 1024];
            decode_scalar(&w.table, bs, &w.packed, scales, &mut want);
            for isa in [Isa::Avx2, Isa::Avx512] {
                if !isa.available() {
                    continue;
                }
                let mut got = vec![0f32; 1024];
                decode_blocks(isa, &w.table, bs, &w.packed, scales, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{isa:?} blocksize {bs}"
                );
            }
        }
    }

    #[test]
    fn row_decode_reads_its_own_blocks() {
        // 3 rows of 128 values, blocks of 64: row 1 block 1 is values 192..256 of the matrix
        let w = random_weight(7, 3 * 128, 64);
        let mut all = vec![0f32; 3 * 128];
        let BlockScales::Plain(scales) = &w.scales else {
            unreachable!()
        };
        decode_scalar(&w.table, 64, &w.packed, scales, &mut all);
        let mut part = vec![0f32; 64];
        w.decode(Isa::best(), 128, 1, 1, 2, &mut part);
        assert_eq!(part, all[192..256]);
        w.check(3, 128).unwrap();
        assert!(w.check(3, 96).is_err());
    }

    #[test]
    fn q8_0_rows_hold_the_rounded_table_values() {
        let w = random_weight(9, 2 * 128, 64);
        let mut got = vec![0u8; 128 / 32 * 34];
        w.row_to_q8_0(128, 1, &mut got);
        let BlockScales::Plain(scales) = &w.scales else {
            unreachable!()
        };
        for (j, ob) in got.chunks_exact(34).enumerate() {
            let d = half::f16::from_le_bytes([ob[0], ob[1]]);
            assert_eq!(d, half::f16::from_f32(scales[2 + j / 2] / 127.0));
            for i in 0..32 {
                let v = 128 + j * 32 + i;
                let code = if v % 2 == 0 {
                    w.packed[v / 2] >> 4
                } else {
                    w.packed[v / 2] & 15
                };
                let want = (127.0 * w.table[code as usize])
                    .round()
                    .clamp(-127.0, 127.0) as i8;
                assert_eq!(ob[2 + i] as i8, want, "block {j} value {i}");
            }
        }
    }

    #[test]
    fn nested_scales_follow_bitsandbytes_formula() {
        let mut code = Box::new([0f32; 256]);
        for (i, c) in code.iter_mut().enumerate() {
            *c = i as f32 / 255.0 - 0.5;
        }
        let s = BlockScales::Nested {
            codes: vec![0, 255, 128, 3],
            code,
            nested_absmax: vec![2.0, 4.0],
            nested_blocksize: 2,
            offset: 0.25,
        };
        assert_eq!(s.get(0), -0.5 * 2.0 + 0.25);
        assert_eq!(s.get(3), (3.0f32 / 255.0 - 0.5) * 4.0 + 0.25);
        assert!(s.check(4).is_ok() && s.check(5).is_err());
    }

    #[test]
    fn dot_matches_scalar_sum_closely() {
        let x: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        let got = dot(Isa::best(), &x, &y) as f64;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }
}
