//! Dense f64 linear algebra for the decompositions PEFT's LoRA initialisations call LAPACK for
//! (`torch.linalg.qr`, `torch.linalg.svd`, `torch.svd_lowrank`): a Householder QR with LAPACK's
//! sign convention, the top singular triplets of a matrix (from the symmetric eigenproblem of
//! its smaller Gram matrix) and Halko et al.'s randomized SVD. Everything runs in f64 on the
//! CPU, so f32 weights decompose with an error far below f32 rounding; matrix products go
//! through candle's f64 matmul.
use candle_core::{Device, Tensor};

/// A row-major f64 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// A 2-D tensor of any float dtype, as f64.
    pub fn from_tensor(t: &Tensor) -> candle_core::Result<Self> {
        let (rows, cols) = t.dims2()?;
        let data = t
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Ok(Self { rows, cols, data })
    }

    pub fn to_tensor(&self, dev: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.data.clone(), (self.rows, self.cols), dev)
    }

    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    pub fn transpose(&self) -> Mat {
        let mut t = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.set(j, i, self.at(i, j));
            }
        }
        t
    }

    /// `self @ other` (candle's f64 gemm).
    pub fn matmul(&self, other: &Mat) -> candle_core::Result<Mat> {
        assert_eq!(self.cols, other.rows, "matmul: inner dimensions differ");
        let dev = Device::Cpu;
        let p = self.to_tensor(&dev)?.matmul(&other.to_tensor(&dev)?)?;
        Mat::from_tensor(&p)
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        let mut out = Mat::zeros(self.rows, k);
        for i in 0..self.rows {
            out.data[i * k..(i + 1) * k]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + k]);
        }
        out
    }
}

/// The first `r` columns of Q and the first `r` rows of R of the reduced QR decomposition
/// `A = Q R` (A: m × n, r ≤ min(m, n)), computed by Householder reflections exactly as LAPACK's
/// `geqrf` / `orgqr` (which `torch.linalg.qr` calls) chooses them: reflector k maps the column
/// to `beta·e₁` with `beta = −sign(alpha)·‖x‖`, so the factors, not only their product, are
/// LAPACK's (R's diagonal may be negative).
pub fn qr_leading(a: &Mat, r: usize) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    assert!(r <= m.min(n), "qr_leading: r > min(m, n)");
    let mut w = a.clone();
    let mut reflectors: Vec<(Vec<f64>, f64)> = Vec::with_capacity(r);
    for k in 0..r {
        let alpha = w.at(k, k);
        let xnorm = (k + 1..m).map(|i| w.at(i, k).powi(2)).sum::<f64>().sqrt();
        let mut v = vec![0.0; m - k];
        v[0] = 1.0;
        if xnorm == 0.0 {
            // dlarfg: H = I; the column is already reduced.
            reflectors.push((v, 0.0));
            continue;
        }
        let beta = -alpha.signum_or_plus() * alpha.hypot(xnorm);
        let tau = (beta - alpha) / beta;
        let scal = 1.0 / (alpha - beta);
        for i in k + 1..m {
            v[i - k] = w.at(i, k) * scal;
        }
        // Apply H = I − tau·v·vᵀ to the trailing columns.
        w.set(k, k, beta);
        for i in k + 1..m {
            w.set(i, k, 0.0);
        }
        for j in k + 1..n {
            let dot: f64 = (k..m).map(|i| v[i - k] * w.at(i, j)).sum();
            let f = tau * dot;
            if f != 0.0 {
                for i in k..m {
                    let x = w.at(i, j) - f * v[i - k];
                    w.set(i, j, x);
                }
            }
        }
        reflectors.push((v, tau));
    }
    // R: the first r rows of the reduced matrix (upper triangular in its leading r columns).
    let mut rr = Mat::zeros(r, n);
    for i in 0..r {
        for j in i..n {
            rr.set(i, j, w.at(i, j));
        }
    }
    // Q = H₀ H₁ ⋯ H_{r−1} applied to the first r columns of the identity (dorg2r).
    let mut q = Mat::zeros(m, r);
    for i in 0..r {
        q.set(i, i, 1.0);
    }
    for (k, (v, tau)) in reflectors.iter().enumerate().rev() {
        if *tau == 0.0 {
            continue;
        }
        for j in 0..r {
            let dot: f64 = (k..m).map(|i| v[i - k] * q.at(i, j)).sum();
            let f = tau * dot;
            if f != 0.0 {
                for i in k..m {
                    let x = q.at(i, j) - f * v[i - k];
                    q.set(i, j, x);
                }
            }
        }
    }
    (q, rr)
}

trait SignumOrPlus {
    fn signum_or_plus(self) -> f64;
}

impl SignumOrPlus for f64 {
    /// Fortran's `SIGN(1, x)`: +1 for x ≥ 0 (and for +0), −1 below.
    fn signum_or_plus(self) -> f64 {
        if self < 0.0 {
            -1.0
        } else {
            1.0
        }
    }
}

/// Eigen-decomposition of a symmetric n × n matrix (row-major): eigenvalues in descending
/// order with their unit eigenvectors (row i of the returned matrix is the vector of value i).
/// Householder tridiagonalisation and the implicit QL method (the EISPACK `tred2` / `tql2`
/// pair, as in JAMA), with the transform stored transposed so every inner loop is contiguous.
/// Errors when QL does not converge (non-finite input).
pub fn symmetric_eigen(a: &Mat) -> std::result::Result<(Vec<f64>, Mat), String> {
    let n = a.rows;
    assert_eq!(a.rows, a.cols, "symmetric_eigen: not square");
    if n == 0 {
        return Ok((Vec::new(), Mat::zeros(0, 0)));
    }
    // t[x][y] holds JAMA's V[y][x] (the input is symmetric, so the start is the same).
    let mut t: Vec<Vec<f64>> = (0..n)
        .map(|i| a.data[i * n..(i + 1) * n].to_vec())
        .collect();
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    tred2(&mut t, &mut d, &mut e);
    tql2(&mut t, &mut d, &mut e)?;
    // Descending order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]));
    let values = order.iter().map(|&i| d[i]).collect();
    let mut vecs = Mat::zeros(n, n);
    for (row, &i) in order.iter().enumerate() {
        vecs.data[row * n..(row + 1) * n].copy_from_slice(&t[i]);
    }
    Ok((values, vecs))
}

/// JAMA `tred2`, with `t[x][y]` standing for `V[y][x]`.
#[allow(clippy::needless_range_loop)]
fn tred2(t: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) {
    let n = d.len();
    for j in 0..n {
        d[j] = t[j][n - 1];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = t[j][i - 1];
                t[j][i] = 0.0;
                t[i][j] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            for j in 0..i {
                f = d[j];
                t[i][j] = f;
                g = e[j] + t[j][j] * f;
                let col = &t[j];
                for k in j + 1..i {
                    g += col[k] * d[k];
                    e[k] += col[k] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                let col = &mut t[j];
                for k in j..i {
                    col[k] -= f * e[k] + g * d[k];
                }
                d[j] = col[i - 1];
                col[i] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        t[i][n - 1] = t[i][i];
        t[i][i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = t[i + 1][k] / h;
            }
            for j in 0..=i {
                let g: f64 = (0..=i).map(|k| t[i + 1][k] * t[j][k]).sum();
                let col = &mut t[j];
                for k in 0..=i {
                    col[k] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            t[i + 1][k] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = t[j][n - 1];
        t[j][n - 1] = 0.0;
    }
    t[n - 1][n - 1] = 1.0;
    e[0] = 0.0;
}

/// JAMA `tql2` (symmetric tridiagonal QL with implicit shifts), `t[x][y]` for `V[y][x]`.
fn tql2(t: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) -> std::result::Result<(), String> {
    let n = d.len();
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > 100 {
                    return Err(
                        "the eigenvalue iteration did not converge (non-finite input?)".into(),
                    );
                }
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = t.split_at_mut(i + 1);
                    let (vi, vi1) = (&mut lo[i], &mut hi[0]);
                    for k in 0..n {
                        let h = vi1[k];
                        vi1[k] = s * vi[k] + c * h;
                        vi[k] = c * vi[k] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                // (written so that a NaN stops the iteration too)
                if e[l].abs().partial_cmp(&(eps * tst1)) != Some(std::cmp::Ordering::Greater) {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    if d.iter().any(|x| !x.is_finite()) {
        return Err("the eigenvalues are not finite (non-finite input?)".into());
    }
    Ok(())
}

/// The `k` largest singular triplets of `a` (m × n, k ≤ min(m, n)): U (m × k), S (k, descending),
/// V (n × k) with `a ≈ U diag(S) Vᵀ` (exact for k = rank). From the eigenvectors of the
/// smaller Gram matrix (AᵀA or AAᵀ) in f64; the other side is `A v / σ` (a zero singular
/// value gets a zero vector: it contributes nothing to `U diag(S) Vᵀ`).
pub fn svd_top(a: &Mat, k: usize) -> std::result::Result<(Mat, Vec<f64>, Mat), String> {
    let (m, n) = (a.rows, a.cols);
    assert!(k <= m.min(n), "svd_top: k > min(m, n)");
    let tall = m >= n;
    let at = a.transpose();
    let gram = if tall { at.matmul(a) } else { a.matmul(&at) }.map_err(|e| e.to_string())?;
    let (values, vecs) = symmetric_eigen(&gram)?;
    let s: Vec<f64> = values[..k].iter().map(|&l| l.max(0.0).sqrt()).collect();
    // The eigenvectors (one per row) of the Gram side, as columns.
    let side = Mat {
        rows: k,
        cols: gram.rows,
        data: vecs.data[..k * gram.rows].to_vec(),
    }
    .transpose();
    // The other side: A v / σ (tall) or Aᵀ u / σ.
    let mut other = if tall {
        a.matmul(&side)
    } else {
        at.matmul(&side)
    }
    .map_err(|e| e.to_string())?;
    let tiny = s.first().copied().unwrap_or(0.0) * f64::EPSILON * (m.max(n) as f64);
    for (j, &sj) in s.iter().enumerate() {
        let inv = if sj > tiny { 1.0 / sj } else { 0.0 };
        for i in 0..other.rows {
            let x = other.at(i, j) * inv;
            other.set(i, j, x);
        }
    }
    Ok(if tall {
        (other, s, side)
    } else {
        (side, s, other)
    })
}

/// `torch.svd_lowrank(A, q, niter)` (Halko et al. 2009, algorithm 5.1 with 4.4's subspace
/// iterations): a rank-q approximate SVD from a Gaussian sketch. `gaussian(rows, cols)` draws
/// the (n × q) sketch, standard normal. Returns U (m × q), S, V (n × q).
pub fn svd_lowrank(
    a: &Mat,
    q: usize,
    niter: usize,
    gaussian: &mut dyn FnMut(usize, usize) -> Mat,
) -> std::result::Result<(Mat, Vec<f64>, Mat), String> {
    let err = |e: candle_core::Error| e.to_string();
    // Assume A is tall (torch transposes a wide one and swaps U and V back).
    let wide = a.rows < a.cols;
    let a = if wide { a.transpose() } else { a.clone() };
    let at = a.transpose();
    assert!(q <= a.cols, "svd_lowrank: q > min(m, n)");
    let r = gaussian(a.cols, q);
    let mut qm = qr_leading(&a.matmul(&r).map_err(err)?, q).0;
    for _ in 0..niter {
        qm = qr_leading(&at.matmul(&qm).map_err(err)?, q).0;
        qm = qr_leading(&a.matmul(&qm).map_err(err)?, q).0;
    }
    let b = qm.transpose().matmul(&a).map_err(err)?; // (q × n)
    let (ub, s, v) = svd_top(&b, q)?;
    let u = qm.matmul(&ub).map_err(err)?;
    Ok(if wide { (v, s, u) } else { (u, s, v) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut rng = StdRng::seed_from_u64(seed);
        Mat {
            rows,
            cols,
            data: (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        }
    }

    fn max_diff(a: &Mat, b: &Mat) -> f64 {
        assert_eq!((a.rows, a.cols), (b.rows, b.cols));
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn scale_cols(u: &Mat, s: &[f64]) -> Mat {
        let mut out = u.clone();
        for i in 0..u.rows {
            for (j, sj) in s.iter().enumerate() {
                out.set(i, j, u.at(i, j) * sj);
            }
        }
        out
    }

    #[test]
    fn qr_is_orthonormal_times_upper_with_lapack_signs() {
        for (m, n) in [(7, 5), (5, 7), (6, 6)] {
            let a = random(m, n, 3);
            let k = m.min(n);
            let (q, r) = qr_leading(&a, k);
            assert!(max_diff(&q.matmul(&r).unwrap(), &a) < 1e-12);
            let qtq = q.transpose().matmul(&q).unwrap();
            let mut eye = Mat::zeros(k, k);
            for i in 0..k {
                eye.set(i, i, 1.0);
            }
            assert!(max_diff(&qtq, &eye) < 1e-12);
            for i in 0..k {
                for j in 0..i {
                    assert_eq!(r.at(i, j), 0.0);
                }
            }
            // LAPACK: R₀₀ = −sign(a₀₀)·‖a[:, 0]‖.
            let norm0 = (0..m).map(|i| a.at(i, 0).powi(2)).sum::<f64>().sqrt();
            assert!((r.at(0, 0) + a.at(0, 0).signum() * norm0).abs() < 1e-12);
            // The leading r columns / rows are those of the full factorisation.
            let (q2, r2) = qr_leading(&a, 2);
            assert!(max_diff(&q2, &q.first_cols(2)) < 1e-12);
            assert!(max_diff(&r2.transpose().first_cols(2), &r.transpose().first_cols(2)) < 1e-12);
        }
    }

    #[test]
    fn symmetric_eigen_reconstructs_and_orders() {
        let b = random(9, 9, 5);
        let a = b.transpose().matmul(&b).unwrap();
        let (vals, vecs) = symmetric_eigen(&a).unwrap();
        assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        // A v = λ v for each row vector.
        for (i, &l) in vals.iter().enumerate() {
            let v = Mat {
                rows: 9,
                cols: 1,
                data: vecs.data[i * 9..(i + 1) * 9].to_vec(),
            };
            let av = a.matmul(&v).unwrap();
            let lv = Mat {
                rows: 9,
                cols: 1,
                data: v.data.iter().map(|x| x * l).collect(),
            };
            assert!(max_diff(&av, &lv) < 1e-10, "eigenpair {i}");
        }
        // A diagonal and a zero matrix are already reduced.
        let mut z = Mat::zeros(3, 3);
        assert_eq!(symmetric_eigen(&z).unwrap().0, vec![0.0; 3]);
        z.set(1, 1, 2.0);
        assert_eq!(symmetric_eigen(&z).unwrap().0, vec![2.0, 0.0, 0.0]);
        let mut bad = Mat::zeros(2, 2);
        bad.set(0, 1, f64::NAN);
        bad.set(1, 0, f64::NAN);
        assert!(symmetric_eigen(&bad).is_err());
    }

    #[test]
    fn svd_top_and_lowrank_reconstruct() {
        for (m, n) in [(12, 7), (7, 12)] {
            let a = random(m, n, 11);
            let k = m.min(n);
            let (u, s, v) = svd_top(&a, k).unwrap();
            assert!(s.windows(2).all(|w| w[0] >= w[1]));
            let back = scale_cols(&u, &s).matmul(&v.transpose()).unwrap();
            assert!(max_diff(&back, &a) < 1e-10, "{m}x{n}");
            // A rank-3 matrix: the randomized SVD with q = 3 is exact, and the top-3 truncation
            // of a full-rank one approaches the exact truncation with subspace iterations.
            let low = random(m, 3, 1).matmul(&random(3, n, 2)).unwrap();
            let mut rng = StdRng::seed_from_u64(9);
            let mut gauss = |r: usize, c: usize| Mat {
                rows: r,
                cols: c,
                data: (0..r * c).map(|_| rng.random_range(-1.0..1.0)).collect(),
            };
            let (u, s, v) = svd_lowrank(&low, 3, 0, &mut gauss).unwrap();
            let back = scale_cols(&u, &s).matmul(&v.transpose()).unwrap();
            assert!(max_diff(&back, &low) < 1e-10);
            // (a well-separated spectrum: low rank plus small noise)
            let noisy = Mat {
                data: low
                    .data
                    .iter()
                    .zip(&a.data)
                    .map(|(x, y)| x + 0.01 * y)
                    .collect(),
                ..low.clone()
            };
            let (ut, st, vt) = svd_top(&noisy, 3).unwrap();
            let exact = scale_cols(&ut, &st).matmul(&vt.transpose()).unwrap();
            let (u, s, v) = svd_lowrank(&noisy, 3, 8, &mut gauss).unwrap();
            let approx = scale_cols(&u, &s).matmul(&v.transpose()).unwrap();
            assert!(
                max_diff(&approx, &exact) < 1e-6,
                "{}",
                max_diff(&approx, &exact)
            );
        }
    }
}
