//! What the training loop needs from a fine-tuning method: attach it to a model, list its
//! trainable parameters, save and restore them, and replay its random state on resume.
//! Adding a method (IA3, prompt tuning, full fine-tuning) means a new variant here and a config
//! section; the loop itself does not change.
use super::config::{Method, TrainConfig};
use crate::model::Model;
use crate::peft::bottleneck::BottleneckConfig;
use crate::peft::format::{save_adapter, KEY_PREFIX, WEIGHTS_FILE};
use crate::peft::ia3::Ia3Config;
use crate::peft::lora::{as_lora, attach_lora_with, config_for_model, LoraConfig};
use crate::peft::prompt_learning::{self, PromptEncoder, PromptLearningConfig};
use crate::peft::{adapter_params, ParamCount};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::path::Path;

/// PEFT's name for the adapter of a single-adapter model.
pub const ADAPTER_NAME: &str = "default";

/// The file a soft prompt run's checkpoint holds its whole prompt encoder in (the embedding and
/// the MLP, by PEFT name), beside PEFT's adapter files: the MLP is not in PEFT's file.
pub const PROMPT_ENCODER_CHECKPOINT_FILE: &str = "prompt_encoder.safetensors";

/// The file a full or selective run's checkpoint holds its trained weights in (HF names).
pub const WEIGHTS_CHECKPOINT_FILE: &str = "model.safetensors";

/// The file a PiSSA / OLoRA run's checkpoint holds the initial (A₀, B₀) in, beside the
/// unconverted adapter: the final `adapter/` is converted against them.
pub const LORA_INIT_CHECKPOINT_FILE: &str = "lora_init.safetensors";

/// A method attached to a model.
#[derive(Debug, Clone)]
pub enum Tuner {
    Lora {
        config: Box<LoraConfig>,
        params: ParamCount,
        /// LoRA+'s learning-rate ratio for the B matrices (`[lora] loraplus_lr_ratio`).
        loraplus_lr_ratio: Option<f64>,
    },
    Ia3 {
        config: Box<Ia3Config>,
        params: ParamCount,
    },
    /// Bottleneck adapters (`method = "adapter"`).
    Adapter {
        config: Box<BottleneckConfig>,
        params: ParamCount,
    },
    /// `full` (every weight) or `selective` (whole modules): base weights trained in place.
    Weights {
        method: Method,
        params: ParamCount,
        vars: Vec<(String, Var)>,
    },
    /// `prompt_tuning`, `prefix_tuning`, `p_tuning`: a soft prompt the model reads.
    Prompt {
        config: Box<PromptLearningConfig>,
        encoder: std::sync::Arc<PromptEncoder>,
        params: ParamCount,
    },
}

impl Tuner {
    /// Attach the configured method to `model` with freshly initialised weights (seeded).
    pub fn attach(cfg: &TrainConfig, model: &mut dyn Model, model_name: &str) -> Result<Tuner> {
        Tuner::attach_with(cfg, model, model_name, None, None)
    }

    /// [`Tuner::attach`] with the model's tokenizer (prompt tuning's `TEXT` init needs it) and
    /// the base's unquantized weights (LoftQ on a base quantized at load needs them).
    pub fn attach_with(
        cfg: &TrainConfig,
        model: &mut dyn Model,
        model_name: &str,
        tokenizer: Option<&crate::tokenizer::Tokenizer>,
        originals: Option<crate::peft::lora::OriginalWeights>,
    ) -> Result<Tuner> {
        match cfg.method {
            Method::PromptTuning | Method::PrefixTuning | Method::PTuning => {
                let section = cfg.method.as_str();
                let config = cfg.prompt_config().ok_or_else(|| {
                    Error::msg(format!(
                        "method = \"{section}\" needs a [{section}] section"
                    ))
                })?;
                let a = prompt_learning::attach_prompt(
                    model,
                    &config,
                    tokenizer,
                    cfg.train.seed,
                    &format!("[{section}]"),
                )?;
                Ok(Tuner::Prompt {
                    config: Box::new(a.config),
                    encoder: a.encoder,
                    params: a.params,
                })
            }
            Method::Lora => {
                let defaults = model.default_lora_targets();
                let mut config = cfg.lora.to_peft_for(model_name, &defaults);
                config.task_type = Some(model.task_type().as_peft().to_string());
                // The config saved with the adapter lists the classifier of a SEQ_CLS model
                // in modules_to_save, as PEFT's does.
                let config = config_for_model(model, &config);
                // A PiSSA / OLoRA run saves its adapter converted for the original base:
                // refuse what cannot be converted before training, not at the end.
                if mutates_base(&config) {
                    if let Some(why) = crate::peft::lora::convert::conversion_blocker(&config) {
                        return Err(Error::key("[lora]", "init_lora_weights", why));
                    }
                }
                let info =
                    attach_lora_with(model, &config, ADAPTER_NAME, cfg.train.seed, originals)?;
                Ok(Tuner::Lora {
                    config: Box::new(config),
                    params: info.params,
                    loraplus_lr_ratio: cfg.lora.loraplus_lr_ratio,
                })
            }
            Method::Ia3 => {
                let mut config = cfg.ia3.to_peft(model_name);
                config.task_type = Some(model.task_type().as_peft().to_string());
                // The saved config names the family's targets and the classifier of a SEQ_CLS
                // model, as PEFT's does.
                let config = crate::peft::ia3::config_for_model(model, &config);
                let info =
                    crate::peft::ia3::attach_ia3(model, &config, ADAPTER_NAME, cfg.train.seed)?;
                Ok(Tuner::Ia3 {
                    config: Box::new(config),
                    params: info.params,
                })
            }
            Method::Adapter => {
                let section = cfg.adapter.clone().unwrap_or_default();
                let mut config = section.to_config(model_name);
                config.task_type = Some(model.task_type().as_peft().to_string());
                let config = crate::peft::bottleneck::model::config_for_model(model, &config);
                let info = crate::peft::bottleneck::attach_bottleneck(
                    model,
                    &config,
                    ADAPTER_NAME,
                    cfg.train.seed,
                )?;
                Ok(Tuner::Adapter {
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
                    // (ZeRO-3: another rank's weight may be an empty variable here.)
                    trainable: crate::train::zero3::param_sizes(model, &vars).iter().sum(),
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

    /// ZeRO-3: the trained weights called `name` are now `var` (a placeholder while another
    /// rank holds them, the gathered tensor while the whole model is present), so what the
    /// tuner saves is what the model holds. Only full / selective runs keep such a list.
    pub fn replace_vars<'n>(&mut self, vars: impl IntoIterator<Item = (&'n str, Var)>) {
        if let Tuner::Weights { vars: mine, .. } = self {
            for (name, var) in vars {
                if let Some(slot) = mine.iter_mut().find(|(n, _)| n == name) {
                    slot.1 = var;
                }
            }
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Tuner::Lora { .. } => Method::Lora.as_str(),
            Tuner::Adapter { .. } => Method::Adapter.as_str(),
            Tuner::Ia3 { .. } => Method::Ia3.as_str(),
            Tuner::Weights { method, .. } => method.as_str(),
            Tuner::Prompt { config, .. } => match config.peft_type {
                prompt_learning::PromptMethod::PromptTuning => Method::PromptTuning.as_str(),
                prompt_learning::PromptMethod::PrefixTuning => Method::PrefixTuning.as_str(),
                prompt_learning::PromptMethod::PTuning => Method::PTuning.as_str(),
            },
        }
    }

    /// The factor on the learning rate of parameter `param_name` (a name from
    /// [`Self::trainable`]): LoRA+ gives the B matrices, and the 1-D parameters (DoRA
    /// magnitudes, biases), `loraplus_lr_ratio` times the rate, as PEFT's
    /// `create_loraplus_optimizer` groups them; 1.0 everywhere else.
    pub fn lr_scale(&self, param_name: &str) -> f64 {
        match self {
            Tuner::Lora {
                loraplus_lr_ratio: Some(k),
                ..
            } if param_name.contains(".lora_B.")
                || param_name.ends_with(".lora_magnitude_vector")
                || param_name.ends_with(".bias") =>
            {
                *k
            }
            _ => 1.0,
        }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn params_report(&self) -> String {
        self.param_count().to_string()
    }

    pub fn param_count(&self) -> ParamCount {
        match self {
            Tuner::Lora { params, .. }
            | Tuner::Adapter { params, .. }
            | Tuner::Ia3 { params, .. }
            | Tuner::Weights { params, .. }
            | Tuner::Prompt { params, .. } => *params,
        }
    }

    /// The parameters the optimizer updates, with stable names: the LoRA tensors and the
    /// `modules_to_save` copies (`classifier.weight`, ...).
    pub fn trainable(&self, model: &dyn Model) -> Vec<(String, Var)> {
        match self {
            Tuner::Lora { .. } | Tuner::Ia3 { .. } | Tuner::Adapter { .. } => {
                adapter_params(model, ADAPTER_NAME)
            }
            Tuner::Weights { vars, .. } => vars.clone(),
            Tuner::Prompt { encoder, .. } => encoder
                .trainable_params()
                .into_iter()
                .map(|(n, v)| (format!("prompt_encoder.{ADAPTER_NAME}.{n}"), v))
                .collect(),
        }
    }

    /// Write the run's final adapter folder (PEFT's files only); LoRA: [`Tuner::save`], except
    /// that a PiSSA / OLoRA adapter is converted for the original base (rank 2r, as PEFT's
    /// `save_pretrained(path_initial_model_for_weight_conversion=...)` writes it).
    pub fn save_adapter(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Prompt {
                config, encoder, ..
            } => prompt_learning::save_prompt_adapter(config, encoder, dir),
            Tuner::Lora { config, .. } if mutates_base(config) => {
                crate::peft::lora::convert::save_converted(model, ADAPTER_NAME, config, dir)
            }
            _ => self.save(model, dir),
        }
    }

    /// Write the trained weights in the method's checkpoint format: a PEFT adapter folder;
    /// for `full` / `selective` the trained tensors by HF name ([`WEIGHTS_CHECKPOINT_FILE`]).
    pub fn save(&self, model: &dyn Model, dir: &Path) -> Result<()> {
        match self {
            Tuner::Lora { config, .. } => {
                save_adapter(model, ADAPTER_NAME, &**config, dir)?;
                if mutates_base(config) {
                    let init = crate::peft::lora::convert::init_tensors(model, ADAPTER_NAME);
                    crate::fsutil::write_safetensors(&dir.join(LORA_INIT_CHECKPOINT_FILE), &init)?;
                }
                Ok(())
            }
            Tuner::Adapter { config, .. } => save_adapter(model, ADAPTER_NAME, &**config, dir),
            Tuner::Ia3 { config, .. } => save_adapter(model, ADAPTER_NAME, &**config, dir),
            Tuner::Prompt {
                config, encoder, ..
            } => {
                prompt_learning::save_prompt_adapter(config, encoder, dir)?;
                let tensors = prompt_learning::model::encoder_tensors(encoder, ADAPTER_NAME);
                crate::fsutil::write_safetensors(
                    &dir.join(PROMPT_ENCODER_CHECKPOINT_FILE),
                    &tensors,
                )
            }
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
            Tuner::Prompt { .. } => {
                let path = dir.join(PROMPT_ENCODER_CHECKPOINT_FILE);
                let mut tensors = candle_core::safetensors::load(&path, model.device())
                    .map_err(|e| Error::file(&path, crate::error::first_line(&e.to_string())))?;
                for (name, var) in self.trainable(model) {
                    let t: Tensor = tensors
                        .remove(&name)
                        .ok_or_else(|| Error::file(&path, format!("tensor `{name}` is missing")))?;
                    if t.dims() != var.dims() {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor `{name}` has shape {:?}, the prompt encoder {:?} (the [{}] settings changed?)",
                                t.dims(),
                                var.dims(),
                                self.method()
                            ),
                        ));
                    }
                    var.set(&t.to_dtype(DType::F32)?)?;
                }
                Ok(())
            }
            Tuner::Weights { vars, .. } => {
                let path = dir.join(WEIGHTS_CHECKPOINT_FILE);
                let fe = |e: candle_core::Error| {
                    Error::file(&path, crate::error::first_line(&e.to_string()))
                };
                crate::fsutil::check_regular(&path)?;
                // SAFETY: the checkpoint is ours and not written while it is read. Mapped, not
                // read whole: under ZeRO-3 a rank reads only the weights it owns.
                let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }
                    .map_err(fe)?;
                let llama = model.as_any().downcast_ref::<crate::model::Llama>();
                for (name, var) in vars {
                    let view = file
                        .get(name)
                        .map_err(|_| Error::file(&path, format!("tensor `{name}` is missing")))?;
                    let dims = match llama {
                        Some(l) => crate::train::zero3::param_shape(l, name, var)
                            .dims()
                            .to_vec(),
                        None => var.dims().to_vec(),
                    };
                    if view.shape() != dims {
                        return Err(Error::file(
                            &path,
                            format!(
                                "tensor `{name}` has shape {:?}, the model {dims:?}",
                                view.shape(),
                            ),
                        ));
                    }
                    if var.elem_count() == 0 && dims.iter().product::<usize>() > 0 {
                        // ZeRO-3: another rank owns this weight and restores it.
                        continue;
                    }
                    let t = file.load(name, model.device()).map_err(fe)?;
                    var.set(&t.to_dtype(var.dtype())?)?;
                }
                Ok(())
            }
            Tuner::Lora { .. } | Tuner::Ia3 { .. } | Tuner::Adapter { .. } => {
                let section = self.method();
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
                                "tensor `{key}` has shape {:?}, the adapter {:?} (the [{section}] settings changed?)",
                                t.dims(),
                                var.dims(),
                            ),
                        ));
                    }
                    var.set(&t.to_dtype(DType::F32)?)?;
                }
                if let Some(k) = tensors.keys().min() {
                    return Err(Error::file(
                        &path,
                        format!("tensor `{k}` belongs to no adapted module (the [{section}] settings changed?)"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// [`Tuner::restore`], and for a PiSSA / OLoRA run the checkpoint's initial (A₀, B₀),
    /// which the residual base and the final conversion then follow exactly.
    pub fn restore_mut(&self, model: &mut dyn Model, dir: &Path) -> Result<()> {
        self.restore(model, dir)?;
        match self {
            Tuner::Lora { config, .. } if mutates_base(config) => {
                let path = dir.join(LORA_INIT_CHECKPOINT_FILE);
                let tensors = candle_core::safetensors::load(&path, model.device())
                    .map_err(|e| Error::file(&path, crate::error::first_line(&e.to_string())))?;
                crate::peft::lora::convert::restore_init(model, ADAPTER_NAME, tensors, &path)
            }
            _ => Ok(()),
        }
    }

    /// Bring the dropout masks to where they were after `calls` training forward passes. Each
    /// LoRA layer draws its k-th mask from its own seed and k alone (a counter-based stream, see
    /// `peft::lora::layer`), so this sets the counters: no mask is drawn, whatever `calls` is.
    pub fn replay_rng(&self, model: &dyn Model, calls: u64) -> Result<()> {
        match self {
            // IA3, bottleneck adapters and soft prompts draw no random numbers while training.
            Tuner::Weights { .. }
            | Tuner::Ia3 { .. }
            | Tuner::Adapter { .. }
            | Tuner::Prompt { .. } => Ok(()),
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

/// Whether the LoRA config's init changes the base weights (PiSSA, OLoRA).
fn mutates_base(config: &LoraConfig) -> bool {
    config
        .init_lora_weights
        .kind()
        .is_ok_and(|k| k.mutates_base())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loraplus_scales_b_and_one_dimensional_parameters_only() {
        let params = ParamCount {
            trainable: 0,
            all: 1,
        };
        let t = Tuner::Lora {
            config: Box::default(),
            params,
            loraplus_lr_ratio: Some(16.0),
        };
        let q = "model.layers.0.self_attn.q_proj";
        assert_eq!(t.lr_scale(&format!("{q}.lora_A.weight")), 1.0);
        assert_eq!(t.lr_scale(&format!("{q}.lora_B.weight")), 16.0);
        assert_eq!(t.lr_scale(&format!("{q}.lora_magnitude_vector")), 16.0);
        assert_eq!(t.lr_scale("classifier.bias"), 16.0);
        assert_eq!(t.lr_scale("classifier.weight"), 1.0);
        let plain = Tuner::Lora {
            config: Box::default(),
            params,
            loraplus_lr_ratio: None,
        };
        assert_eq!(plain.lr_scale(&format!("{q}.lora_B.weight")), 1.0);
        let ia3 = Tuner::Ia3 {
            config: Box::default(),
            params,
        };
        assert_eq!(ia3.lr_scale("model.layers.0.mlp.down_proj.ia3_l"), 1.0);
    }
}
