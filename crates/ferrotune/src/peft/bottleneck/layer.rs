//! The bottleneck network of one module: `out = h + up(act(down(h)))` on the module's output
//! `h`. `up` starts at zero, so a fresh adapter leaves the model exactly as it was and training
//! starts from the base model's behaviour (Houlsby's near-identity initialisation, made exact).
use super::config::Activation;
use crate::nn::LinearAdapter;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct BottleneckAdapter {
    /// (bottleneck, hidden)
    down_weight: Var,
    /// (bottleneck,)
    down_bias: Var,
    /// (hidden, bottleneck)
    up_weight: Var,
    /// (hidden,)
    up_bias: Var,
    activation: Activation,
    /// Selected by the user (one adapter of several switched on).
    active: AtomicBool,
}

/// The adapter as a function of its tensors (so the gradient check sees exactly what training
/// runs): `h + (act(h Dᵀ + d) Uᵀ + u)`, in `h`'s dtype.
pub fn bottleneck_forward(
    h: &Tensor,
    down_weight: &Tensor,
    down_bias: &Tensor,
    up_weight: &Tensor,
    up_bias: &Tensor,
    activation: Activation,
) -> Result<Tensor> {
    let dims = h.dims().to_vec();
    let hidden = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let h2 = h.reshape((rows, hidden))?;
    let z = h2.matmul(&down_weight.t()?)?.broadcast_add(down_bias)?;
    let a = activation.apply(&z)?;
    let u = a.matmul(&up_weight.t()?)?.broadcast_add(up_bias)?;
    (h2 + u)?.reshape(dims)
}

impl BottleneckAdapter {
    /// A fresh adapter for a module with `hidden` outputs: `down` like a fresh `nn.Linear`
    /// (Kaiming-uniform weight, bound 1/sqrt(hidden)), `up` and both biases zero.
    pub fn new(
        hidden: usize,
        bottleneck: usize,
        activation: Activation,
        rng: &mut StdRng,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f32).sqrt();
        let down: Vec<f32> = (0..bottleneck * hidden)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Self::from_weights(
            Tensor::from_vec(down, (bottleneck, hidden), dev)?,
            Tensor::zeros(bottleneck, DType::F32, dev)?,
            Tensor::zeros((hidden, bottleneck), DType::F32, dev)?,
            Tensor::zeros(hidden, DType::F32, dev)?,
            activation,
        )
    }

    /// An adapter with given tensors (converted to f32, the dtype adapters train in).
    pub fn from_weights(
        down_weight: Tensor,
        down_bias: Tensor,
        up_weight: Tensor,
        up_bias: Tensor,
        activation: Activation,
    ) -> Result<Self> {
        let (b, h) = down_weight.dims2()?;
        if up_weight.dims() != [h, b] || down_bias.dims() != [b] || up_bias.dims() != [h] {
            candle_core::bail!(
                "bottleneck adapter: down {:?} + {:?}, up {:?} + {:?} do not fit together",
                down_weight.dims(),
                down_bias.dims(),
                up_weight.dims(),
                up_bias.dims()
            );
        }
        let var = |t: Tensor| Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?);
        Ok(Self {
            down_weight: var(down_weight)?,
            down_bias: var(down_bias)?,
            up_weight: var(up_weight)?,
            up_bias: var(up_bias)?,
            activation,
            active: AtomicBool::new(true),
        })
    }

    pub fn bottleneck_size(&self) -> usize {
        self.down_weight.dim(0).unwrap_or(0)
    }
    pub fn activation(&self) -> Activation {
        self.activation
    }
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed)
    }
}

impl LinearAdapter for BottleneckAdapter {
    fn method(&self) -> &'static str {
        "bottleneck"
    }

    fn forward(&self, _x: &Tensor, base_out: Tensor, _train: bool) -> Result<Tensor> {
        if !self.is_active() {
            return Ok(base_out);
        }
        // In f32 whatever the base dtype, cast back, as for LoRA.
        let dt = base_out.dtype();
        let y = bottleneck_forward(
            &base_out.to_dtype(DType::F32)?,
            self.down_weight.as_tensor(),
            self.down_bias.as_tensor(),
            self.up_weight.as_tensor(),
            self.up_bias.as_tensor(),
            self.activation,
        )?;
        y.to_dtype(dt)
    }

    fn trainable_params(&self) -> Vec<(String, Var)> {
        vec![
            ("adapter_down.weight".to_string(), self.down_weight.clone()),
            ("adapter_down.bias".to_string(), self.down_bias.clone()),
            ("adapter_up.weight".to_string(), self.up_weight.clone()),
            ("adapter_up.bias".to_string(), self.up_bias.clone()),
        ]
    }
    // No `delta_weight`: the adapter is non-linear in the module's output, so it cannot be
    // folded into the base weight (merging is refused with that reason).
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradients, rand_tensor};
    use rand::SeedableRng;

    #[test]
    fn gradients_of_every_tensor_match_finite_differences() {
        let (rows, hidden, b) = (5, 6, 3);
        for (i, act) in [
            Activation::Relu,
            Activation::Gelu,
            Activation::Swish,
            Activation::Tanh,
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 * i as u64;
            let inputs = [
                rand_tensor(&[2, rows, hidden], DType::F64, seed).unwrap(),
                rand_tensor(&[b, hidden], DType::F64, seed + 1).unwrap(),
                rand_tensor(&[b], DType::F64, seed + 2).unwrap(),
                rand_tensor(&[hidden, b], DType::F64, seed + 3).unwrap(),
                rand_tensor(&[hidden], DType::F64, seed + 4).unwrap(),
            ];
            check_gradients(
                |t| bottleneck_forward(&t[0], &t[1], &t[2], &t[3], &t[4], act),
                &inputs,
                1e-6,
                1e-6,
            )
            .unwrap_or_else(|e| panic!("{act:?}: {e}"));
        }
    }

    #[test]
    fn a_fresh_adapter_is_the_identity_and_a_trained_one_is_not() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = BottleneckAdapter::new(8, 2, Activation::Relu, &mut rng, &Device::Cpu).unwrap();
        let h = rand_tensor(&[1, 4, 8], DType::F32, 1).unwrap();
        let x = rand_tensor(&[1, 4, 5], DType::F32, 2).unwrap();
        let out = a.forward(&x, h.clone(), true).unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        a.up_weight
            .set(&rand_tensor(&[8, 2], DType::F32, 4).unwrap())
            .unwrap();
        let out = a.forward(&x, h.clone(), false).unwrap();
        let d = (out - &h)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-3, "{d}");
        // Switched off: the module's output passes through.
        a.set_active(false);
        let off = a.forward(&x, h.clone(), false).unwrap();
        assert_eq!(
            off.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
