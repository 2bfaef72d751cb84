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

/// The file a full or selective run's checkpoint holds its trained weights in (HF names).
pub const WEIGHTS_CHECKPOINT_FILE: &str = "model.safetensors";

/// A method attached to a model.
#[derive(Debug, Clone)]
pub enum Tuner {
    Lora {
        config: Box<LoraConfig>,
        params: ParamCount,
    },
    /// `full` (every weight) or `selective` (whole modules): base weights trained in place.
    Weights {
        method: Method,
        params: ParamCount,
        vars: Vec<(String, Var)>,
    },
}

impl Tuner {
    /// Attach the configured method to `model` with freshly initialised weights (seeded).
    pub fn attach(cfg: &TrainConfig, model: &mut dyn Model, model_name: &str) -> Result<Tuner> {
        match cfg.method {
            Method::Lora => {
                let defaults = model.default_lora_targets();
                let mut config = cfg.lora.to_peft_for(model_name, &defaults);
                config.task_type = Some(model.task_type().as_peft().to_string());
                // The config saved with the adapter lists the classifier of a SEQ_CLS model
                // in modules_to_save, as PEFT's does.
                let config = config_for_model(model, &config);
                let info = attach_lora(model, &config, ADAPTER_NAME, cfg.train.seed)?;
                Ok(Tuner::Lora {
                    config: Box::new(config),
                    params: info.params,
                })
            }
            Method::Full | Method::Selective => {
                let vars = match (&cfg.method, &cfg.selective) {
                    (Method::Selective, Some(s)) => crate::peft::selective::select(model, s)?,
                    _ => model.make_trainable(None)?,
                };
                if vars.is_empty() {
                    return Err(Error::msg(format!(
                        "method = \"{}\": no parameter of {} is trainable (the [selective] rules select none)",
                        cfg.method.as_str(),
                        model.describe()
                    )));
                }
                let params = ParamCount {
                    trainable: vars.iter().map(|(_, v)| v.elem_count()).sum(),
                    all: crate::peft::param_count(model, ADAPTER_NAME).all,
                };
                Ok(Tuner::Weights {
                    method: cfg.method,
                    params,
                    vars,
                })
            }
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Tuner::Lora { .. } => Method::Lora.as_str(),
            Tuner::Weights { method, .. } => method.as_str(),
        }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn params_report(&self) -> String {
        self.param_count().to_string()
    }

    pub fn param_count(&self) -> ParamCount {
        match self {
            Tuner::Lora { params, .. } | Tuner::Weights { params, .. } => *params,
        }
    }

    /// The parameters the optimizer updates, with stable names: the LoRA tensors and the
    /// `modules_to_save` copies (`classifier.weight`, ...).
    pub fn trainable(&self, model: &dyn Model) -> Vec<(String, Var)> {
        match self {
            Tuner::Lora { .. } => adapter_params(model, ADAPTER_NAME),
            Tuner::Weights { vars, .. } => vars.clone(),
        }
    }

    /// Write the trained weights in the method's checkpoint format: a PEFT adapter folder;
    /// for `full` / `selective` the trained tensors by HF name ([`WEIGHTS_CHECKPOINT_FILE`]).
    pub fn save(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Lora { config, .. } => save_adapter(model, ADAPTER_NAME, &**config, dir),
            Tuner::Weights { vars, .. } => {
                std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
                let tensors = vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                    .collect();
                crate::fsutil::write_safetensors(&dir.join(WEIGHTS_CHECKPOINT_FILE), &tensors)
            }
        }
    }

    /// Set the trained weights from a folder written by [`Tuner::save`]. The adapter stays the
    /// one attached (same dropout seeds); only the tensor values change.
    pub fn restore(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Weights { vars, .. } => {
                let path = dir.join(WEIGHTS_CHECKPOINT_FILE);
                let mut tensors = candle_core::safetensors::load(&path, model.device())
                    .map_err(|e| Error::file(&path, crate::error::first_line(&e.to_string())))?;
                for (name, var) in vars {
                    let t: Tensor = tensors
                        .remove(name)
                        .ok_or_else(|| Error::file(&path, format!("tensor `{name}` is missing")))?;
                    if t.dims() != var.dims() {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor `{name}` has shape {:?}, the model {:?}",
                                t.dims(),
                                var.dims()
                            ),
                        ));
                    }
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
                Ok(())
            }
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

    /// The factor on the learning rate of the trainable parameter `param_name` (a name of
    /// [`Tuner::trainable`]): 1 for every method today (LoRA+ will scale `lora_B`).
    pub fn lr_scale(&self, _param_name: &str) -> f64 {
        1.0
    }

    /// Bring the dropout masks to where they were after `calls` training forward passes. Each
    /// LoRA layer draws its k-th mask from its own seed and k alone (a counter-based stream, see
    /// `peft::lora::layer`), so this sets the counters: no mask is drawn, whatever `calls` is.
    pub fn replay_rng(&self, model: &dyn Model, calls: u64) -> Result<()> {
        match self {
            Tuner::Weights { .. } => Ok(()),
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
