//! The IA3 adapter of one linear layer (Liu et al. 2022, "(IA)³"): a learned vector `l` that
//! rescales the layer's output (`(out, 1)`, for keys and values: `y = l ⊙ (W x + b)`) or, for
//! feed-forward modules, its input (`(1, in)`: `y = W (l ⊙ x) + b`), exactly as PEFT's
//! `IA3Layer` does. The vector is an f32 `Var` shaped as PEFT stores it, so the file round-trips.
use crate::nn::LinearAdapter;
use candle_core::{DType, Device, Result, Tensor, Var};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Ia3Adapter {
    /// (out, 1), or (1, in) for a feed-forward module.
    l: Var,
    feedforward: bool,
    active: AtomicBool,
    /// Its scaling is in the base weight: the on-the-fly path must be skipped.
    merged: AtomicBool,
}

impl Ia3Adapter {
    /// A fresh adapter for an (out_f, in_f) linear: ones (PEFT's `init_ia3_weights = true`, the
    /// adapter starts as a no-op) or `random` values (PEFT's `torch.randn` for `false`).
    pub fn new(
        in_f: usize,
        out_f: usize,
        feedforward: bool,
        random: Option<&mut rand::rngs::StdRng>,
        dev: &Device,
    ) -> Result<Self> {
        let shape = if feedforward { (1, in_f) } else { (out_f, 1) };
        let l = match random {
            None => Tensor::ones(shape, DType::F32, dev)?,
            Some(rng) => {
                use rand::Rng;
                let v: Vec<f32> = (0..shape.0 * shape.1)
                    .map(|_| {
                        // Box-Muller, N(0, 1).
                        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
                        let u2: f32 = rng.random();
                        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect();
                Tensor::from_vec(v, shape, dev)?
            }
        };
        Self::from_var(Var::from_tensor(&l)?, feedforward)
    }

    /// An adapter around an existing vector (its dtype is kept: the gradient checks run in f64).
    pub fn from_var(l: Var, feedforward: bool) -> Result<Self> {
        let (a, b) = l.dims2()?;
        if (feedforward && a != 1) || (!feedforward && b != 1) {
            candle_core::bail!(
                "IA3: a {} vector must be {}, got {:?}",
                if feedforward {
                    "feed-forward"
                } else {
                    "output"
                },
                if feedforward { "(1, in)" } else { "(out, 1)" },
                l.dims()
            );
        }
        Ok(Self {
            l,
            feedforward,
            active: AtomicBool::new(true),
            merged: AtomicBool::new(false),
        })
    }

    pub fn vector(&self) -> &Var {
        &self.l
    }
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed)
    }
    pub fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }
    pub(crate) fn set_merged(&self, on: bool) {
        self.merged.store(on, Ordering::Relaxed)
    }
    fn applies(&self) -> bool {
        self.is_active() && !self.is_merged()
    }

    /// `t ⊙ l` over the last dimension, computed in the vector's dtype and cast back to `t`'s
    /// (PEFT: `(x.to(ia3.dtype) * ia3_l.flatten()).to(previous_dtype)`).
    fn scale(&self, t: &Tensor) -> Result<Tensor> {
        let l = self.l.as_tensor().flatten_all()?;
        t.to_dtype(l.dtype())?
            .broadcast_mul(&l)?
            .to_dtype(t.dtype())
    }
}

impl LinearAdapter for Ia3Adapter {
    fn method(&self) -> &'static str {
        "ia3"
    }

    fn transform_input(&self, x: &Tensor) -> Option<Result<Tensor>> {
        (self.feedforward && self.applies()).then(|| self.scale(x))
    }

    fn forward(&self, _x: &Tensor, base_out: Tensor, _train: bool) -> Result<Tensor> {
        if self.feedforward || !self.applies() {
            return Ok(base_out);
        }
        self.scale(&base_out)
    }

    fn trainable_params(&self) -> Vec<(String, Var)> {
        // PEFT's state-dict key: `...k_proj.ia3_l` (a ParameterDict entry, no `.weight`).
        vec![("ia3_l".to_string(), self.l.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Linear, LinearWeight};
    use crate::ops::gradcheck::{check_gradients, rand_tensor};

    /// The whole layer (frozen W and bias, IA3 on its output or its input) through
    /// `Linear::forward_t`, as a function of the input and the vector.
    fn layer(feedforward: bool) -> impl Fn(&[Tensor]) -> Result<Tensor> {
        move |xs: &[Tensor]| {
            let w = rand_tensor(&[5, 7], DType::F64, 3)?;
            let b = rand_tensor(&[5], DType::F64, 4)?;
            let mut lin = Linear::new("m", LinearWeight::Frozen(w), Some(b));
            lin.add_adapter(
                "default",
                Box::new(Ia3Adapter::from_var(
                    Var::from_tensor(&xs[1])?,
                    feedforward,
                )?),
            );
            lin.forward_t(&xs[0], true)
        }
    }

    #[test]
    fn output_scaling_gradients_match_finite_differences() {
        let x = rand_tensor(&[2, 3, 7], DType::F64, 1).unwrap();
        let l = rand_tensor(&[5, 1], DType::F64, 2).unwrap();
        check_gradients(layer(false), &[x, l], 1e-5, 1e-6).unwrap();
    }

    #[test]
    fn feedforward_input_scaling_gradients_match_finite_differences() {
        let x = rand_tensor(&[2, 3, 7], DType::F64, 1).unwrap();
        let l = rand_tensor(&[1, 7], DType::F64, 2).unwrap();
        check_gradients(layer(true), &[x, l], 1e-5, 1e-6).unwrap();
    }

    #[test]
    fn forward_scales_output_rows_or_input_columns() {
        let x = rand_tensor(&[1, 2, 7], DType::F32, 1).unwrap();
        let w = rand_tensor(&[5, 7], DType::F32, 3).unwrap();
        let b = rand_tensor(&[5], DType::F32, 4).unwrap();
        let lo = rand_tensor(&[5, 1], DType::F32, 5).unwrap();
        let li = rand_tensor(&[1, 7], DType::F32, 6).unwrap();
        let dense = |w: &Tensor, b: &Tensor| -> Tensor {
            x.broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(b)
                .unwrap()
        };
        let mut out = Linear::new("m", LinearWeight::Frozen(w.clone()), Some(b.clone()));
        out.add_adapter(
            "a",
            Box::new(Ia3Adapter::from_var(Var::from_tensor(&lo).unwrap(), false).unwrap()),
        );
        // l ⊙ (W x + b) = (diag(l) W) x + l ⊙ b
        let want = dense(
            &w.broadcast_mul(&lo).unwrap(),
            &(b.clone() * lo.flatten_all().unwrap()).unwrap(),
        );
        let d = (out.forward(&x).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let mut inp = Linear::new("m", LinearWeight::Frozen(w.clone()), Some(b.clone()));
        inp.add_adapter(
            "a",
            Box::new(Ia3Adapter::from_var(Var::from_tensor(&li).unwrap(), true).unwrap()),
        );
        // W (l ⊙ x) + b = (W diag(l)) x + b
        let want = dense(&w.broadcast_mul(&li).unwrap(), &b);
        let d = (inp.forward(&x).unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(Ia3Adapter::from_var(Var::from_tensor(&lo).unwrap(), true).is_err());
    }
}
