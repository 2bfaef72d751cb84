//! `inspect`: what a model is and what it takes to run and to train it.
//!
//! Training memory is for full fine-tuning with AdamW, per parameter:
//! | precision | weights | gradients | Adam moments (2) | bytes/param |
//! |---|---|---|---|---|
//! | fp32 | 4 | 4 (fp32) | 8 (fp32) | 16 |
//! | bf16 | 2 | 2 (bf16) | 8 (fp32) | 12 |
//! | int8 | ~1.03 (int8 + per-block scales) | 2 (bf16) | 8 (fp32) | ~11 |
//! | nf4  | ~0.52 (4 bit + double-quantized scales, QLoRA layout) | 2 (bf16) | 8 (fp32) | ~10.5 |
//! plus activations: per layer and token, (34·h + 5·a·s) bytes at 16 bits (Korthikanti et al.,
//! "Reducing Activation Recomputation in Large Transformer Models"), scaled by the activation
//! width, over every layer of every stack (encoder and decoder), plus the logits and their
//! gradient in fp32 (2·s·V·4 bytes per sequence).
//!
//! Everything comes through the model interface ([`Model`]), so every family is inspected the
//! same way; the report names the family, its architecture kind and its pre-training objective.
use crate::model::{Dims, LoadedModel, Model};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    pub precision: String,
    pub weights_bytes: u64,
    pub gradients_bytes: u64,
    pub optimizer_bytes: u64,
    pub activations_bytes: u64,
    pub train_total_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub format: String,
    pub architecture: String,
    /// The model family: `llama`, `t5`, `bert`.
    pub family: String,
    /// `encoder`, `decoder` or `encoder-decoder`.
    pub kind: String,
    /// The objective it was pre-trained with: `clm`, `mlm`, `span_corruption`.
    pub pretraining_objective: String,
    /// PEFT's task type of the loaded model (what its adapters are): `CAUSAL_LM`, ...
    pub task_type: String,
    pub parameters: u64,
    /// Number of parameters held in each stored type, e.g. {"q4_1": ..., "f32": ...}.
    pub stored_types: BTreeMap<String, u64>,
    pub in_memory_bytes: u64,
    pub file_bytes: u64,
    pub context_length: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub tied_embeddings: bool,
    /// `null` for families without rotary embeddings.
    pub rope_theta: Option<f32>,
    pub chat_template: bool,
    pub train_batch_size: usize,
    pub train_seq_len: usize,
    pub memory: Vec<MemoryRow>,
    /// The weights' size in memory per storage format: the decoder's linears in that format
    /// (as `train.base_quant` / `--base-quant` quantize them), everything else at 32 bits
    /// (f32) or 16 bits (the others).
    pub weights_by_format: Vec<FormatRow>,
}

/// One row of [`Report::weights_by_format`].
#[derive(Debug, Clone, Serialize)]
pub struct FormatRow {
    pub format: String,
    pub bits_per_weight: f64,
    /// Parameters stored in the format (the rest stay 16/32-bit).
    pub quantized_params: u64,
    pub weights_bytes: u64,
}

/// [`Report::weights_by_format`] for a model.
fn weights_by_format(m: &dyn Model, params: u64) -> Vec<FormatRow> {
    use crate::quant::BaseQuant;
    let linears: Vec<(String, usize, usize)> = m
        .linears()
        .iter()
        .map(|l| (l.name().to_string(), l.out_features(), l.in_features()))
        .collect();
    let mut rows = vec![
        FormatRow {
            format: "f32".into(),
            bits_per_weight: 32.0,
            quantized_params: 0,
            weights_bytes: params * 4,
        },
        FormatRow {
            format: "bf16/f16".into(),
            bits_per_weight: 16.0,
            quantized_params: 0,
            weights_bytes: params * 2,
        },
    ];
    for name in ["int8", "q8_0", "q4_1", "q4_0", "nf4", "fp4"] {
        let Ok(Some(bq)) = BaseQuant::parse(name, true) else {
            continue;
        };
        let block = match bq {
            BaseQuant::FourBit { .. } => crate::quant::FOUR_BIT_BLOCKSIZE,
            BaseQuant::Int8 => 1,
            BaseQuant::Ggml(d) => d.block_size(),
        };
        let (mut q_params, mut q_bytes) = (0u64, 0f64);
        for (lname, out, inp) in &linears {
            let target = crate::model::weights::is_base_quant_target(&format!("{lname}.weight"));
            if target && *inp > 0 && inp % block == 0 {
                let n = (*out as u64) * (*inp as u64);
                q_params += n;
                q_bytes += match bq {
                    // one f32 absmax (SCB) per row
                    BaseQuant::Int8 => n as f64 + 4.0 * *out as f64,
                    _ => n as f64 * bq.bits_per_weight() / 8.0,
                };
            }
        }
        rows.push(FormatRow {
            format: bq.name(),
            bits_per_weight: bq.bits_per_weight(),
            quantized_params: q_params,
            weights_bytes: q_bytes as u64 + params.saturating_sub(q_params) * 2,
        });
    }
    rows
}

/// Bytes per parameter of the stored weights at each precision (block scales included).
pub(crate) fn weight_bytes_per_param(precision: &str) -> f64 {
    match precision {
        "fp32" => 4.0,
        "bf16" => 2.0,
        // int8 with one fp32 absmax scale per 128-value block.
        "int8" => 1.0 + 4.0 / 128.0,
        // NF4, blocks of 64 with absmax quantized to 8 bits in blocks of 256 (QLoRA double quant).
        "nf4" => 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0),
        _ => 4.0,
    }
}

/// Activation bytes at 16 bits, and the logits with their gradient in fp32, for training at
/// `batch` x `seq_len` (see the module docs), in checked arithmetic: user sizes must not wrap.
/// Errors name the field (`batch`, `seq_len`; the CLI shows them as flags).
fn activation_bytes(
    d: &Dims,
    context: Option<usize>,
    batch: usize,
    seq_len: usize,
) -> Result<(u64, u64)> {
    let bad = |key: &str, what: String| Err(Error::key("inspect", key, what));
    if batch == 0 {
        return bad("batch", "got 0, expected at least 1".into());
    }
    if seq_len == 0 {
        return bad("seq_len", "got 0, expected at least 1".into());
    }
    if let Some(ctx) = context.filter(|&c| seq_len > c) {
        return bad(
            "seq_len",
            format!("got {seq_len}, longer than the model's context window ({ctx} tokens)"),
        );
    }
    let (b, s) = (batch as u64, seq_len as u64);
    let (h, a) = (d.hidden_size as u64, d.attention_heads as u64);
    let (layers, vocab) = (d.layers as u64, d.vocab_size as u64);
    let estimate = || -> Option<(u64, u64)> {
        let per_token = 34u64
            .checked_mul(h)?
            .checked_add(5u64.checked_mul(a)?.checked_mul(s)?)?;
        let act16 = per_token
            .checked_mul(layers)?
            .checked_mul(s)?
            .checked_mul(b)?;
        let logits = 8u64.checked_mul(vocab)?.checked_mul(s)?.checked_mul(b)?;
        // Leave room for the fp32 activations (twice these), the weights and the optimizer.
        act16
            .checked_mul(2)?
            .checked_add(logits)
            .filter(|&x| x < u64::MAX / 2)?;
        Some((act16, logits))
    };
    estimate().ok_or_else(|| {
        Error::key(
            "inspect",
            "batch",
            format!("got {batch} (with seq_len {seq_len}): the memory estimate overflows 64 bits"),
        )
    })
}

pub fn inspect(lm: &LoadedModel, name: &str, batch: usize, seq_len: usize) -> Result<Report> {
    let m: &dyn Model = &*lm.model;
    let d = m.dims();
    let (act16, logits) = activation_bytes(&d, m.context_length(), batch, seq_len)?;
    let mut stored_types: BTreeMap<String, u64> = BTreeMap::new();
    let mut in_memory = 0u64;
    for (ty, n, bytes) in crate::model::family::parameter_storage(m) {
        *stored_types.entry(ty).or_default() += n;
        in_memory += bytes;
    }
    let params: u64 = stored_types.values().sum();

    let memory = ["fp32", "bf16", "int8", "nf4"]
        .iter()
        .map(|&p| {
            let w = (params as f64 * weight_bytes_per_param(p)) as u64;
            let g = params * if p == "fp32" { 4 } else { 2 };
            let opt = params * 8;
            // Cannot overflow: activation_bytes leaves half of u64 for the rest.
            let act = act16 * if p == "fp32" { 2 } else { 1 } + logits;
            MemoryRow {
                precision: p.to_string(),
                weights_bytes: w,
                gradients_bytes: g,
                optimizer_bytes: opt,
                activations_bytes: act,
                train_total_bytes: w + g + opt + act,
            }
        })
        .collect();
    Ok(Report {
        model: name.to_string(),
        format: lm.source.format().to_string(),
        architecture: m.architecture(),
        family: m.family().to_string(),
        kind: m.kind().as_str().to_string(),
        pretraining_objective: m.pretraining_objective().as_str().to_string(),
        task_type: m.task_type().as_peft().to_string(),
        parameters: params,
        stored_types,
        in_memory_bytes: in_memory,
        file_bytes: lm.file_bytes,
        context_length: m.context_length().unwrap_or(0),
        vocab_size: d.vocab_size,
        hidden_size: d.hidden_size,
        layers: d.layers,
        attention_heads: d.attention_heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        intermediate_size: d.intermediate_size,
        tied_embeddings: d.tied_embeddings,
        rope_theta: d.rope_theta,
        chat_template: lm.tokenizer.chat_template().is_some(),
        train_batch_size: batch,
        train_seq_len: seq_len,
        memory,
        weights_by_format: weights_by_format(m, params),
    })
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let types: Vec<String> = self
            .stored_types
            .iter()
            .map(|(t, n)| {
                format!(
                    "{t} {:.1}%",
                    100.0 * *n as f64 / self.parameters.max(1) as f64
                )
            })
            .collect();
        let kv = [
            ("model", self.model.clone()),
            ("format", self.format.clone()),
            (
                "architecture",
                format!("{} ({})", self.architecture, self.kind),
            ),
            ("family", self.family.clone()),
            ("kind", self.kind.clone()),
            ("pre-training", self.pretraining_objective.clone()),
            ("task type", self.task_type.clone()),
            (
                "parameters",
                format!(
                    "{} ({:.1} M)",
                    self.parameters,
                    self.parameters as f64 / 1e6
                ),
            ),
            ("stored as", types.join(", ")),
            ("in memory", human_bytes(self.in_memory_bytes)),
            ("file size", human_bytes(self.file_bytes)),
            (
                "context length",
                if self.context_length == 0 {
                    "no limit (relative positions)".to_string()
                } else {
                    self.context_length.to_string()
                },
            ),
            ("vocab size", self.vocab_size.to_string()),
            (
                "shape",
                format!(
                    "{} layers, hidden {}, ffn {}, {} heads / {} kv heads of {}",
                    self.layers,
                    self.hidden_size,
                    self.intermediate_size,
                    self.attention_heads,
                    self.kv_heads,
                    self.head_dim
                ),
            ),
            ("tied embeddings", self.tied_embeddings.to_string()),
            (
                "rope theta",
                self.rope_theta.map_or("-".to_string(), |t| t.to_string()),
            ),
            (
                "chat template",
                if self.chat_template { "yes" } else { "no" }.to_string(),
            ),
        ];
        for (k, v) in kv {
            s.push_str(&format!("{k:<16} {v}\n"));
        }
        s.push_str(&format!(
            "\nMemory (full fine-tuning with AdamW, batch {} x {} tokens):\n",
            self.train_batch_size, self.train_seq_len
        ));
        s.push_str(&format!(
            "{:<9} {:>11} {:>11} {:>11} {:>12} {:>11}\n",
            "precision", "weights", "gradients", "adam", "activations", "train total"
        ));
        for r in &self.memory {
            s.push_str(&format!(
                "{:<9} {:>11} {:>11} {:>11} {:>12} {:>11}\n",
                r.precision,
                human_bytes(r.weights_bytes),
                human_bytes(r.gradients_bytes),
                human_bytes(r.optimizer_bytes),
                human_bytes(r.activations_bytes),
                human_bytes(r.train_total_bytes)
            ));
        }
        s.push_str(
            "\nWeights per storage format (decoder linears in the format, the rest 16-bit; f32 all 32-bit):\n",
        );
        s.push_str(&format!(
            "{:<9} {:>8} {:>14} {:>11}\n",
            "format", "bits/w", "quantized", "weights"
        ));
        for r in &self.weights_by_format {
            s.push_str(&format!(
                "{:<9} {:>8.3} {:>13.1}% {:>11}\n",
                r.format,
                r.bits_per_weight,
                r.quantized_params as f64 * 100.0 / self.parameters.max(1) as f64,
                human_bytes(r.weights_bytes)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> crate::model::LlamaConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        crate::model::config_from_hf_dir(&dir).unwrap()
    }

    /// The sizes a LLaMA model of `cfg` reports (`Model::dims`).
    fn dims(cfg: &crate::model::LlamaConfig) -> Dims {
        Dims {
            hidden_size: cfg.hidden_size,
            layers: cfg.num_hidden_layers,
            encoder_layers: 0,
            decoder_layers: cfg.num_hidden_layers,
            attention_heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate_size: cfg.intermediate_size,
            vocab_size: cfg.vocab_size,
            tied_embeddings: cfg.tie_word_embeddings,
            rope_theta: Some(cfg.rope_theta),
        }
    }

    #[test]
    fn zero_long_and_huge_training_shapes_are_errors_naming_the_field() {
        let cfg = tiny_config();
        let ctx = cfg.max_position_embeddings;
        let cases = [
            (0, 16, "`batch`"),
            (1, 0, "`seq_len`"),
            (1, ctx + 1, "`seq_len`"),
            (usize::MAX, 16, "overflows"),
            (1 << 44, ctx, "overflows"),
        ];
        for (b, s, want) in cases {
            let e = activation_bytes(&dims(&cfg), Some(ctx), b, s)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "batch {b} seq_len {s}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }

    #[test]
    fn activation_estimate_follows_the_formula() {
        let cfg = tiny_config();
        let (b, s) = (3u64, 100u64);
        let ctx = Some(cfg.max_position_embeddings);
        let (act16, logits) = activation_bytes(&dims(&cfg), ctx, b as usize, s as usize).unwrap();
        let (h, a) = (cfg.hidden_size as u64, cfg.num_attention_heads as u64);
        let layers = cfg.num_hidden_layers as u64;
        assert_eq!(act16, layers * s * b * (34 * h + 5 * a * s));
        assert_eq!(logits, 2 * b * s * cfg.vocab_size as u64 * 4);
    }
}
