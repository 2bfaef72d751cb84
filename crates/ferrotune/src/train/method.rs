//! What the training loop needs from a fine-tuning method: attach it to a model, list its
//! trainable parameters, save and restore them, and replay its random state on resume.
//! Adding a method (IA3, prompt tuning, full fine-tuning) means a new variant here and a config
//! section; the loop itself does not change.
use super::config::{Method, TrainConfig};
use crate::model::Model;
use crate::peft::format::{save_adapter, KEY_PREFIX, WEIGHTS_FILE};
use crate::peft::lora::{as_lora, attach_lora, config_for_model, LoraConfig};
use crate::peft::{adapter_params, ParamCount};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::path::Path;

/// PEFT's name for the adapter of a single-adapter model.
pub const ADAPTER_NAME: &str = "default";

/// A method attached to a model.
#[derive(Debug, Clone)]
pub enum Tuner {
    Lora {
        config: LoraConfig,
        params: ParamCount,
    },
}

impl Tuner {
    /// Attach the configured method to `model` with freshly initialised weights (seeded).
    pub fn attach(cfg: &TrainConfig, model: &mut dyn Model, model_name: &str) -> Result<Tuner> {
        match cfg.method {
            Method::Lora => {
                let mut config = cfg.lora.to_peft(model_name);
                config.task_type = Some(model.task_type().as_peft().to_string());
                // The config saved with the adapter lists the classifier of a SEQ_CLS model
                // in modules_to_save, as PEFT's does.
                let config = config_for_model(model, &config);
                let info = attach_lora(model, &config, ADAPTER_NAME, cfg.train.seed)?;
                Ok(Tuner::Lora {
                    config,
                    params: info.params,
                })
            }
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Tuner::Lora { .. } => Method::Lora.as_str(),
        }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn params_report(&self) -> String {
        match self {
            Tuner::Lora { params, .. } => params.to_string(),
        }
    }

    pub fn param_count(&self) -> ParamCount {
        match self {
            Tuner::Lora { params, .. } => *params,
        }
    }

    /// The parameters the optimizer updates, with stable names: the LoRA tensors and the
    /// `modules_to_save` copies (`classifier.weight`, ...).
    pub fn trainable(&self, model: &dyn Model) -> Vec<(String, Var)> {
        match self {
            Tuner::Lora { .. } => adapter_params(model, ADAPTER_NAME),
        }
    }

    /// Write the trained weights in the method's usual format (a PEFT adapter folder).
    pub fn save(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Lora { config, .. } => save_adapter(model, ADAPTER_NAME, config, dir),
        }
    }

    /// Set the trained weights from a folder written by [`Tuner::save`]. The adapter stays the
    /// one attached (same dropout seeds); only the tensor values change.
    pub fn restore(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Lora { .. } => {
                let path = dir.join(WEIGHTS_FILE);
                let mut tensors = candle_core::safetensors::load(&path, model.device())
                    .map_err(|e| Error::file(&path, crate::error::first_line(&e.to_string())))?;
                for (name, var) in adapter_params(model, ADAPTER_NAME) {
                    let key = format!("{KEY_PREFIX}{name}");
                    let t: Tensor = tensors
                        .remove(&key)
                        .ok_or_else(|| Error::file(&path, format!("tensor `{key}` is missing")))?;
                    if t.dims() != var.dims() {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor `{key}` has shape {:?}, the adapter {:?} (the [lora] settings changed?)",
                                t.dims(),
                                var.dims()
                            ),
                        ));
                    }
                    var.set(&t.to_dtype(DType::F32)?)?;
                }
                if let Some(k) = tensors.keys().min() {
                    return Err(Error::file(
                        &path,
                        format!("tensor `{k}` belongs to no adapted module (the [lora] settings changed?)"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// Bring the dropout masks to where they were after `calls` training forward passes. Each
    /// LoRA layer draws its k-th mask from its own seed and k alone (a counter-based stream, see
    /// `peft::lora::layer`), so this sets the counters: no mask is drawn, whatever `calls` is.
    pub fn replay_rng(&self, model: &dyn Model, calls: u64) -> Result<()> {
        match self {
            Tuner::Lora { .. } => {
                for lin in model.linears() {
                    for (name, a) in lin.adapters() {
                        if name == ADAPTER_NAME && as_lora(a).is_some() {
                            a.set_rng_state(calls);
                        }
                    }
                }
                Ok(())
            }
        }
    }
}
