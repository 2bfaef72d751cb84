//! The LoRA adapter of one linear layer: `out = base_out + scale · B(A(dropout(x)))`.
//!
//! The low-rank path is computed on the fly (never `W + BA`), so training touches only the two
//! small matrices and a quantized base stays quantized. A and B are f32 `Var`s whatever the base
//! dtype: optimizer updates to small LoRA weights vanish in bf16.
//!
//! DoRA (Liu et al. 2024, PEFT's `use_dora`) adds a trained magnitude `m` (one per output row):
//! `W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row`, computed as PEFT's `DoraLinearLayer.forward` does,
//! `y = base + (m/‖·‖ − 1)·(W x) + (m/‖·‖)·s·B A x`, the norm detached (the paper's
//! memory-saving choice, so the gradient reaches A and B through the low-rank path only).
use crate::nn::{LinearAdapter, LinearWeight};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct LoraAdapter {
    /// (r, in)
    a: Var,
    /// (out, r)
    b: Var,
    r: usize,
    alpha: f64,
    scale: f64,
    dropout: f32,
    /// Dropout masks come from `seed` and a per-call counter, so a run is reproducible. The
    /// stream is counter-based: mask k depends on (seed, k) only, so a resumed run seeks to
    /// any k in O(1) by setting the counter ([`LinearAdapter::set_rng_state`]).
    seed: u64,
    calls: AtomicU64,
    /// Selected by the user (PEFT's `set_adapter` / enabling one adapter of several).
    active: AtomicBool,
    /// Its delta is in the base weight: the on-the-fly path must be skipped.
    merged: AtomicBool,
    /// DoRA's magnitude vector (out,), PEFT's `lora_magnitude_vector`; `None`: plain LoRA.
    magnitude: Option<Var>,
    /// The row norms of W + ΔW when DoRA was merged, to unmerge exactly (PEFT caches them too).
    merged_norm: std::sync::Mutex<Option<Tensor>>,
    /// (A₀, B₀) of a PiSSA / OLoRA init, f32: `scale·B₀A₀` was taken out of the base weight,
    /// so the adapter is saved converted against them (`peft::lora::convert`).
    mutated_init: std::sync::Mutex<Option<(Tensor, Tensor)>>,
}

/// How A and B start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// A Kaiming-uniform (torch `kaiming_uniform_(a=sqrt(5))`: U(±1/sqrt(in))), B zero.
    Default,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// A and B both Kaiming-uniform, like two fresh `nn.Linear`s (the adapter is not a no-op).
    Random,
}

/// torch `kaiming_uniform_(w, a=sqrt(5))` on a (rows, fan_in) weight: gain sqrt(2/(1+5)),
/// bound gain·sqrt(3/fan_in) = 1/sqrt(fan_in).
fn kaiming_uniform(rng: &mut StdRng, rows: usize, fan_in: usize, dev: &Device) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let v: Vec<f32> = (0..rows * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Tensor::from_vec(v, (rows, fan_in), dev)
}

fn gaussian(rng: &mut StdRng, rows: usize, cols: usize, std: f32, dev: &Device) -> Result<Tensor> {
    // Box-Muller; rand 0.9 has no normal distribution without rand_distr.
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), dev)
}

impl LoraAdapter {
    /// A fresh adapter for a (out_f, in_f) linear. `rng` draws the initial weights.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_f: usize,
        out_f: usize,
        r: usize,
        alpha: f64,
        scale: f64,
        dropout: f32,
        init: LoraInit,
        rng: &mut StdRng,
        dropout_seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let a = match init {
            LoraInit::Default | LoraInit::Random => kaiming_uniform(rng, r, in_f, dev)?,
            LoraInit::Gaussian => gaussian(rng, r, in_f, 1.0 / r as f32, dev)?,
        };
        let b = match init {
            LoraInit::Random => kaiming_uniform(rng, out_f, r, dev)?,
            _ => Tensor::zeros((out_f, r), DType::F32, dev)?,
        };
        Self::from_weights(a, b, alpha, scale, dropout, dropout_seed)
    }

    /// An adapter with given A (r, in) and B (out, r), converted to f32.
    pub fn from_weights(
        a: Tensor,
        b: Tensor,
        alpha: f64,
        scale: f64,
        dropout: f32,
        dropout_seed: u64,
    ) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, r2) = b.dims2()?;
        if r != r2 {
            candle_core::bail!("LoRA: A is {:?} but B is {:?}", a.dims(), b.dims());
        }
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?.contiguous()?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?.contiguous()?)?,
            r,
            alpha,
            scale,
            dropout,
            seed: dropout_seed,
            calls: AtomicU64::new(0),
            active: AtomicBool::new(true),
            merged: AtomicBool::new(false),
            magnitude: None,
            merged_norm: std::sync::Mutex::new(None),
            mutated_init: std::sync::Mutex::new(None),
        })
    }

    /// Record the initial (A₀, B₀) of an init that changed the base weight (PiSSA, OLoRA).
    pub fn with_mutated_init(self, a0: Tensor, b0: Tensor) -> Self {
        self.set_mutated_init(a0, b0);
        self
    }

    /// Replace the recorded (A₀, B₀) (a checkpoint's, on resume).
    pub fn set_mutated_init(&self, a0: Tensor, b0: Tensor) {
        *self.mutated_init.lock().expect("not poisoned") = Some((a0, b0));
    }

    /// (A₀, B₀) when the adapter was made by PiSSA / OLoRA on this model.
    pub fn mutated_init(&self) -> Option<(Tensor, Tensor)> {
        self.mutated_init.lock().expect("not poisoned").clone()
    }

    /// Make this a DoRA adapter over the base weight `w` (out, in): the magnitude starts at the
    /// row norms of W + scale·BA, so the adapted layer starts where plain LoRA would (PEFT's
    /// `DoraLinearLayer.update_layer`).
    pub fn with_dora(mut self, w: &LinearWeight) -> Result<Self> {
        let norm = self.weight_norm(&w.to_dense_f32()?)?;
        self.magnitude = Some(Var::from_tensor(&norm)?);
        Ok(self)
    }

    /// DoRA with a given magnitude (out,), kept in its dtype (the gradient checks run in f64).
    pub fn with_magnitude(mut self, m: Var) -> Self {
        self.magnitude = Some(m);
        self
    }

    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref()
    }

    /// ‖W + scale·BA‖ per output row, detached (PEFT's `get_weight_norm`).
    fn weight_norm(&self, w: &Tensor) -> Result<Tensor> {
        let lora_w = self
            .b
            .as_tensor()
            .detach()
            .matmul(&self.a.as_tensor().detach())?
            .to_dtype(w.dtype())?;
        (w.detach() + (lora_w * self.scale)?)?.sqr()?.sum(1)?.sqrt()
    }

    /// The merged DoRA weight `m/‖W+ΔW‖ ⊙ (W + ΔW)` for base `w` (f32), as PEFT's merge; the
    /// norm is kept for [`Self::dora_unmerged`].
    pub(crate) fn dora_merged(&self, w: &Tensor) -> Result<Tensor> {
        let m = self.magnitude.as_ref().expect("a DoRA adapter");
        let norm = self.weight_norm(w)?;
        let factor = (m.as_tensor().detach().to_dtype(w.dtype())? / &norm)?;
        let delta = self
            .delta_weight()?
            .expect("LoRA has a delta")
            .to_dtype(w.dtype())?;
        *self.merged_norm.lock().expect("not poisoned") = Some(norm);
        (w + delta)?.broadcast_mul(&factor.unsqueeze(1)?)
    }

    /// Undo [`Self::dora_merged`]: `W = W' / factor − ΔW` (PEFT's unmerge).
    pub(crate) fn dora_unmerged(&self, merged: &Tensor) -> Result<Tensor> {
        let m = self.magnitude.as_ref().expect("a DoRA adapter");
        let norm = self
            .merged_norm
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or_else(|| candle_core::Error::Msg("DoRA: unmerge without a merge".into()))?;
        let factor = (m.as_tensor().detach().to_dtype(merged.dtype())? / norm)?;
        let delta = self
            .delta_weight()?
            .expect("LoRA has a delta")
            .to_dtype(merged.dtype())?;
        merged.broadcast_div(&factor.unsqueeze(1)?)? - delta
    }

    pub fn a(&self) -> &Var {
        &self.a
    }
    pub fn b(&self) -> &Var {
        &self.b
    }
    pub fn r(&self) -> usize {
        self.r
    }
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    pub fn scale(&self) -> f64 {
        self.scale
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

    /// Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p). The
    /// mask of call k is drawn from a generator seeded with (seed, k) alone, never from the
    /// previous call's state.
    fn dropout_mask(&self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = StdRng::seed_from_u64(self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let p = self.dropout;
        let keep = 1.0 / (1.0 - p);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        Tensor::from_vec(v, shape, dev)
    }
}

impl LinearAdapter for LoraAdapter {
    fn method(&self) -> &'static str {
        "lora"
    }

    fn rng_state(&self) -> Option<u64> {
        Some(self.calls.load(Ordering::Relaxed))
    }

    fn set_rng_state(&self, state: u64) {
        self.calls.store(state, Ordering::Relaxed)
    }

    /// Training on the CPU in f32 over a frozen base: one op that keeps fewer activations
    /// (see `fused.rs`). Inference and everything else take the composed path.
    fn forward_fused(
        &self,
        x: &Tensor,
        weight: &LinearWeight,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Option<Result<Tensor>> {
        let frozen = matches!(weight, LinearWeight::Frozen(_) | LinearWeight::Quantized(_));
        if !train
            || self.magnitude.is_some()
            || crate::ops::reference_ops()
            || !frozen
            || !self.is_active()
            || self.is_merged()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
        {
            return None;
        }
        Some((|| {
            let dims = x.dims().to_vec();
            let in_f = *dims.last().unwrap_or(&0);
            let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
            let x2 = x.reshape((rows, in_f))?.contiguous()?;
            let mask = if self.dropout > 0.0 {
                Some(self.dropout_mask(x2.dims(), x2.device())?)
            } else {
                None
            };
            let y = super::fused::lora_linear(
                &x2,
                weight,
                bias,
                self.a.as_tensor(),
                self.b.as_tensor(),
                self.scale,
                mask,
            )?;
            let mut out_dims = dims;
            *out_dims.last_mut().expect("non-empty dims") = y.dim(1)?;
            y.reshape(out_dims)
        })())
    }

    fn forward_with_base(
        &self,
        x: &Tensor,
        base_out: Tensor,
        weight: &LinearWeight,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let Some(m) = &self.magnitude else {
            return self.forward(x, base_out, train);
        };
        if !self.is_active() || self.is_merged() {
            return Ok(base_out);
        }
        // DoRA computes in the magnitude's dtype (f32; f64 in the gradient checks).
        let dt = m.dtype();
        let w = match weight {
            LinearWeight::Frozen(w) => w.to_dtype(dt)?,
            other => other.to_dense_f32()?.to_dtype(dt)?,
        };
        let scale_rows = (m.as_tensor() / self.weight_norm(&w)?)?; // (out,)
        let xd = x.to_dtype(dt)?;
        let dims = xd.dims().to_vec();
        let in_f = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let mut x2 = xd.reshape((rows, in_f))?;
        // PEFT: with dropout in training the base product is recomputed on the dropped input;
        // otherwise it is the base output minus the bias.
        let base_part = if train && self.dropout > 0.0 {
            x2 = (&x2 * self.dropout_mask(x2.dims(), x2.device())?.to_dtype(dt)?)?;
            x2.matmul(&w.t()?)?
        } else {
            let b = base_out.to_dtype(dt)?.reshape((rows, ()))?;
            match bias {
                Some(bias) => b.broadcast_sub(&bias.to_dtype(dt)?)?,
                None => b,
            }
        };
        let lora = x2
            .matmul(&self.a.as_tensor().to_dtype(dt)?.t()?)?
            .matmul(&self.b.as_tensor().to_dtype(dt)?.t()?)?;
        let extra = (base_part.broadcast_mul(&(&scale_rows - 1.0)?)?
            + (lora * self.scale)?.broadcast_mul(&scale_rows)?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty dims") = extra.dim(1)?;
        let extra = extra.reshape(out_dims)?;
        let bt = base_out.dtype();
        (base_out.to_dtype(dt)? + extra)?.to_dtype(bt)
    }

    fn forward(&self, x: &Tensor, base_out: Tensor, train: bool) -> Result<Tensor> {
        if !self.is_active() || self.is_merged() {
            return Ok(base_out);
        }
        if self.magnitude.is_some() {
            candle_core::bail!("DoRA needs the base weight: call forward_with_base");
        }
        let x32 = x.to_dtype(DType::F32)?;
        let x32 = if train && self.dropout > 0.0 {
            (x32.clone() * self.dropout_mask(x32.dims(), x32.device())?)?
        } else {
            x32
        };
        let dims = x32.dims().to_vec();
        let in_f = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // 2-D matmuls: (rows, in) @ Aᵀ (in, r) @ Bᵀ (r, out).
        let h = x32
            .reshape((rows, in_f))?
            .matmul(&self.a.as_tensor().t()?)?;
        // Scale the rank-r intermediate rather than the output: the same product, and one
        // fewer out-sized tensor for autograd to keep.
        let lora = (h * self.scale)?.matmul(&self.b.as_tensor().t()?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = lora.dim(1)?;
        let lora = lora.reshape(out_dims)?;
        // Add in f32 and cast back, as PEFT's type promotion does for a bf16 base.
        let dt = base_out.dtype();
        if dt == DType::F32 {
            base_out + lora
        } else {
            (base_out.to_dtype(DType::F32)? + lora)?.to_dtype(dt)
        }
    }

    fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("lora_A.weight".to_string(), self.a.clone()),
            ("lora_B.weight".to_string(), self.b.clone()),
        ];
        // PEFT's key has no `.weight`: `...q_proj.lora_magnitude_vector`.
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".to_string(), m.clone()));
        }
        v
    }

    fn delta_weight(&self) -> Result<Option<Tensor>> {
        let d = self
            .b
            .as_tensor()
            .detach()
            .matmul(&self.a.as_tensor().detach())?;
        Ok(Some((d * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_tensor(rng: &mut StdRng, shape: (usize, usize)) -> Tensor {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn default_init_is_kaiming_a_and_zero_b() {
        let mut rng = StdRng::seed_from_u64(1);
        let l = LoraAdapter::new(
            256,
            32,
            8,
            16.0,
            2.0,
            0.0,
            LoraInit::Default,
            &mut rng,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let a: Vec<f32> = l.a().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 16.0;
        assert!(a.iter().all(|x| x.abs() <= bound));
        // U(-b, b) has variance b²/3.
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!(
            (var - bound * bound / 3.0).abs() < 0.1 * bound * bound / 3.0,
            "{var}"
        );
        let b: Vec<f32> = l.b().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(b.iter().all(|&x| x == 0.0));
        let g = LoraAdapter::new(
            256,
            32,
            8,
            16.0,
            2.0,
            0.0,
            LoraInit::Gaussian,
            &mut rng,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let a: Vec<f32> = g.a().as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((var - 1.0 / 64.0).abs() < 0.1 / 64.0, "{var}");
    }

    #[test]
    fn forward_is_base_plus_scaled_low_rank_and_bf16_base_is_cast_back() {
        let mut rng = StdRng::seed_from_u64(7);
        let (in_f, out_f, r) = (12, 10, 3);
        let a = rand_tensor(&mut rng, (r, in_f));
        let b = rand_tensor(&mut rng, (out_f, r));
        let l = LoraAdapter::from_weights(a.clone(), b.clone(), 6.0, 2.0, 0.0, 0).unwrap();
        let x = rand_tensor(&mut rng, (5, in_f))
            .reshape((1, 5, in_f))
            .unwrap();
        let base = rand_tensor(&mut rng, (5, out_f))
            .reshape((1, 5, out_f))
            .unwrap();
        let got = l.forward(&x, base.clone(), false).unwrap();
        // Reference: x (B A)ᵀ · scale, through the dense product.
        let want = (base.clone()
            + x.broadcast_matmul(&(b.matmul(&a).unwrap() * 2.0).unwrap().t().unwrap())
                .unwrap())
        .unwrap();
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        let got16 = l
            .forward(
                &x.to_dtype(DType::BF16).unwrap(),
                base.to_dtype(DType::BF16).unwrap(),
                false,
            )
            .unwrap();
        assert_eq!(got16.dtype(), DType::BF16);
        // Inactive or merged: the base output passes through unchanged.
        l.set_active(false);
        let off = l.forward(&x, base.clone(), false).unwrap();
        assert_eq!(
            off.to_vec3::<f32>().unwrap(),
            base.to_vec3::<f32>().unwrap()
        );
    }

    /// DoRA through `Linear::forward_t` (frozen W and bias): the gradients of the input, A, B
    /// and the magnitude match finite differences (the weight norm is detached, as in PEFT, so
    /// the reference is the same function with the norm held at its value).
    #[test]
    fn dora_gradients_match_finite_differences() {
        use crate::nn::Linear;
        use crate::ops::gradcheck::{check_gradients, rand_tensor};
        let (in_f, out_f, r) = (6, 5, 2);
        let w = rand_tensor(&[out_f, in_f], DType::F64, 3).unwrap();
        let bias = rand_tensor(&[out_f], DType::F64, 4).unwrap();
        let f = |xs: &[Tensor]| -> Result<Tensor> {
            let mut lin = Linear::new("m", LinearWeight::Frozen(w.clone()), Some(bias.clone()));
            // from_weights stores f32 copies; put the f64 variables in for the check.
            let mut l = LoraAdapter::from_weights(xs[1].clone(), xs[2].clone(), 3.0, 1.5, 0.0, 0)?;
            l.a = Var::from_tensor(&xs[1])?;
            l.b = Var::from_tensor(&xs[2])?;
            let l = l.with_magnitude(Var::from_tensor(&xs[3])?);
            lin.add_adapter("default", Box::new(l));
            lin.forward_t(&xs[0], true)
        };
        let x = rand_tensor(&[2, 3, in_f], DType::F64, 1).unwrap();
        let a = rand_tensor(&[r, in_f], DType::F64, 5).unwrap();
        let b = rand_tensor(&[out_f, r], DType::F64, 6).unwrap();
        let m = (rand_tensor(&[out_f], DType::F64, 7).unwrap() + 2.0).unwrap();
        // x and m do not move the norm: the whole layer against finite differences.
        let (a0, b0) = (a.clone(), b.clone());
        let f_xm = |xs: &[Tensor]| f(&[xs[0].clone(), a0.clone(), b0.clone(), xs[1].clone()]);
        check_gradients(f_xm, &[x.clone(), m.clone()], 1e-5, 1e-6).unwrap();
        // A and B: the norm is detached (PEFT), so their gradients are those of the same layer
        // with the norm held at its value; that function passes finite differences, and the
        // layer's outputs and gradients equal it.
        let frozen_norm = |xs: &[Tensor]| -> Result<Tensor> {
            let lw = b0.matmul(&a0)?;
            let norm = (&w + (lw * 1.5)?)?.sqr()?.sum(1)?.sqrt()?;
            let s = (&xs[3] / norm)?;
            let base = xs[0].broadcast_matmul(&w.t()?)?;
            let lora = xs[0]
                .broadcast_matmul(&xs[1].t()?)?
                .broadcast_matmul(&xs[2].t()?)?;
            let y = (base.broadcast_mul(&s)? + (lora * 1.5)?.broadcast_mul(&s)?)?;
            y.broadcast_add(&bias)
        };
        let all = [x, a, b, m];
        check_gradients(frozen_norm, &all, 1e-5, 1e-6).unwrap();
        crate::ops::gradcheck::compare_grads(f, frozen_norm, &all, 1e-9, "DoRA").unwrap();
    }

    #[test]
    fn dora_merge_equals_forward_and_unmerge_restores() {
        let mut rng = StdRng::seed_from_u64(9);
        let (in_f, out_f, r) = (7, 5, 2);
        let w = rand_tensor(&mut rng, (out_f, in_f));
        let l = LoraAdapter::from_weights(
            rand_tensor(&mut rng, (r, in_f)),
            rand_tensor(&mut rng, (out_f, r)),
            4.0,
            2.0,
            0.0,
            0,
        )
        .unwrap()
        .with_dora(&LinearWeight::Frozen(w.clone()))
        .unwrap();
        // The magnitude starts at the row norms of W + ΔW.
        let m0 = l.magnitude().unwrap().as_tensor().clone();
        let wd = (&w + l.delta_weight().unwrap().unwrap()).unwrap();
        let n: Vec<f32> = wd
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(m0.to_vec1::<f32>().unwrap(), n);
        l.magnitude().unwrap().set(&(m0 * 1.3).unwrap()).unwrap();
        let x = rand_tensor(&mut rng, (4, in_f));
        let base = x.matmul(&w.t().unwrap()).unwrap();
        let lw = LinearWeight::Frozen(w.clone());
        let y = l.forward_with_base(&x, base, &lw, None, false).unwrap();
        let merged = l.dora_merged(&w).unwrap();
        let ym = x.matmul(&merged.t().unwrap()).unwrap();
        let d = (y - ym)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        let back = l.dora_unmerged(&merged).unwrap();
        let d = (back - &w)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn dropout_zeroes_about_p_and_rescales_the_rest_only_in_training() {
        let n = 64;
        let eye = Tensor::eye(n, DType::F32, &Device::Cpu).unwrap();
        let p = 0.25f32;
        let l = LoraAdapter::from_weights(eye.clone(), eye, 1.0, 1.0, p, 42).unwrap();
        let x = Tensor::ones((1, 64, n), DType::F32, &Device::Cpu).unwrap();
        let base = Tensor::zeros((1, 64, n), DType::F32, &Device::Cpu).unwrap();
        let eval: Vec<f32> = l
            .forward(&x, base.clone(), false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(eval.iter().all(|&v| v == 1.0));
        let train: Vec<f32> = l
            .forward(&x, base.clone(), true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let keep = 1.0 / (1.0 - p);
        assert!(train.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-6));
        let zeros = train.iter().filter(|&&v| v == 0.0).count() as f32 / train.len() as f32;
        assert!((zeros - p).abs() < 0.03, "dropped fraction {zeros}");
        // A new mask each call.
        let again: Vec<f32> = l
            .forward(&x, base, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(train, again);
    }
}
