//! PEFT's `modules_to_save`: modules trained in full next to an adapter (a classification head),
//! as PEFT 0.21's `ModulesToSaveWrapper` does it. Attaching the adapter gives each such module a
//! trainable copy of its weights under the adapter's name; while the adapter is enabled and
//! active the copy runs instead of the original, which stays untouched, so disabling or removing
//! the adapter gives the base model back, and each adapter has its own copy.
//!
//! Here a saved module is a [`SavedModule`] adapter on each linear layer under the named module
//! (RoBERTa's `classifier` head is two linears: `classifier.dense`, `classifier.out_proj`). Its
//! parameters are named `weight` / `bias`, so they are saved under PEFT's keys:
//! `base_model.model.classifier.weight`, `base_model.model.classifier.bias` (no
//! `modules_to_save.default` infix: PEFT's `ModulesToSaveWrapper.adapter_state_dict` strips it).
//!
//! Matching follows PEFT's `_set_trainable`: a name selects every module whose full name ends
//! with it (a plain string suffix). For `SEQ_CLS` and `TOKEN_CLS` models PEFT appends
//! `["classifier", "score"]` to the config's list ([`add_task_defaults`]); those two may match
//! nothing (BERT has no `score`), a name the user gave must match something.
use crate::model::{Model, TaskType};
use crate::nn::{Linear, LinearAdapter, LinearWeight};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::sync::atomic::{AtomicBool, Ordering};

/// The names PEFT's `PeftModelForSequenceClassification` / `...ForTokenClassification` add to
/// `modules_to_save`.
pub const PEFT_CLASSIFIER_NAMES: [&str; 2] = ["classifier", "score"];

/// What PEFT does to a config's `modules_to_save` for `model`: for `SEQ_CLS` and `TOKEN_CLS`
/// models, append [`PEFT_CLASSIFIER_NAMES`] (PEFT appends them even when present; names already
/// in the list are not repeated here, which selects the same modules), then the model's own
/// head names ([`Model::modules_to_save`]) where a family names its head otherwise.
pub fn add_task_defaults(list: &mut Option<Vec<String>>, model: &dyn Model) {
    if !matches!(model.task_type(), TaskType::SeqCls | TaskType::TokenCls) {
        return;
    }
    let l = list.get_or_insert_with(Vec::new);
    let own = model.modules_to_save();
    for n in PEFT_CLASSIFIER_NAMES
        .iter()
        .map(|s| s.to_string())
        .chain(own)
    {
        if !l.contains(&n) {
            l.push(n);
        }
    }
}

/// Every module name of the model: the linears, embeddings and other parameters' modules and
/// all their parents (`bert.pooler.dense` gives `bert`, `bert.pooler`, `bert.pooler.dense`).
fn module_names(model: &dyn Model) -> Vec<String> {
    let mut leaves: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    leaves.extend(model.embeddings().iter().map(|e| e.name().to_string()));
    for (p, _) in model.other_params() {
        leaves.push(p.rsplit_once('.').map_or(p.clone(), |(m, _)| m.to_string()));
    }
    let mut out: Vec<String> = Vec::new();
    for leaf in leaves {
        let mut end = 0;
        for (i, part) in leaf.split('.').enumerate() {
            end += part.len() + usize::from(i > 0);
            let m = &leaf[..end];
            if !out.iter().any(|o| o == m) {
                out.push(m.to_string());
            }
        }
    }
    out
}

fn under(name: &str, module: &str) -> bool {
    name == module
        || (name.len() > module.len()
            && name.starts_with(module)
            && name.as_bytes()[module.len()] == b'.')
}

/// The linear layers `list` selects (PEFT's suffix match), in model order. `source` names the
/// config in errors. A name outside [`PEFT_CLASSIFIER_NAMES`] that matches no module, a module
/// that holds other parameters than linears (a LayerNorm, an embedding) and a linear tied to
/// the embeddings are one-line errors.
pub fn resolve(model: &dyn Model, list: &[String], source: &str) -> Result<Vec<String>> {
    let modules = module_names(model);
    let mut selected: Vec<String> = Vec::new();
    for wanted in list {
        if wanted.is_empty() {
            return Err(Error::key(source, "modules_to_save", "holds an empty name"));
        }
        let matched: Vec<&String> = modules
            .iter()
            .filter(|m| m.ends_with(wanted.as_str()))
            .collect();
        if matched.is_empty() {
            if PEFT_CLASSIFIER_NAMES.contains(&wanted.as_str()) {
                continue;
            }
            let heads = model.modules_to_save();
            return Err(Error::key(
                source,
                "modules_to_save",
                format!(
                    "`{wanted}` matches no module of the model ({}; full names look like {})",
                    if heads.is_empty() {
                        "it has no classification head".to_string()
                    } else {
                        format!("its head is {}", heads.join(", "))
                    },
                    model.linears().first().map_or("-", |l| l.name())
                ),
            ));
        }
        for m in matched {
            let other = model
                .embeddings()
                .iter()
                .map(|e| e.name().to_string())
                .chain(model.other_params().into_iter().map(|(p, _)| p))
                .find(|p| under(p, m));
            if let Some(p) = other {
                return Err(Error::key(
                    source,
                    "modules_to_save",
                    format!(
                        "`{wanted}` selects module `{m}`, which holds `{p}`: only modules made of linear layers can be saved in full"
                    ),
                ));
            }
            for lin in model.linears() {
                if !under(lin.name(), m) {
                    continue;
                }
                if model.tied(lin.name()) {
                    return Err(Error::key(
                        source,
                        "modules_to_save",
                        format!(
                            "`{wanted}` selects `{}`, which is tied to the embeddings; saving it in full is not supported",
                            lin.name()
                        ),
                    ));
                }
                if !selected.iter().any(|s| s == lin.name()) {
                    selected.push(lin.name().to_string());
                }
            }
        }
    }
    // Model order, as the adapter is attached and listed.
    Ok(model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .filter(|n| selected.contains(n))
        .collect())
}

/// A trainable copy of a linear layer's weight and bias that runs in place of the layer while
/// active (PEFT's `ModulesToSaveWrapper.modules_to_save[adapter_name]`).
pub struct SavedModule {
    weight: Var,
    bias: Option<Var>,
    active: AtomicBool,
}

impl SavedModule {
    /// A copy of `lin`'s base weight and bias in f32 (a quantized weight is dequantized).
    pub fn copy_of(lin: &Linear) -> Result<Self> {
        let w = lin.weight().to_dense_f32()?.contiguous()?;
        let bias = match lin.bias() {
            Some(b) => Some(Var::from_tensor(
                &b.detach().to_dtype(DType::F32)?.contiguous()?,
            )?),
            None => None,
        };
        Ok(Self {
            weight: Var::from_tensor(&w)?,
            bias,
            active: AtomicBool::new(true),
        })
    }
    pub fn weight(&self) -> &Var {
        &self.weight
    }
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
    pub fn set_active(&self, on: bool) {
        self.active.store(on, Ordering::Relaxed)
    }

    /// `x Wᵀ + b` in f32, cast to `dtype`.
    fn run(&self, x: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let y = x
            .to_dtype(DType::F32)?
            .broadcast_matmul(&self.weight.as_tensor().t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor())?,
            None => y,
        };
        y.to_dtype(dtype)
    }

    /// Write the copy into `lin` as its (frozen) base weight and bias: what PEFT's
    /// `merge_and_unload` leaves in place of the wrapper.
    pub fn write_into(&self, lin: &mut Linear) -> Result<()> {
        let dt = match lin.weight() {
            LinearWeight::Frozen(w) => w.dtype(),
            _ => DType::F32,
        };
        lin.set_weight(LinearWeight::Frozen(
            self.weight.as_tensor().detach().to_dtype(dt)?,
        ));
        let bias = match (&self.bias, lin.bias()) {
            (Some(b), old) => {
                let bd = old.map_or(dt, |o| o.dtype());
                Some(b.as_tensor().detach().to_dtype(bd)?)
            }
            (None, _) => None,
        };
        lin.set_bias(bias);
        Ok(())
    }
}

impl LinearAdapter for SavedModule {
    fn method(&self) -> &'static str {
        "modules_to_save"
    }
    fn forward(&self, x: &Tensor, base_out: Tensor, _train: bool) -> candle_core::Result<Tensor> {
        if !self.is_active() {
            return Ok(base_out);
        }
        self.run(x, base_out.dtype())
    }
    fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![("weight".to_string(), self.weight.clone())];
        if let Some(b) = &self.bias {
            out.push(("bias".to_string(), b.clone()));
        }
        out
    }
    /// The copy alone when it is the layer's only adapter: the original is not computed.
    fn forward_fused(
        &self,
        x: &Tensor,
        _weight: &LinearWeight,
        _bias: Option<&Tensor>,
        _train: bool,
    ) -> Option<candle_core::Result<Tensor>> {
        self.is_active().then(|| self.run(x, x.dtype()))
    }
}

/// The saved-module copy behind a `dyn LinearAdapter`, if it is one.
pub fn as_saved_module(a: &dyn LinearAdapter) -> Option<&SavedModule> {
    let any: &dyn std::any::Any = a;
    any.downcast_ref::<SavedModule>()
}

/// A layer can run one saved copy at a time (PEFT: "Only one adapter can be set at a time" for
/// a `ModulesToSaveWrapper`): an error when a linear in `names` already has an active copy of
/// another adapter.
pub fn check_free(model: &dyn Model, names: &[String]) -> Result<()> {
    for lin in model.linears() {
        if !names.iter().any(|n| n == lin.name()) {
            continue;
        }
        if let Some((other, _)) = lin
            .adapters()
            .find(|(_, a)| as_saved_module(*a).is_some_and(|s| s.is_active()))
        {
            return Err(Error::msg(format!(
                "module `{}` is already trained in full by adapter `{other}` (modules_to_save); one adapter's copy can be active at a time: remove or deactivate `{other}` first",
                lin.name()
            )));
        }
    }
    Ok(())
}

/// Attach a [`SavedModule`] copy named `adapter_name` to each linear in `names`.
pub fn attach(model: &mut dyn Model, names: &[String], adapter_name: &str) -> Result<()> {
    for lin in model.linears_mut() {
        if names.iter().any(|n| n == lin.name()) {
            let copy = SavedModule::copy_of(lin)?;
            lin.add_adapter(adapter_name, Box::new(copy));
        }
    }
    Ok(())
}

/// The linears that carry a saved-module copy of adapter `adapter_name`.
pub fn saved_modules(model: &dyn Model, adapter_name: &str) -> Vec<String> {
    model
        .linears()
        .iter()
        .filter(|l| {
            l.adapters()
                .any(|(n, a)| n == adapter_name && as_saved_module(a).is_some())
        })
        .map(|l| l.name().to_string())
        .collect()
}
