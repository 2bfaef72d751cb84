//! Parameter-efficient fine-tuning, laid out like Hugging Face PEFT: each method (`lora`, ...)
//! has a config that mirrors PEFT's `adapter_config.json`, a per-layer adapter implementing
//! [`LinearAdapter`](crate::nn::LinearAdapter), and model-level attach/merge functions;
//! [`format`] reads and writes PEFT's adapter folders for every method.
//!
//! Adapters live inside the model's `Linear` layers under an adapter name, so several can be
//! attached to one base. What is shared by all methods is here: the [`PeftMethod`] trait that
//! the loader dispatches on, parameter listing by PEFT name, and PEFT's parameter report.
pub mod bottleneck;
mod config_check;
pub mod format;
pub mod ia3;
pub mod lora;
pub mod merge_check;
pub mod modules_to_save;
pub mod prompt_learning;
pub mod selective;

pub use format::{load_adapter, read_adapter_config, save_adapter, AdapterConfig, LoadedAdapter};
pub use ia3::{attach_ia3, Ia3Config};
pub use lora::{
    attach_lora, merge_adapter, set_active_adapters, set_adapter_active, unmerge_adapter,
    LoraAdapter, LoraConfig, LoraModelInfo, MergeReport,
};

use crate::model::Model;
use crate::nn::{EmbeddingWeight, LinearWeight};
use crate::{Error, Result};
use candle_core::Var;
use serde::{de::DeserializeOwned, Serialize};

/// What the adapter-file code needs from a PEFT method.
pub trait PeftMethod: Clone + Serialize + DeserializeOwned {
    /// The `peft_type` PEFT writes in `adapter_config.json` ("LORA").
    const PEFT_TYPE: &'static str;
    /// What [`PeftMethod::attach`] reports.
    type Info;
    /// Check the hyper-parameters; `source` names the file or flags in one-line errors.
    fn validate(&self, source: &str) -> Result<()>;
    /// Wrap every targeted linear of `model` with a fresh adapter called `adapter_name`;
    /// `seed` makes the initial weights (and dropout masks) reproducible.
    fn attach(&self, model: &mut dyn Model, adapter_name: &str, seed: u64) -> Result<Self::Info>;
}

/// Merge adapter `adapter_name`, of whichever method, and detach it (PEFT's
/// `merge_and_unload`); see [`lora::merge_and_unload`] and [`ia3::merge_and_unload`].
pub fn merge_and_unload(model: &mut dyn Model, adapter_name: &str) -> Result<MergeReport> {
    if ia3::is_ia3(model, adapter_name) {
        ia3::merge_and_unload(model, adapter_name)
    } else {
        lora::merge_and_unload(model, adapter_name)
    }
}

/// Names of the adapters attached to the model, in order of first appearance.
pub fn adapter_names(model: &dyn Model) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for lin in model.linears() {
        for (n, _) in lin.adapters() {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

/// A name for a new adapter: non-empty and free of '.' (it is a segment of the tensor keys),
/// and not attached yet. LoRA, IA3 and bottleneck attach check it first.
pub(crate) fn check_new_adapter_name(model: &dyn Model, adapter_name: &str) -> Result<()> {
    if adapter_name.is_empty() || adapter_name.contains('.') {
        return Err(Error::msg(format!(
            "adapter name `{adapter_name}` must be non-empty and contain no '.'"
        )));
    }
    if adapter_names(model).iter().any(|n| n == adapter_name) {
        return Err(Error::msg(format!(
            "an adapter named `{adapter_name}` is already attached; pick another name or remove it first"
        )));
    }
    Ok(())
}

/// The trainable tensors of adapter `adapter_name`, named as in PEFT's state dict minus the
/// `base_model.model.` prefix: `model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn adapter_params(model: &dyn Model, adapter_name: &str) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for lin in model.linears() {
        for (n, a) in lin.adapters() {
            if n == adapter_name {
                for (p, v) in a.trainable_params() {
                    out.push((format!("{}.{p}", lin.name()), v));
                }
            }
        }
    }
    out
}

/// Detach adapter `adapter_name` from every layer; returns how many layers had it.
pub fn remove_adapter(model: &mut dyn Model, adapter_name: &str) -> Result<usize> {
    let mut n = 0;
    for lin in model.linears_mut() {
        n += usize::from(lin.remove_adapter(adapter_name).is_some());
    }
    if n == 0 {
        return Err(no_such_adapter(model, adapter_name));
    }
    Ok(n)
}

/// Turn every adapter of every method on or off at once (PEFT's `disable_adapter()`), e.g. to
/// score the base model with adapters loaded.
pub fn set_adapters_enabled(model: &mut dyn Model, on: bool) {
    for lin in model.linears_mut() {
        lin.set_adapters_enabled(on);
    }
}

/// A mixed batch (PEFT's `adapter_names=`): row i of every following batch runs through the
/// base model and adapter `rows[i]` alone (`None`: the base model), so one batch serves several
/// adapters; `rows = None` returns to the usual behaviour. Every name must be attached. Works
/// for the methods that wrap linear layers (LoRA, IA3, bottleneck adapters, `modules_to_save`
/// copies); the batch must have `rows.len()` rows.
pub fn set_row_adapters(model: &mut dyn Model, rows: Option<&[Option<&str>]>) -> Result<()> {
    let shared: Option<std::sync::Arc<[Option<String>]>> = match rows {
        None => None,
        Some(rows) => {
            let names = adapter_names(model);
            for n in rows.iter().flatten() {
                if !names.iter().any(|a| a == n) {
                    return Err(no_such_adapter(model, n));
                }
            }
            Some(rows.iter().map(|r| r.map(str::to_string)).collect())
        }
    };
    for lin in model.linears_mut() {
        lin.set_row_adapters(shared.clone());
    }
    Ok(())
}

pub(crate) fn no_such_adapter(model: &dyn Model, adapter_name: &str) -> Error {
    let names = adapter_names(model);
    Error::msg(format!(
        "no adapter named `{adapter_name}` is attached (attached: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// Trainable and total parameter counts; `Display` prints PEFT's `print_trainable_parameters`
/// line exactly: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCount {
    pub trainable: usize,
    pub all: usize,
}

impl std::fmt::Display for ParamCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Python's `{:.4f}` and Rust's `{:.4}` both round the exact binary value half-to-even.
        let pct = 100.0 * self.trainable as f64 / self.all as f64;
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

/// Python's `f"{n:,d}"`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Parameters as PEFT counts them (`named_parameters`, a tied LM head counted once, a quantized
/// weight by its logical element count): `trainable` is adapter `adapter_name`'s tensors (its
/// `modules_to_save` copies included) plus any base weight made trainable; `all` is the base
/// plus every attached adapter, copies included, as PEFT counts the wrapper's original and copy.
pub fn param_count(model: &dyn Model, adapter_name: &str) -> ParamCount {
    let mut all = 0usize;
    let mut trainable = 0usize;
    for e in model.embeddings() {
        all += match e.weight() {
            EmbeddingWeight::Frozen(t) => t.elem_count(),
            EmbeddingWeight::Trainable(v) => {
                trainable += v.elem_count();
                v.elem_count()
            }
            EmbeddingWeight::Quantized(q) => q.shape().0 * q.shape().1,
        };
    }
    for lin in model.linears() {
        if !model.tied(lin.name()) {
            let (o, i) = lin.weight().shape();
            all += o * i + lin.bias().map(|b| b.elem_count()).unwrap_or(0);
            if matches!(lin.weight(), LinearWeight::Trainable(_)) {
                trainable += o * i;
            }
            if let Some(b) = lin.bias().filter(|b| b.is_variable()) {
                trainable += b.elem_count();
            }
        }
        for (n, a) in lin.adapters() {
            let k: usize = a
                .trainable_params()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum();
            all += k;
            if n == adapter_name {
                trainable += k;
            }
        }
    }
    for (_, t) in model.other_params() {
        all += t.elem_count();
        if t.is_variable() {
            trainable += t.elem_count();
        }
    }
    ParamCount { trainable, all }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_formats_like_peft() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(134515008), "134,515,008");
        // The whole line is checked against PEFT's own output in tests/peft_lora.rs.
    }
}
