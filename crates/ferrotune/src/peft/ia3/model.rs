//! Model-level IA3: attach vectors to the targeted linears, merge them into the base weights
//! and back (PEFT's `IA3Model`). Merging is multiplicative: an output vector scales the rows
//! of W (and the bias), a feed-forward vector the columns of W (not the bias, which is added
//! after the input scaling).
use super::config::Ia3Config;
use super::layer::Ia3Adapter;
use crate::model::Model;
use crate::nn::{Linear, LinearAdapter, LinearWeight};
use crate::peft::lora::MergeReport;
use crate::peft::modules_to_save::{self, as_saved_module};
use crate::peft::{no_such_adapter, param_count, ParamCount, PeftMethod};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::any::Any;

/// What [`attach_ia3`] did.
#[derive(Debug, Clone)]
pub struct Ia3ModelInfo {
    pub adapter_name: String,
    /// (module name, feed-forward?) for every wrapped linear, in model order.
    pub modules: Vec<(String, bool)>,
    pub modules_to_save: Vec<String>,
    pub params: ParamCount,
}

impl PeftMethod for Ia3Config {
    const PEFT_TYPE: &'static str = "IA3";
    type Info = Ia3ModelInfo;
    fn validate(&self, source: &str) -> Result<()> {
        Ia3Config::validate(self, source)
    }
    fn attach(&self, model: &mut dyn Model, adapter_name: &str, seed: u64) -> Result<Ia3ModelInfo> {
        attach_ia3(model, self, adapter_name, seed)
    }
}

/// The IA3 adapter behind a `dyn LinearAdapter`, if it is one.
pub fn as_ia3(a: &dyn LinearAdapter) -> Option<&Ia3Adapter> {
    let any: &dyn Any = a;
    any.downcast_ref::<Ia3Adapter>()
}

/// `cfg` as PEFT uses it on `model`: the family's default targets where it names none, and a
/// SEQ_CLS / TOKEN_CLS model's classifier in `modules_to_save`.
pub fn config_for_model(model: &dyn Model, cfg: &Ia3Config) -> Ia3Config {
    let mut cfg = cfg.with_defaults(model.family(), &model.architecture());
    modules_to_save::add_task_defaults(&mut cfg.modules_to_save, model);
    cfg
}

/// The linears `cfg` wraps on `model`, in model order, each with whether it is feed-forward.
/// A list entry that matches no linear is an error naming it.
pub fn resolve_targets(model: &dyn Model, cfg: &Ia3Config) -> Result<Vec<(String, bool)>> {
    let cfg = config_for_model(model, cfg);
    let output = model.output_layer().map(str::to_string);
    let names: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    if let Some(crate::peft::lora::ModuleSpec::List(list)) = &cfg.target_modules {
        if list.is_empty() {
            return Err(Error::key(
                "IA3 config",
                "target_modules",
                "is empty (name at least one module, e.g. k_proj)",
            ));
        }
        if let Some(t) = list.iter().find(|t| {
            !names
                .iter()
                .any(|n| crate::peft::lora::config::name_matches_entry(n, t))
        }) {
            return Err(Error::msg(format!(
                "IA3 target module `{t}` matches no linear layer of the model (full names look like {})",
                names.first().map(String::as_str).unwrap_or("-")
            )));
        }
    }
    let mut out = Vec::new();
    for n in &names {
        if cfg.matches(n, output.as_deref())? {
            out.push((n.clone(), cfg.is_feedforward(n)?));
        }
    }
    if out.is_empty() {
        return Err(Error::msg(
            "the IA3 config selects no linear layer of the model",
        ));
    }
    Ok(out)
}

/// Wrap every linear `cfg` targets with an IA3 vector named `adapter_name` (ones, or N(0, 1)
/// from `seed` with `init_ia3_weights = false`). The base weights stay frozen as loaded.
pub fn attach_ia3(
    model: &mut dyn Model,
    cfg: &Ia3Config,
    adapter_name: &str,
    seed: u64,
) -> Result<Ia3ModelInfo> {
    cfg.validate("IA3 config")?;
    crate::peft::check_new_adapter_name(model, adapter_name)?;
    let targets = resolve_targets(model, cfg)?;
    let full = config_for_model(model, cfg);
    let saved = modules_to_save::resolve(
        model,
        full.modules_to_save.as_deref().unwrap_or(&[]),
        "IA3 config",
    )?;
    modules_to_save::check_free(model, &saved)?;
    let dev = model.device().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    for lin in model.linears_mut() {
        let Some((_, ff)) = targets.iter().find(|(n, _)| n == lin.name()) else {
            continue;
        };
        let rng = (!cfg.init_ia3_weights).then_some(&mut rng);
        let a = Ia3Adapter::new(lin.in_features(), lin.out_features(), *ff, rng, &dev)?;
        lin.add_adapter(adapter_name, Box::new(a));
    }
    modules_to_save::attach(model, &saved, adapter_name)?;
    Ok(Ia3ModelInfo {
        adapter_name: adapter_name.to_string(),
        modules: targets,
        modules_to_save: saved,
        params: param_count(model, adapter_name),
    })
}

fn ia3_on<'a>(lin: &'a Linear, adapter_name: &str) -> Option<&'a Ia3Adapter> {
    lin.adapters()
        .find(|(n, a)| *n == adapter_name && as_saved_module(*a).is_none())
        .and_then(|(_, a)| as_ia3(a))
}

/// Whether adapter `adapter_name` of `model` is an IA3 adapter.
pub fn is_ia3(model: &dyn Model, adapter_name: &str) -> bool {
    model
        .linears()
        .iter()
        .any(|l| ia3_on(l, adapter_name).is_some())
}

/// Multiply (or, for unmerge, divide by `l + 1e-8` as PEFT does) the base weight's rows or
/// columns by the vector, and an output vector also the bias. A quantized weight becomes dense
/// f32 (its type is returned).
fn rescale(
    lin: &mut Linear,
    l: &Tensor,
    feedforward: bool,
    divide: bool,
) -> Result<Option<String>> {
    let l = l.detach().to_dtype(DType::F32)?;
    let l = if divide { (l + 1e-8)?.recip()? } else { l };
    let (w, dt, deq) = match lin.weight() {
        LinearWeight::Frozen(w) => (w.to_dtype(DType::F32)?, w.dtype(), None),
        LinearWeight::Trainable(v) => (
            v.as_tensor().detach().to_dtype(DType::F32)?,
            v.dtype(),
            None,
        ),
        LinearWeight::Quantized(q) => (
            q.dequantize()?,
            DType::F32,
            Some(lin.weight().stored_type().to_uppercase()),
        ),
    };
    // (out, 1) scales rows, (1, in) columns: the same broadcast for both.
    let new = w.broadcast_mul(&l.to_device(w.device())?)?.to_dtype(dt)?;
    match lin.weight() {
        LinearWeight::Trainable(v) => v.set(&new)?,
        _ => lin.set_weight(LinearWeight::Frozen(new)),
    }
    if !feedforward {
        if let Some(b) = lin.bias() {
            let nb = b
                .to_dtype(DType::F32)?
                .broadcast_mul(&l.flatten_all()?)?
                .to_dtype(b.dtype())?;
            lin.set_bias(Some(nb));
        }
    }
    Ok(deq)
}

fn merge_impl(model: &mut dyn Model, adapter_name: &str, merge: bool) -> Result<MergeReport> {
    let mut jobs = Vec::new();
    for lin in model.linears() {
        if let Some(a) = ia3_on(lin, adapter_name) {
            if a.is_merged() == merge {
                return Err(Error::msg(format!(
                    "adapter `{adapter_name}` is {} merged into {}",
                    if merge { "already" } else { "not" },
                    lin.name()
                )));
            }
            if model.tied(lin.name()) {
                return Err(Error::msg(format!(
                    "adapter `{adapter_name}` adapts `{}`, which is tied to the embeddings: merging would change the input embeddings too",
                    lin.name()
                )));
            }
            jobs.push((
                lin.name().to_string(),
                a.vector().as_tensor().clone(),
                a.is_feedforward(),
            ));
        }
    }
    if jobs.is_empty() {
        return Err(no_such_adapter(model, adapter_name));
    }
    let mut report = MergeReport::default();
    for lin in model.linears_mut() {
        if let Some((_, l, ff)) = jobs.iter().find(|(n, _, _)| n == lin.name()) {
            if let Some(ty) = rescale(lin, l, *ff, !merge)? {
                report.dequantized.push(ty);
            }
            report.modules.push(lin.name().to_string());
            if let Some(a) = ia3_on(lin, adapter_name) {
                a.set_merged(merge);
            }
        }
    }
    Ok(report)
}

/// Fold IA3 adapter `adapter_name` into the base weights (PEFT's `merge`): W's rows (output
/// vectors, with the bias) or columns (feed-forward vectors) are multiplied by the vector.
pub fn merge_adapter(model: &mut dyn Model, adapter_name: &str) -> Result<MergeReport> {
    merge_impl(model, adapter_name, true)
}

/// Undo [`merge_adapter`] by dividing by `l + 1e-8`, as PEFT does (inexact where l is near 0).
pub fn unmerge_adapter(model: &mut dyn Model, adapter_name: &str) -> Result<()> {
    merge_impl(model, adapter_name, false).map(|_| ())
}

/// Merge adapter `adapter_name` and detach it (PEFT's `merge_and_unload`); a module in
/// `modules_to_save` gets its trained copy's weights.
pub fn merge_and_unload(model: &mut dyn Model, adapter_name: &str) -> Result<MergeReport> {
    let mut report = merge_adapter(model, adapter_name)?;
    for lin in model.linears_mut() {
        let is_saved = lin
            .adapters()
            .any(|(n, a)| n == adapter_name && as_saved_module(a).is_some());
        if !is_saved {
            continue;
        }
        let Some(removed) = lin.remove_adapter(adapter_name) else {
            continue;
        };
        let Some(copy) = as_saved_module(&*removed) else {
            continue;
        };
        if copy.is_active() {
            copy.write_into(lin)?;
            report.modules.push(lin.name().to_string());
        }
    }
    crate::peft::remove_adapter(model, adapter_name)?;
    Ok(report)
}
