use crate::quant::QuantWeight;
use candle_core::{DType, Result, Tensor, Var};
use std::sync::Arc;

/// The base weight of a linear layer, shape (out_features, in_features) like torch's `nn.Linear`.
#[derive(Clone)]
pub enum LinearWeight {
    /// Frozen dense weight in its stored dtype. Backward yields only the input gradient:
    /// computing a gradient for a weight nobody trains would cost time and memory.
    Frozen(Tensor),
    /// Trainable dense weight (full fine-tuning).
    Trainable(Var),
    /// Frozen GGML-quantized weight; stays quantized, gradients still reach the input.
    Quantized(Arc<QuantWeight>),
}

impl LinearWeight {
    /// The weight as a dense f32 tensor (dequantizing if needed).
    pub fn to_dense_f32(&self) -> Result<Tensor> {
        match self {
            LinearWeight::Frozen(w) => w.to_dtype(DType::F32),
            LinearWeight::Trainable(v) => v.as_tensor().to_dtype(DType::F32),
            LinearWeight::Quantized(q) => q.dequantize(),
        }
    }
    pub fn shape(&self) -> (usize, usize) {
        match self {
            LinearWeight::Frozen(w) => (w.dim(0).unwrap_or(0), w.dim(1).unwrap_or(0)),
            LinearWeight::Trainable(v) => (v.dim(0).unwrap_or(0), v.dim(1).unwrap_or(0)),
            LinearWeight::Quantized(q) => q.shape(),
        }
    }
    /// Human-readable stored type: "f32", "bf16", "q4_1", ...
    pub fn stored_type(&self) -> String {
        match self {
            LinearWeight::Frozen(w) => format!("{:?}", w.dtype()).to_lowercase(),
            LinearWeight::Trainable(v) => format!("{:?}", v.dtype()).to_lowercase(),
            LinearWeight::Quantized(q) => q.format().name(),
        }
    }
    /// Bytes used to hold this weight in memory.
    pub fn storage_bytes(&self) -> usize {
        match self {
            LinearWeight::Frozen(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Trainable(v) => v.elem_count() * v.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.storage_bytes(),
        }
    }
}

/// What every PEFT method that wraps a linear layer implements (LoRA, IA3, adapters, ...).
/// A method sees the layer input and the base output and returns the adapted output, so adding a
/// method never touches another one or the layer itself.
pub trait LinearAdapter: std::any::Any + Send + Sync {
    /// Short method name, e.g. "lora".
    fn method(&self) -> &'static str;
    /// `x`: the layer input (..., in); `base_out`: base(x) (..., out). `train` enables dropout.
    fn forward(&self, x: &Tensor, base_out: Tensor, train: bool) -> Result<Tensor>;
    /// Trainable parameters, named relative to the wrapped layer (e.g. "lora_A.weight").
    fn trainable_params(&self) -> Vec<(String, Var)>;
    /// The change this adapter makes to the base weight, if it can be merged (out, in), f32.
    fn delta_weight(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Where the adapter's random stream (dropout masks) stands. Activation checkpointing
    /// reads it before a layer's forward pass and restores it with [`Self::set_rng_state`]
    /// before recomputing that pass, so both see the same masks. `None`: no randomness.
    fn rng_state(&self) -> Option<u64> {
        None
    }
    /// The whole layer, base and adapter, as one op when this adapter is the layer's only one:
    /// `Some` where the method has a fused training path that keeps fewer activations (LoRA
    /// does); `None` to take the composed path (base, then [`Self::forward`]).
    fn forward_fused(
        &self,
        _x: &Tensor,
        _weight: &LinearWeight,
        _bias: Option<&Tensor>,
        _train: bool,
    ) -> Option<Result<Tensor>> {
        None
    }
    fn set_rng_state(&self, _state: u64) {}
    /// The layer input as the base projection should see it, or `None` to leave it as it is.
    /// IA3 rescales the input of feed-forward layers (PEFT: `base_layer(x * ia3_l)`); the
    /// transformed input is also what the adapters' forward passes receive.
    fn transform_input(&self, _x: &Tensor) -> Option<Result<Tensor>> {
        None
    }
    /// [`Self::forward`] for methods that need the base layer itself (DoRA normalises the
    /// adapted weight per output row, and takes the bias out of `base_out`).
    fn forward_with_base(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _weight: &LinearWeight,
        _bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward(x, base_out, train)
    }
}

/// A linear layer `y = x W^T + b`, followed by its attached adapters in order.
pub struct Linear {
    name: String,
    weight: LinearWeight,
    bias: Option<Tensor>,
    adapters: Vec<(String, Box<dyn LinearAdapter>)>,
    /// Adapters temporarily disabled (e.g. to score the base model with adapters loaded).
    adapters_enabled: bool,
    /// A mixed batch (PEFT's `adapter_names=`): row i runs only the adapter named
    /// `row_adapters[i]` (`None`: the base alone), whatever else is attached or active.
    row_adapters: Option<Arc<[Option<String>]>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: LinearWeight, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            adapters: Vec::new(),
            adapters_enabled: true,
            row_adapters: None,
        }
    }
    /// Module path, e.g. `model.layers.3.self_attn.q_proj` (what PEFT's `target_modules` match).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }
    pub fn set_weight(&mut self, weight: LinearWeight) {
        self.weight = weight;
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// Replace the bias (e.g. with a trainable `Var`'s tensor for full fine-tuning).
    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }
    pub fn in_features(&self) -> usize {
        self.weight.shape().1
    }
    pub fn out_features(&self) -> usize {
        self.weight.shape().0
    }
    pub fn add_adapter(
        &mut self,
        adapter_name: impl Into<String>,
        adapter: Box<dyn LinearAdapter>,
    ) {
        self.adapters.push((adapter_name.into(), adapter));
    }
    pub fn remove_adapter(&mut self, adapter_name: &str) -> Option<Box<dyn LinearAdapter>> {
        let i = self.adapters.iter().position(|(n, _)| n == adapter_name)?;
        Some(self.adapters.remove(i).1)
    }
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &dyn LinearAdapter)> {
        self.adapters.iter().map(|(n, a)| (n.as_str(), a.as_ref()))
    }
    pub fn set_adapters_enabled(&mut self, on: bool) {
        self.adapters_enabled = on;
    }
    /// Route each row of the next batches through one adapter (see `peft::set_row_adapters`);
    /// `None` ends the mixed batches.
    pub fn set_row_adapters(&mut self, rows: Option<Arc<[Option<String>]>>) {
        self.row_adapters = rows;
    }
    pub fn row_adapters(&self) -> Option<&[Option<String>]> {
        self.row_adapters.as_deref()
    }
    pub fn has_active_adapters(&self) -> bool {
        self.adapters_enabled && !self.adapters.is_empty()
    }

    /// The base projection only (no adapters).
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Frozen(w) => crate::ops::frozen_linear(x, w)?,
            LinearWeight::Trainable(w) => x.broadcast_matmul(&w.as_tensor().t()?)?,
            LinearWeight::Quantized(q) => crate::quant::linear(x, q)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(rows) = self.row_adapters.as_ref().filter(|_| self.adapters_enabled) {
            return self.forward_mixed(x, rows, train);
        }
        if self.adapters_enabled && self.adapters.len() == 1 {
            if let Some(y) =
                self.adapters[0]
                    .1
                    .forward_fused(x, &self.weight, self.bias.as_ref(), train)
            {
                return y;
            }
        }
        let mut transformed = None;
        if self.adapters_enabled {
            for (_, a) in &self.adapters {
                if let Some(t) = a.transform_input(transformed.as_ref().unwrap_or(x)) {
                    transformed = Some(t?);
                }
            }
        }
        let x = transformed.as_ref().unwrap_or(x);
        let mut y = self.forward_base(x)?;
        if self.adapters_enabled {
            for (_, a) in &self.adapters {
                y = a.forward_with_base(x, y, &self.weight, self.bias.as_ref(), train)?;
            }
        }
        Ok(y)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// The base, then only the adapters called `name` (none for `None`).
    fn forward_with(&self, x: &Tensor, name: Option<&str>, train: bool) -> Result<Tensor> {
        let mut y = self.forward_base(x)?;
        if let Some(name) = name {
            for (n, a) in &self.adapters {
                if n == name {
                    y = a.forward(x, y, train)?;
                }
            }
        }
        Ok(y)
    }

    /// A mixed batch: the rows are grouped by adapter, each group runs through the base and
    /// its adapter, and the outputs go back in row order — so each row gets exactly what it
    /// would get alone with its adapter (PEFT's `_mixed_batch_forward`).
    fn forward_mixed(&self, x: &Tensor, rows: &[Option<String>], train: bool) -> Result<Tensor> {
        let b = x.dim(0)?;
        if rows.len() != b {
            candle_core::bail!(
                "{}: the mixed batch names adapters for {} rows but the batch has {b}",
                self.name,
                rows.len()
            );
        }
        let mut groups: Vec<(Option<&str>, Vec<u32>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            // An adapter this layer does not have leaves the row on the base here.
            let key = r
                .as_deref()
                .filter(|n| self.adapters.iter().any(|(a, _)| a == n));
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i as u32),
                None => groups.push((key, vec![i as u32])),
            }
        }
        if groups.len() == 1 {
            return self.forward_with(x, groups[0].0, train);
        }
        let mut outs = Vec::with_capacity(groups.len());
        let mut order: Vec<u32> = Vec::with_capacity(b);
        for (name, idx) in &groups {
            let ids = Tensor::new(idx.as_slice(), x.device())?;
            outs.push(self.forward_with(&x.index_select(&ids, 0)?, *name, train)?);
            order.extend(idx);
        }
        // Row order back: output row i is concatenated row position of i.
        let mut inverse = vec![0u32; b];
        for (pos, &row) in order.iter().enumerate() {
            inverse[row as usize] = pos as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), x.device())?;
        Tensor::cat(&outs, 0)?.index_select(&inverse, 0)
    }

    /// The random-stream states of the attached adapters, in order (see
    /// [`LinearAdapter::rng_state`]).
    pub fn adapter_rng_states(&self) -> Vec<Option<u64>> {
        self.adapters.iter().map(|(_, a)| a.rng_state()).collect()
    }

    /// Restore what [`Self::adapter_rng_states`] returned.
    pub fn set_adapter_rng_states(&self, states: &[Option<u64>]) {
        for ((_, a), s) in self.adapters.iter().zip(states) {
            if let Some(s) = s {
                a.set_rng_state(*s);
            }
        }
    }
}
