//! Attach bottleneck adapters to a model: where each family's go, and the tensors an adapter
//! file must hold for a model and config.
use super::config::{AdapterType, BottleneckConfig};
use super::layer::BottleneckAdapter;
use crate::model::Model;
use crate::nn::LinearAdapter;
use crate::peft::format::KEY_PREFIX;
use crate::peft::lora::config::name_matches_entry;
use crate::peft::{modules_to_save, param_count, ParamCount};
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::any::Any;

/// What [`attach_bottleneck`] did.
#[derive(Debug, Clone)]
pub struct BottleneckInfo {
    pub adapter_name: String,
    /// The wrapped modules with their bottleneck width.
    pub modules: Vec<(String, usize)>,
    pub modules_to_save: Vec<String>,
    pub params: ParamCount,
}

/// Where a module sits in its block, for the family defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// The output projection of an attention block (self- or cross-attention).
    Attention,
    /// The output projection of a feed-forward block.
    FeedForward,
}

/// The sub-layer output projections of each family, by module name (transformers' names).
fn position(family: &str, name: &str) -> Option<Position> {
    let ends = |s: &str| name.ends_with(s);
    match family {
        "llama" if ends(".self_attn.o_proj") => Some(Position::Attention),
        "llama" if ends(".mlp.down_proj") => Some(Position::FeedForward),
        "t5" if ends(".SelfAttention.o") || ends(".EncDecAttention.o") => Some(Position::Attention),
        "t5" if ends(".DenseReluDense.wo") => Some(Position::FeedForward),
        "bert" if ends(".attention.output.dense") => Some(Position::Attention),
        "bert" if ends(".output.dense") => Some(Position::FeedForward),
        _ => None,
    }
}

/// The adapter behind a `dyn LinearAdapter`, if it is a bottleneck adapter.
pub fn as_bottleneck(a: &dyn LinearAdapter) -> Option<&BottleneckAdapter> {
    let any: &dyn Any = a;
    any.downcast_ref::<BottleneckAdapter>()
}

/// The modules `cfg` wraps on `model`, in model order: `target_modules` when given (each must
/// match a linear), else the family's attention and/or feed-forward output projections.
pub fn resolve_targets(model: &dyn Model, cfg: &BottleneckConfig) -> Result<Vec<String>> {
    let names: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    let out: Vec<String> = match &cfg.target_modules {
        Some(list) => {
            for t in list {
                if !names.iter().any(|n| name_matches_entry(n, t)) {
                    return Err(Error::key(
                        "adapter config",
                        "target_modules",
                        format!(
                            "`{t}` matches no linear layer of the model (full names look like {})",
                            names.first().map_or("-", String::as_str)
                        ),
                    ));
                }
            }
            names
                .iter()
                .filter(|n| list.iter().any(|t| name_matches_entry(n, t)))
                .cloned()
                .collect()
        }
        None => names
            .iter()
            .filter(|n| match position(model.family(), n) {
                Some(Position::FeedForward) => true,
                Some(Position::Attention) => cfg.adapter_type == AdapterType::Houlsby,
                None => false,
            })
            .cloned()
            .collect(),
    };
    if out.is_empty() {
        return Err(Error::msg(format!(
            "bottleneck adapters: no default positions for a {} model; name the sub-layer output projections in target_modules",
            model.family()
        )));
    }
    Ok(out)
}

/// `cfg` as it is saved for `model`: a SEQ_CLS / TOKEN_CLS model's classifier in
/// `modules_to_save`, as PEFT does for every method.
pub fn config_for_model(model: &dyn Model, cfg: &BottleneckConfig) -> BottleneckConfig {
    let mut cfg = cfg.clone();
    modules_to_save::add_task_defaults(&mut cfg.modules_to_save, model);
    cfg
}

/// Wrap every module `cfg` selects with a fresh adapter called `adapter_name` (weights drawn
/// from `seed`), plus the `modules_to_save` copies.
pub fn attach_bottleneck(
    model: &mut dyn Model,
    cfg: &BottleneckConfig,
    adapter_name: &str,
    seed: u64,
) -> Result<BottleneckInfo> {
    use crate::peft::PeftMethod;
    cfg.validate("adapter config")?;
    crate::peft::check_new_adapter_name(model, adapter_name)?;
    let cfg = config_for_model(model, cfg);
    let targets = resolve_targets(model, &cfg)?;
    let saved = modules_to_save::resolve(
        model,
        cfg.modules_to_save.as_deref().unwrap_or(&[]),
        "adapter config",
    )?;
    modules_to_save::check_free(model, &saved)?;
    if let Some(t) = targets.iter().find(|t| saved.contains(t)) {
        return Err(Error::key(
            "adapter config",
            "target_modules",
            format!("`{t}` is also in modules_to_save"),
        ));
    }
    let dev = model.device().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut modules = Vec::new();
    for lin in model
        .linears_mut()
        .into_iter()
        .filter(|l| targets.iter().any(|t| t == l.name()))
    {
        let hidden = lin.out_features();
        let b = cfg.bottleneck_size(hidden);
        let a = BottleneckAdapter::new(hidden, b, cfg.activation(), &mut rng, &dev)?;
        modules.push((lin.name().to_string(), b));
        lin.add_adapter(adapter_name, Box::new(a));
    }
    modules_to_save::attach(model, &saved, adapter_name)?;
    Ok(BottleneckInfo {
        adapter_name: adapter_name.to_string(),
        modules,
        modules_to_save: saved,
        params: param_count(model, adapter_name),
    })
}

/// The tensors (PEFT key, shape) an adapter file for `model` and `cfg` must hold, besides the
/// `modules_to_save` copies.
pub fn expected_shapes(
    model: &dyn Model,
    cfg: &BottleneckConfig,
) -> Result<Vec<(String, Vec<usize>)>> {
    let targets = resolve_targets(model, &config_for_model(model, cfg))?;
    let mut out = Vec::new();
    for lin in model.linears() {
        if !targets.iter().any(|t| t == lin.name()) {
            continue;
        }
        let h = lin.out_features();
        let b = cfg.bottleneck_size(h);
        let n = lin.name();
        out.push((format!("{KEY_PREFIX}{n}.adapter_down.weight"), vec![b, h]));
        out.push((format!("{KEY_PREFIX}{n}.adapter_down.bias"), vec![b]));
        out.push((format!("{KEY_PREFIX}{n}.adapter_up.weight"), vec![h, b]));
        out.push((format!("{KEY_PREFIX}{n}.adapter_up.bias"), vec![h]));
    }
    Ok(out)
}
