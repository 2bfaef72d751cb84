//! Rotary position embedding, Hugging Face "rotate_half" convention: dimension i is paired
//! with i + d/2. The rotation is orthogonal, so its backward pass is the same kernel with the
//! sine negated (the inverse rotation), and the op keeps nothing but its inputs.
//!
//! The CPU kernel reads x through its strides (only the last dim must be contiguous), so the
//! usual `(b, t, h, d) → (b, h, t, d)` transpose before rope costs no extra copy.
//!
//! The tables are `(t, d/2)` when every row of the batch has positions `offset..offset + t`,
//! or `(b, t, d/2)` when positions differ per row (packed rows restart at 0 for each example):
//! the caller gathers the table rows of each token's position, which costs `b·t·d` floats once
//! per forward pass, against a rope kernel that stays a straight walk over contiguous rows.
use super::kernels::{self, multiversion, Float};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Rotates `x` `(b, h, t, d)` by `cos`/`sin` `(t, d/2)`, or `(b, t, d/2)` for per-row positions
/// (every head of row `b` uses table row `(b, t)`):
/// `out[i] = x[i]·cos[i] − x[i+d/2]·sin[i]`, `out[i+d/2] = x[i+d/2]·cos[i] + x[i]·sin[i]`.
/// Gradient reaches `x` only (cos/sin are position tables).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if super::reference_ops() {
        return rope_reference(x, cos, sin);
    }
    check_shapes(x, cos, sin)?;
    // Empty tensors (e.g. a zero-sized head dim) take the composed path; the kernels assume
    // non-empty rows.
    if kernels::cpu_kernel_dtype(&[x, cos, sin]).is_none()
        || [x, cos, sin].iter().any(|t| t.elem_count() == 0)
    {
        return rope_reference(x, cos, sin);
    }
    let x = if x.stride()[3] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    // cos/sin are constants: detach so the graph never asks for their gradient.
    let cos = cos.detach().contiguous()?;
    let sin = sin.detach().contiguous()?;
    x.apply_op3(&cos, &sin, Rope)
}

/// The same function composed from ordinary differentiable candle ops.
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_shapes(x, cos, sin)?;
    let (b, _, t, d) = x.dims4()?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let bt = if cos.rank() == 3 { b } else { 1 };
    let c = cos.reshape((bt, 1, t, half))?;
    let s = sin.reshape((bt, 1, t, half))?;
    let o1 = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&s)?)?;
    let o2 = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&s)?)?;
    Tensor::cat(&[o1, o2], D::Minus1)
}

fn check_shapes(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (b, _, t, d) = x.dims4()?;
    if d % 2 != 0 {
        bail!("rope: head dim {d} of x {:?} must be even", x.dims())
    }
    for (name, c) in [("cos", cos), ("sin", sin)] {
        if c.dims() != [t, d / 2] && c.dims() != [b, t, d / 2] {
            bail!(
                "rope: {name} has shape {:?} but x {:?} needs ({t}, {}) or ({b}, {t}, {})",
                c.dims(),
                x.dims(),
                d / 2,
                d / 2
            )
        }
    }
    if cos.dims() != sin.dims() {
        bail!(
            "rope: cos {:?} and sin {:?} differ in shape",
            cos.dims(),
            sin.dims()
        )
    }
    Ok(())
}

struct Rope;

/// Where the rows of a (b, h, t, d) tensor live in its buffer; the last dim is contiguous.
struct Geom {
    start: usize,
    /// (b, h, t)
    dims: [usize; 3],
    strides: [usize; 3],
    d: usize,
}

impl Geom {
    fn new(l: &Layout) -> Result<Self> {
        let (dims, strides) = (l.dims(), l.stride());
        if dims.len() != 4 || strides[3] != 1 {
            bail!("rope: internal error: expected a (b, h, t, d) layout with a contiguous last dim")
        }
        Ok(Self {
            start: l.start_offset(),
            dims: [dims[0], dims[1], dims[2]],
            strides: [strides[0], strides[1], strides[2]],
            d: dims[3],
        })
    }

    /// (b, h, t) of a row index in (b, h, t) order.
    fn row_index(&self, row: usize) -> [usize; 3] {
        let t = row % self.dims[2];
        let bh = row / self.dims[2];
        [bh / self.dims[1], bh % self.dims[1], t]
    }

    #[inline(always)]
    fn offset(&self, [b, h, t]: [usize; 3]) -> usize {
        self.start + b * self.strides[0] + h * self.strides[1] + t * self.strides[2]
    }
}

/// Rotates rows `first_row..` of `x` into `out`; `sign` = −1 gives the inverse rotation.
/// Position `t` of batch row `b` uses table row `b · table_b + t` (`table_b` = 0 for a `(t, d/2)`
/// table shared by the batch, `t` for a `(b, t, d/2)` one).
#[inline(always)]
fn rows_body<T: Float>(
    x: &[T],
    geom: &Geom,
    (cos, sin, table_b): (&[T], &[T], usize),
    out: &mut [T],
    first_row: usize,
    sign: T,
) {
    let d = geom.d;
    let half = d / 2;
    // Walk (b, h, t) with counters: a division per row would cost as much as rotating it.
    let mut idx = geom.row_index(first_row);
    for or in out.chunks_exact_mut(d) {
        let off = geom.offset(idx);
        let ti = idx[0] * table_b + idx[2];
        idx[2] += 1;
        if idx[2] == geom.dims[2] {
            idx[2] = 0;
            idx[1] += 1;
            if idx[1] == geom.dims[1] {
                idx[1] = 0;
                idx[0] += 1;
            }
        }
        let (x1, x2) = x[off..off + d].split_at(half);
        let c = &cos[ti * half..(ti + 1) * half];
        let s = &sin[ti * half..(ti + 1) * half];
        let (o1, o2) = or.split_at_mut(half);
        for ((((o1, o2), (a, b)), cv), sv) in o1
            .iter_mut()
            .zip(o2.iter_mut())
            .zip(x1.iter().zip(x2))
            .zip(c)
            .zip(s)
        {
            let sv = sign * *sv;
            *o1 = *a * *cv - *b * sv;
            *o2 = *b * *cv + *a * sv;
        }
    }
}
multiversion!(fn rotate_rows<T>(x: &[T], geom: &Geom, table: (&[T], &[T], usize), out: &mut [T], first_row: usize, sign: T) = rows_body;);

/// Rotates every row of the tensor described by `geom` into a new contiguous buffer. The
/// tables are contiguous, `(t, d/2)` or `(b, t, d/2)`, told apart by their length.
fn rotate<T: Float>(x: &[T], geom: &Geom, cos: &[T], sin: &[T], sign: T) -> Vec<T> {
    let d = geom.d;
    let n_rows = geom.dims.iter().product::<usize>();
    let table_b = if cos.len() == geom.dims[2] * (d / 2) {
        0
    } else {
        geom.dims[2]
    };
    let rows = kernels::rows_per_task(n_rows, d);
    // SAFETY: the chunks cover `out`, and `rotate_rows` writes both halves of every row.
    unsafe {
        kernels::filled_vec(n_rows * d, |out| {
            kernels::for_each_chunk_mut(out, rows * d, |i, oc| {
                rotate_rows(x, geom, (cos, sin, table_b), oc, i * rows, sign)
            })
        })
    }
}

impl Rope {
    fn fwd<T: Float>(&self, s: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
        let [(xs, xl), (cs, cl), (ss, sl)] = s;
        let geom = Geom::new(xl)?;
        let x = xs.as_slice::<T>()?;
        let cos = kernels::contiguous::<T>(cs, cl, "rope")?;
        let sin = kernels::contiguous::<T>(ss, sl, "rope")?;
        let out = rotate(x, &geom, cos, sin, T::ONE);
        Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
    }

    fn bwd_t<T: Float>(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let geom = Geom::new(gl)?;
        let gv = kernels::cpu_data::<T>(&gs, "rope")?;
        let cv = kernels::cpu_contiguous::<T>(&cs, cl, "rope")?;
        let sv = kernels::cpu_contiguous::<T>(&ss, sl, "rope")?;
        let dx = rotate(gv, &geom, cv, sv, -T::ONE);
        kernels::tensor_from_vec(dx, x.shape())
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ferrotune-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        match s1.dtype() {
            DType::F32 => self.fwd::<f32>(s),
            DType::F64 => self.fwd::<f64>(s),
            dt => bail!("rope: no CPU kernel for {dt:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, cos, sin, g)?,
            DType::F64 => self.bwd_t::<f64>(x, cos, sin, g)?,
            dt => bail!("rope: no CPU kernel for {dt:?}"),
        };
        Ok((Some(dx), None, None))
    }
}

/// HF-style cos/sin tables `(t, d/2)` for positions `offset..offset+t` (test helper).
#[cfg(test)]
pub(crate) fn rope_tables(
    t: usize,
    d: usize,
    offset: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    let mut c = Vec::with_capacity(t * half);
    let mut s = Vec::with_capacity(t * half);
    for p in offset..offset + t {
        for i in 0..half {
            let inv_freq = 10000f64.powf(-((2 * i) as f64) / d as f64);
            let a = p as f64 * inv_freq;
            c.push(a.cos());
            s.push(a.sin());
        }
    }
    let dev = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(c, (t, half), &dev)?.to_dtype(dtype)?,
        Tensor::from_vec(s, (t, half), &dev)?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{assert_close, check_gradients, compare_grads, rand_tensor};

    /// (b, h, t, d, position offset)
    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 2, 0),
        (2, 3, 5, 8, 0),
        (1, 9, 1, 64, 517),
        (2, 2, 7, 6, 3),
        // Enough rows for several parallel tasks, whose first rows fall mid-sequence.
        (4, 9, 70, 64, 3),
    ];

    #[test]
    fn forward_matches_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &(b, h, t, d, off)) in CASES.iter().enumerate() {
                let x = rand_tensor(&[b, h, t, d], dt, 700 + i as u64)?;
                let (c, s) = rope_tables(t, d, off, dt)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                assert_close(
                    &rope(&x, &c, &s)?,
                    &rope_reference(&x, &c, &s)?,
                    tol,
                    &format!("rope {dt:?} {:?}", x.dims()),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn forward_reads_transposed_input_without_copy() -> Result<()> {
        // The usual layout: projections give (b, t, h, d), attention wants (b, h, t, d).
        let (b, t, h, d) = (2, 6, 3, 16);
        let x = rand_tensor(&[b, t, h, d], DType::F32, 9)?.transpose(1, 2)?;
        assert!(!x.is_contiguous());
        let (c, s) = rope_tables(t, d, 4, DType::F32)?;
        assert_close(
            &rope(&x, &c, &s)?,
            &rope_reference(&x, &c, &s)?,
            1e-6,
            "rope transposed",
        )
    }

    #[test]
    fn backward_matches_finite_differences() -> Result<()> {
        let x = rand_tensor(&[1, 2, 3, 4], DType::F64, 11)?;
        let (c, s) = rope_tables(3, 4, 5, DType::F64)?;
        check_gradients(|v| rope(&v[0], &c, &s), &[x], 1e-6, 1e-8)
    }

    #[test]
    fn backward_matches_reference_autograd() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &(b, h, t, d, off)) in CASES.iter().enumerate() {
                let x = rand_tensor(&[b, h, t, d], dt, 800 + i as u64)?;
                let (c, s) = rope_tables(t, d, off, dt)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                compare_grads(
                    |v| rope(&v[0], &c, &s),
                    |v| rope_reference(&v[0], &c, &s),
                    &[x],
                    tol,
                    &format!("rope {dt:?} case {i}"),
                )?;
            }
        }
        Ok(())
    }

    #[test]
    fn backward_through_transposed_input_matches_reference() -> Result<()> {
        let x = rand_tensor(&[2, 5, 3, 8], DType::F64, 12)?;
        let (c, s) = rope_tables(5, 8, 0, DType::F64)?;
        compare_grads(
            |v| rope(&v[0].transpose(1, 2)?, &c, &s),
            |v| rope_reference(&v[0].transpose(1, 2)?, &c, &s),
            &[x],
            1e-14,
            "rope transposed",
        )
    }

    /// Per-row tables `(b, t, d/2)`: the rows of a `(max_pos, d/2)` table at `positions`, the
    /// way the model gathers them for packed rows.
    fn gathered_tables(positions: &[Vec<u32>], d: usize, dt: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = (positions.len(), positions[0].len());
        let max = *positions.iter().flatten().max().unwrap() as usize + 1;
        let (c, s) = rope_tables(max, d, 0, dt)?;
        let flat: Vec<u32> = positions.iter().flatten().copied().collect();
        let idx = Tensor::new(flat.as_slice(), &candle_core::Device::Cpu)?;
        Ok((
            c.index_select(&idx, 0)?.reshape((b, t, d / 2))?,
            s.index_select(&idx, 0)?.reshape((b, t, d / 2))?,
        ))
    }

    /// Positions restarting per packed example, as the batcher writes them; t = 70 gives
    /// several parallel tasks whose first rows fall mid-row.
    fn packed_positions(b: usize, t: usize) -> Vec<Vec<u32>> {
        (0..b)
            .map(|r| {
                let cut = 5 + 17 * r % (t - 5);
                (0..t)
                    .map(|i| (if i < cut { i } else { i - cut }) as u32)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn per_row_positions_forward_and_backward_match_reference() -> Result<()> {
        for dt in [DType::F32, DType::F64] {
            for (i, &(b, h, t, d)) in [(1, 2, 6, 4), (3, 3, 9, 8), (4, 9, 70, 64)]
                .iter()
                .enumerate()
            {
                let (c, s) = gathered_tables(&packed_positions(b, t), d, dt)?;
                let x = rand_tensor(&[b, t, h, d], dt, 900 + i as u64)?;
                let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
                // Through the transposed layout the model uses.
                compare_grads(
                    |v| rope(&v[0].transpose(1, 2)?, &c, &s),
                    |v| rope_reference(&v[0].transpose(1, 2)?, &c, &s),
                    &[x],
                    tol,
                    &format!("per-row rope {dt:?} case {i}"),
                )?;
            }
        }
        Ok(())
    }

    /// Each batch row rotated with per-row tables equals that row alone rotated with the shared
    /// `(t, d/2)` table of its positions, which pins the batch indexing of the kernel.
    #[test]
    fn per_row_positions_equal_rows_rotated_one_by_one() -> Result<()> {
        let (b, h, t, d) = (3, 2, 20, 8);
        let positions = packed_positions(b, t);
        let (c, s) = gathered_tables(&positions, d, DType::F64)?;
        let x = rand_tensor(&[b, h, t, d], DType::F64, 31)?;
        let all = rope(&x, &c, &s)?;
        for r in 0..b {
            let (cr, sr) = (c.get(r)?, s.get(r)?);
            let alone = rope(&x.narrow(0, r, 1)?, &cr, &sr)?;
            assert_close(&all.narrow(0, r, 1)?, &alone, 0.0, &format!("row {r}"))?;
        }
        // And the tables differ between rows, so a kernel ignoring the batch index would fail.
        assert!(
            (c.get(0)? - c.get(1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?
                > 0.1,
            "rows share positions"
        );
        Ok(())
    }

    #[test]
    fn per_row_positions_backward_matches_finite_differences() -> Result<()> {
        let x = rand_tensor(&[2, 2, 3, 4], DType::F64, 14)?;
        let (c, s) = gathered_tables(&[vec![0, 1, 0], vec![4, 0, 1]], 4, DType::F64)?;
        check_gradients(|v| rope(&v[0], &c, &s), &[x], 1e-6, 1e-8)
    }

    #[test]
    fn rejects_mismatched_tables() -> Result<()> {
        let x = rand_tensor(&[1, 2, 3, 8], DType::F32, 13)?;
        let (c, s) = rope_tables(4, 8, 0, DType::F32)?;
        let err = rope(&x, &c, &s).unwrap_err().to_string();
        assert!(err.contains("cos has shape [4, 4]"), "{err}");
        Ok(())
    }
}
