//! The memory a training run will need, estimated before it starts, and the check that refuses
//! a run that cannot fit.
//!
//! The estimate adds up what the trainer actually allocates (CPU, f32 activations):
//! - the model's weights as loaded (quantized blocks stay quantized), plus the transposed Q8_0
//!   copies the quantized backward pass builds ([`crate::quant::BackwardWeights`]);
//! - trainable parameters with their gradient (f32, 8 B each; a model weight trained in place,
//!   already among the weights, only adds its gradient) and the optimizer's state, plus the
//!   temporaries of the largest trained tensor's update
//!   ([`crate::train::optim::state_bytes`]: AdamW 8 B per parameter, SGD with momentum 4,
//!   Adafactor a row and a column per matrix, 8-bit AdamW about 2);
//! - activations kept for the backward pass, counted tensor by tensor from each family's
//!   forward pass ([`Model::activation_floats_per_token`]; LLaMA: `llama.rs`); with activation
//!   checkpointing, each layer's input plus one layer's full set;
//! - the LM head's working set: one chunk of logits and the gradient of the loss rows;
//! - the tokenized data set, and a fixed runtime share (code, tokenizer, allocator slack)
//!   measured on this implementation.
use crate::model::Model;
use crate::nn::{Linear, LinearWeight};

/// Bytes, by component. `total()` is the expected peak resident set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub backward_copies: u64,
    pub trainable_state: u64,
    pub activations: u64,
    pub head: u64,
    pub data: u64,
    pub runtime: u64,
    /// Temporaries the size of the largest trained tensor while the optimizer updates it.
    pub step_working: u64,
    /// The resident set while the model loads, when that is more than training needs (ZeRO-3:
    /// a rank reads the whole model, or with a frozen base only its own share, then drops the
    /// other ranks' share; `train.base_quant`: the stored weights are read before they are
    /// quantized); 0: none.
    pub load_floor: u64,
}

/// What the estimate depends on besides the model.
#[derive(Clone, Debug)]
pub struct TrainShape {
    /// Largest micro-batch: rows × padded length.
    pub max_batch_tokens: usize,
    /// Largest number of loss tokens in one micro-batch (bounded by `max_batch_tokens`).
    pub max_loss_tokens: usize,
    pub trainable_params: usize,
    pub checkpointing: bool,
    /// LoRA dropout > 0 keeps a mask and a masked copy of each adapted input.
    pub dropout: bool,
    /// Whether quantized linears build transposed Q8_0 copies for the backward pass.
    pub q8_backward: bool,
    /// Tokens in the tokenized train and validation sets.
    pub data_tokens: usize,
    /// Bytes of optimizer state for the trainable parameters; `None`: AdamW's (8 per
    /// parameter).
    pub optimizer_state_bytes: Option<u64>,
    /// The trainable parameters are the model's own weights (full and selective fine-tuning),
    /// already counted in `weights`; otherwise (adapters) they are extra f32 tensors.
    pub params_in_weights: bool,
    /// Values of the largest trainable tensor.
    pub largest_param: usize,
    /// f32 temporaries of a parameter's size one optimizer update holds at once
    /// ([`crate::train::optim::step_temporaries`]).
    pub optimizer_temporaries: u64,
}

impl TrainShape {
    /// The shape of a run of `cfg` on `prepared` data batched by `bc`.
    pub fn for_run(
        prepared: &crate::data::Prepared,
        bc: &crate::data::BatchConfig,
        params: &[(String, candle_core::Var)],
        cfg: &super::config::TrainConfig,
        t: &super::config::TrainSection,
    ) -> Self {
        let longest = prepared
            .train
            .iter()
            .chain(&prepared.validation)
            .map(|e| e.len())
            .max()
            .unwrap_or(0);
        // Saturating: a batch size of 2^63 must come out as "too much", not wrap around to
        // a small number that the memory check approves.
        let max_batch_tokens = if bc.packing {
            bc.batch_size.saturating_mul(bc.max_seq_len)
        } else {
            bc.batch_size.saturating_mul(longest)
        };
        // the largest loss-token counts of single examples, as many as a batch holds
        let mut loss: Vec<usize> = prepared
            .train
            .iter()
            .map(|e| {
                e.labels
                    .iter()
                    .filter(|&&l| l != crate::data::IGNORE)
                    .count()
            })
            .collect();
        loss.sort_unstable_by(|a, b| b.cmp(a));
        let per_batch = if bc.packing {
            loss.len()
        } else {
            bc.batch_size
        };
        let max_loss_tokens = loss
            .iter()
            .take(per_batch)
            .fold(0usize, |a, &b| a.saturating_add(b))
            .min(max_batch_tokens);
        let data_tokens = prepared
            .train
            .iter()
            .chain(&prepared.validation)
            .fold(0usize, |a, e| a.saturating_add(e.len()));
        TrainShape {
            largest_param: params
                .iter()
                .map(|(_, v)| v.elem_count())
                .max()
                .unwrap_or(0),
            optimizer_temporaries: super::optim::step_temporaries(&t.optimizer_config()),
            params_in_weights: matches!(
                cfg.method,
                super::config::Method::Full | super::config::Method::Selective
            ),
            max_batch_tokens,
            max_loss_tokens,
            trainable_params: params
                .iter()
                .fold(0usize, |a, (_, v)| a.saturating_add(v.elem_count())),
            checkpointing: t.gradient_checkpointing,
            dropout: cfg.lora.dropout > 0.0,
            q8_backward: t.quantized_backward == super::config::QuantizedBackward::Q8_0,
            data_tokens,
            optimizer_state_bytes: Some(super::optim::state_bytes(
                &t.optimizer_config(),
                &params
                    .iter()
                    .map(|(_, v)| v.dims().to_vec())
                    .collect::<Vec<_>>(),
            )),
        }
    }
}

/// Code, tokenizer, thread stacks and allocator slack: the resident set of a run with a tiny
/// model, measured on the development machine.
const RUNTIME_BYTES: u64 = 60 << 20;
/// Logits per chunk of the fused LM-head loss (see `ops::linear_cross_entropy`).
const HEAD_CHUNK_FLOATS: u64 = 8 << 20;

impl MemoryEstimate {
    /// The sum, saturating at `u64::MAX` (which no machine has), or the load floor if higher.
    pub fn total(&self) -> u64 {
        self.training_total().max(self.load_floor)
    }

    /// The sum of the training components.
    fn training_total(&self) -> u64 {
        [
            self.backward_copies,
            self.trainable_state,
            self.activations,
            self.head,
            self.data,
            self.runtime,
            self.step_working,
        ]
        .iter()
        .fold(self.weights, |a, &b| a.saturating_add(b))
    }

    /// One line per component, then the total.
    pub fn table(&self) -> String {
        let h = crate::inspect::human_bytes;
        let line = format!(
            "memory estimate: weights {} + backward copies {} + trainable state {} + activations {} + LM head {} + step working set {} + data {} + runtime {} = {}",
            h(self.weights),
            h(self.backward_copies),
            h(self.trainable_state),
            h(self.activations),
            h(self.head),
            h(self.step_working),
            h(self.data),
            h(self.runtime),
            h(self.training_total())
        );
        if self.load_floor > self.training_total() {
            format!("{line}; peak {} while the model loads", h(self.load_floor))
        } else {
            line
        }
    }
}

/// Saturating u64 arithmetic: the estimate multiplies sizes from the config and the model, and
/// an absurd one must give an absurd total (refused), never wrap around to a small one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sat(pub u64);

impl std::ops::Add for Sat {
    type Output = Sat;
    fn add(self, o: Sat) -> Sat {
        Sat(self.0.saturating_add(o.0))
    }
}

impl std::ops::Mul for Sat {
    type Output = Sat;
    fn mul(self, o: Sat) -> Sat {
        Sat(self.0.saturating_mul(o.0))
    }
}

/// f32 values the adapters of `lin` keep per token for the backward pass: each LoRA adapter
/// (fused with its base, see `peft::lora::fused`) its rank-r product (r) and, with dropout, the
/// masked input (in); a DoRA adapter, unfused, more (see below); a bottleneck adapter its input
/// and output (2 out) and its two bottleneck-wide intermediates.
pub fn adapter_floats(lin: &Linear, dropout: bool) -> u64 {
    if !lin.has_active_adapters() {
        return 0;
    }
    let inp = lin.in_features() as u64;
    let out = lin.out_features() as u64;
    lin.adapters()
        .map(|(_, a)| {
            if a.method() == "bottleneck" {
                // The f32 module output, the bottleneck's pre-activation and activation, and
                // the up-projection's output.
                let b: u64 = a
                    .trainable_params()
                    .first()
                    .map(|(_, v)| v.dims()[0] as u64)
                    .unwrap_or(0);
                return out.saturating_mul(2).saturating_add(b.saturating_mul(2));
            }
            let params = a.trainable_params();
            let r: u64 = params
                .iter()
                .find(|(n, _)| n.contains("lora_A"))
                .map(|(_, v)| v.dims()[0] as u64)
                .unwrap_or(0);
            if params
                .iter()
                .any(|(n, _)| n.contains("lora_magnitude_vector"))
            {
                // DoRA runs unfused (`LoraAdapter::forward_with_base`): x·Aᵀ (r), then six
                // module-wide tensors (the low-rank output, it scaled, it rescaled by the row
                // factor, the rescaled base part, their sum, the output); with dropout also the
                // mask, the dropped input and the base product recomputed on it.
                let drop = if dropout {
                    inp.saturating_mul(2).saturating_add(out)
                } else {
                    0
                };
                return r.saturating_add(out.saturating_mul(6)).saturating_add(drop);
            }
            r.saturating_add(if dropout { inp } else { 0 })
        })
        .fold(0u64, u64::saturating_add)
}

/// The estimate for training `model` (adapters attached) at `shape`. Every sum and product
/// saturates, so the total of an absurd shape is at least as absurd.
pub fn estimate(model: &dyn Model, shape: &TrainShape) -> MemoryEstimate {
    let d = model.dims();
    let h = Sat(d.hidden_size as u64);
    let layers = Sat(d.layers as u64);
    let tokens = Sat(shape.max_batch_tokens as u64);
    let f32_bytes = Sat(4);

    // Weights as held (a tied LM head shares the embedding's storage), and the transposed Q8_0
    // copies the quantized backward pass builds.
    let weights = crate::model::family::parameter_storage(model)
        .iter()
        .fold(Sat(0), |a, (_, _, bytes)| a + Sat(*bytes));
    let mut backward_copies = Sat(0);
    if shape.q8_backward {
        for lin in model.linears() {
            if let LinearWeight::Quantized(q) = lin.weight() {
                let (out, inp) = q.shape();
                if out % 32 == 0 {
                    backward_copies =
                        backward_copies + Sat(inp as u64) * Sat(out as u64 / 32) * Sat(34);
                }
            }
        }
    }

    // The gradient of each trainable parameter; the parameter itself where it is not a model
    // weight already counted above (adapters); and the optimizer's state. (Full fine-tuning in f32 with AdamW: 4 + 8 bytes beyond the weights.)
    let optimizer_state = Sat(shape
        .optimizer_state_bytes
        .unwrap_or_else(|| (shape.trainable_params as u64).saturating_mul(8)));
    // Trained tensors are f32 whatever `train.dtype` holds the frozen ones in.
    let per_param = if shape.params_in_weights {
        f32_bytes
    } else {
        f32_bytes * Sat(2)
    };
    let trainable_state = Sat(shape.trainable_params as u64) * per_param + optimizer_state;

    // Activations are f32: embeddings and every linear's output are computed in f32.
    let act_bytes = f32_bytes;
    let per_layer = Sat(model.layer_floats_per_token(shape.dropout)) * act_bytes;
    let all_layers = Sat(model.activation_floats_per_token(shape.dropout)) * act_bytes;
    let activations = if shape.checkpointing {
        // every layer's input, plus one layer recomputed with its graph
        tokens * ((layers + Sat(1)) * h * act_bytes + per_layer)
    } else {
        // embeddings, every layer's graph, the final norm
        tokens * (all_layers + Sat(2) * h * act_bytes)
    };
    // the backward pass holds about one layer's worth of gradients at a time (with
    // checkpointing, inside the recomputed layer counted above)
    let backward_transient = if shape.checkpointing {
        Sat(0)
    } else {
        tokens * per_layer
    };

    let vocab = Sat(d.vocab_size as u64);
    let loss_tokens = Sat(shape.max_loss_tokens as u64);
    let chunk = Sat(HEAD_CHUNK_FLOATS).min(loss_tokens * vocab);
    let head = chunk * f32_bytes * Sat(2) + loss_tokens * h * f32_bytes * Sat(2);

    // ids (u32) and labels (i64) per token, plus the text they came from (about 4 bytes a token)
    let data = Sat(shape.data_tokens as u64) * Sat(16);

    // The optimizer updates one tensor at a time; the largest one's temporaries set the peak.
    let largest = Sat(shape.largest_param as u64) * f32_bytes;
    let step_working = largest * Sat(shape.optimizer_temporaries);

    MemoryEstimate {
        step_working: step_working.0,
        weights: weights.0,
        backward_copies: backward_copies.0,
        trainable_state: trainable_state.0,
        activations: (activations + backward_transient).0,
        head: head.0,
        data: data.0,
        runtime: RUNTIME_BYTES,
        load_floor: 0,
    }
}

/// Memory this process may still use: the cgroup limit (containers) or `MemAvailable`, plus
/// what the process already holds. `None` where neither can be read.
pub fn available_bytes() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024 + super::report::proc_status_bytes("VmRSS:"))
    });
    match (cgroup, meminfo) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::lora::{LoraAdapter, LoraInit};
    use candle_core::{DType, Device, Tensor};
    use rand::SeedableRng;

    /// A (out, in) linear with one r-rank LoRA adapter, DoRA when `dora`.
    fn adapted(out: usize, inp: usize, r: usize, dora: bool) -> Linear {
        let dev = Device::Cpu;
        let w = LinearWeight::Frozen(Tensor::ones((out, inp), DType::F32, &dev).unwrap());
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut a = LoraAdapter::new(
            inp,
            out,
            r,
            16.0,
            2.0,
            0.1,
            LoraInit::Default,
            &mut rng,
            0,
            &dev,
        )
        .unwrap();
        if dora {
            a = a.with_dora(&w).unwrap();
        }
        let mut lin = Linear::new("q_proj", w, None);
        lin.add_adapter("default", Box::new(a));
        lin
    }

    #[test]
    fn dora_counts_its_unfused_tensors_and_lora_its_fused_ones() {
        let (out, inp, r) = (12, 20, 4);
        assert_eq!(adapter_floats(&adapted(out, inp, r, false), false), 4);
        assert_eq!(adapter_floats(&adapted(out, inp, r, false), true), 4 + 20);
        // r + 6 out; with dropout + 2 in + out
        assert_eq!(adapter_floats(&adapted(out, inp, r, true), false), 4 + 72);
        assert_eq!(
            adapter_floats(&adapted(out, inp, r, true), true),
            4 + 72 + 40 + 12
        );
    }
}
