//! Model-level LoRA: attach adapters to the targeted linears, select adapters, merge them into
//! the base weights and back (PEFT's `LoraModel`).
use super::config::{InitKind, InitLoraWeights, LoftqConfig, LoraConfig, ModuleSpec};
use super::init;
use super::layer::{LoraAdapter, LoraInit};
use crate::model::Model;
use crate::nn::{Linear, LinearAdapter, LinearWeight};
use crate::peft::modules_to_save::{self, as_saved_module};
use crate::peft::{adapter_names, no_such_adapter, param_count, ParamCount, PeftMethod};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::any::Any;

/// One wrapped linear.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModuleInfo {
    /// HF module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub r: usize,
    pub alpha: f64,
    pub scale: f64,
}

/// What [`attach_lora`] did.
#[derive(Debug, Clone)]
pub struct LoraModelInfo {
    pub adapter_name: String,
    pub modules: Vec<LoraModuleInfo>,
    /// Linears trained in full next to the adapter (`modules_to_save`, e.g. `classifier`).
    pub modules_to_save: Vec<String>,
    /// Counted after attaching; `params.to_string()` is PEFT's `print_trainable_parameters` line.
    pub params: ParamCount,
    /// Stored types of quantized base weights a PiSSA / OLoRA init replaced by a dense f32
    /// residual ("Q4_1", ...); see [`LoraModelInfo::note`].
    pub dequantized: Vec<String>,
}

impl LoraModelInfo {
    /// `trainable params: N || all params: M || trainable%: P`, as PEFT prints it.
    pub fn report(&self) -> String {
        self.params.to_string()
    }

    /// e.g. "init_lora_weights: dequantized the Q4_1 base of 60 modules to f32 (their weight is now the residual)".
    pub fn note(&self) -> Option<String> {
        let mut types: Vec<&str> = self.dequantized.iter().map(String::as_str).collect();
        types.sort();
        types.dedup();
        (!types.is_empty()).then(|| {
            format!(
                "init_lora_weights: dequantized the {} base of {} modules to f32 (their weight is now the residual W - scale*B0*A0)",
                types.join(", "),
                self.dequantized.len()
            )
        })
    }
}

impl PeftMethod for LoraConfig {
    const PEFT_TYPE: &'static str = "LORA";
    type Info = LoraModelInfo;
    fn validate(&self, source: &str) -> Result<()> {
        LoraConfig::validate(self, source)
    }
    fn attach(
        &self,
        model: &mut dyn Model,
        adapter_name: &str,
        seed: u64,
    ) -> Result<LoraModelInfo> {
        attach_lora(model, self, adapter_name, seed)
    }
}

/// The LoRA adapter behind a `dyn LinearAdapter`, if it is one.
pub fn as_lora(a: &dyn LinearAdapter) -> Option<&LoraAdapter> {
    let any: &dyn Any = a;
    any.downcast_ref::<LoraAdapter>()
}

/// Adapter `adapter_name` of `lin` as LoRA; Ok(None) when the layer does not have it (or has
/// only the adapter's `modules_to_save` copy).
fn lora_on<'a>(lin: &'a Linear, adapter_name: &str) -> Result<Option<&'a LoraAdapter>> {
    match lin
        .adapters()
        .find(|(n, a)| *n == adapter_name && as_saved_module(*a).is_none())
    {
        None => Ok(None),
        Some((_, a)) => as_lora(a).map(Some).ok_or_else(|| {
            Error::msg(format!(
                "adapter `{adapter_name}` on {} is a {} adapter, not LoRA",
                lin.name(),
                a.method()
            ))
        }),
    }
}

/// Short names of the model's linears (`q_proj`, ..., `lm_head`) and one full name, for errors.
fn available_names(names: &[String]) -> String {
    let mut leaves: Vec<&str> = Vec::new();
    for n in names {
        let leaf = n.rsplit('.').next().unwrap_or(n);
        if !leaves.contains(&leaf) {
            leaves.push(leaf);
        }
    }
    format!(
        "available: {}; full names look like {}",
        leaves.join(", "),
        names.first().map(String::as_str).unwrap_or("-")
    )
}

/// `cfg` as PEFT uses it on `model`: for SEQ_CLS / TOKEN_CLS models `modules_to_save` gets the
/// classifier names PEFT adds (see `peft::modules_to_save::add_task_defaults`).
pub fn config_for_model(model: &dyn Model, cfg: &LoraConfig) -> LoraConfig {
    let mut cfg = cfg.clone();
    modules_to_save::add_task_defaults(&mut cfg.modules_to_save, model);
    cfg
}

/// The linears `cfg`'s `modules_to_save` selects on `model` (after [`config_for_model`]), in
/// model order.
pub fn resolve_modules_to_save(model: &dyn Model, cfg: &LoraConfig) -> Result<Vec<String>> {
    let cfg = config_for_model(model, cfg);
    modules_to_save::resolve(
        model,
        cfg.modules_to_save.as_deref().unwrap_or(&[]),
        "LoRA config",
    )
}

/// The names `cfg` selects, in model order. A target that matches no linear at all is an error
/// naming it (PEFT only fails when nothing matches; naming the culprit is friendlier). Modules
/// in `modules_to_save` (and the classifier of a SEQ_CLS model) are never targets, as in PEFT.
pub fn resolve_targets(model: &dyn Model, cfg: &LoraConfig) -> Result<Vec<String>> {
    let cfg = &config_for_model(model, cfg);
    let names: Vec<String> = model
        .linears()
        .iter()
        .map(|l| l.name().to_string())
        .collect();
    match cfg.targets() {
        ModuleSpec::List(list) => {
            if list.is_empty() {
                return Err(Error::key(
                    "LoRA config",
                    "target_modules",
                    "is empty (name at least one module, e.g. q_proj)",
                ));
            }
            for t in &list {
                if !names
                    .iter()
                    .any(|n| super::config::name_matches_entry(n, t))
                {
                    return Err(Error::msg(format!(
                        "LoRA target module `{t}` matches no linear layer of the model ({})",
                        available_names(&names)
                    )));
                }
            }
        }
        // "all-linear" always matches the decoder linears.
        ModuleSpec::One(_) if cfg.is_all_linear() => {}
        ModuleSpec::One(s) => {
            let re = fancy_regex::Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| Error::key("LoRA config", "target_modules", e))?;
            if !names.iter().any(|n| re.is_match(n).unwrap_or(false)) {
                return Err(Error::msg(format!(
                    "LoRA target module regex `{s}` matches no linear layer of the model ({})",
                    available_names(&names)
                )));
            }
        }
    }
    let mut out = Vec::new();
    // PEFT's "all-linear" leaves out the model's output layer, whatever it is called.
    let output = model.output_layer().filter(|_| cfg.is_all_linear());
    for n in &names {
        if cfg.matches(n)? && output != Some(n.as_str()) {
            out.push(n.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::msg(
            "the LoRA config selects no module once layers_to_transform / exclude_modules are applied",
        ));
    }
    Ok(out)
}

/// Wrap every linear `cfg` targets with a LoRA adapter named `adapter_name`. The base weights
/// stay frozen in the type they were loaded in (a quantized base stays quantized; gradients
/// reach the input through `quant::linear`). `seed` fixes A/B initialisation and dropout masks.
pub fn attach_lora(
    model: &mut dyn Model,
    cfg: &LoraConfig,
    adapter_name: &str,
    seed: u64,
) -> Result<LoraModelInfo> {
    attach_lora_with(model, cfg, adapter_name, seed, None)
}

/// Where LoftQ reads the unquantized weight of a linear whose base was quantized at load: the
/// module's name in, its `(out, in)` f32 values out (`None`: the file has no such weight).
pub type OriginalWeights<'a> = &'a dyn Fn(&str) -> Result<Option<Tensor>>;

/// [`attach_lora`] with the base's unquantized weights at hand, which `init_lora_weights =
/// "loftq"` needs on a base quantized at load (`train.base_quant`).
pub fn attach_lora_with(
    model: &mut dyn Model,
    cfg: &LoraConfig,
    adapter_name: &str,
    seed: u64,
    originals: Option<OriginalWeights>,
) -> Result<LoraModelInfo> {
    cfg.validate("LoRA config")?;
    crate::peft::check_new_adapter_name(model, adapter_name)?;
    let targets = resolve_targets(model, cfg)?;
    let saved = resolve_modules_to_save(model, cfg)?;
    modules_to_save::check_free(model, &saved)?;
    // validate() has checked the value.
    let kind = cfg
        .init_lora_weights
        .kind()
        .map_err(|e| Error::key("LoRA config", "init_lora_weights", e))?;
    let init = match kind {
        InitKind::Random => LoraInit::Random,
        InitKind::Gaussian => LoraInit::Gaussian,
        _ => LoraInit::Default,
    };
    if kind.mutates_base() {
        check_mutating_init(model, cfg, &targets)?;
    }
    let mut dequantized = Vec::new();
    let dev = model.device().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut modules = Vec::new();
    for (i, lin) in model
        .linears_mut()
        .into_iter()
        .filter(|l| targets.iter().any(|t| t == l.name()))
        .enumerate()
    {
        let p = cfg.module_params(lin.name());
        let (in_f, out_f) = (lin.in_features(), lin.out_features());
        let dropout_seed = seed
            .wrapping_add(i as u64 + 1)
            .wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let loftq = if kind == InitKind::Loftq {
            let lq = loftq_settings(cfg)?;
            loftq_init(lin, lq, p, cfg.dropout(), dropout_seed, &dev, originals)?
        } else {
            None
        };
        let a = if let Some(a) = loftq {
            a
        } else if kind.mutates_base() && kind != InitKind::Loftq {
            let (a, deq) = mutating_init(lin, kind, p, cfg.dropout(), dropout_seed, &dev)?;
            dequantized.extend(deq);
            a
        } else {
            LoraAdapter::new(
                in_f,
                out_f,
                p.r,
                p.alpha,
                p.scale,
                cfg.dropout(),
                init,
                &mut rng,
                dropout_seed,
                &dev,
            )?
        };
        let a = if cfg.use_dora {
            a.with_dora(lin.weight())?
        } else {
            a
        };
        modules.push(LoraModuleInfo {
            name: lin.name().to_string(),
            in_features: in_f,
            out_features: out_f,
            r: p.r,
            alpha: p.alpha,
            scale: p.scale,
        });
        lin.add_adapter(adapter_name, Box::new(a));
    }
    modules_to_save::attach(model, &saved, adapter_name)?;
    Ok(LoraModelInfo {
        adapter_name: adapter_name.to_string(),
        modules,
        modules_to_save: saved,
        params: param_count(model, adapter_name),
        dequantized,
    })
}

/// PiSSA / OLoRA need r ≤ min(in, out) on every target (PEFT would silently build a smaller
/// adapter than the config says), and a positive scaling for PiSSA's square roots.
fn check_mutating_init(model: &dyn Model, cfg: &LoraConfig, targets: &[String]) -> Result<()> {
    let init = match &cfg.init_lora_weights {
        InitLoraWeights::Name(n) => n.clone(),
        InitLoraWeights::Bool(b) => b.to_string(),
    };
    for lin in model.linears() {
        if !targets.iter().any(|t| t == lin.name()) {
            continue;
        }
        let p = cfg.module_params(lin.name());
        let k = lin.in_features().min(lin.out_features());
        if p.r > k {
            return Err(Error::key(
                "LoRA config",
                "r",
                format!(
                    "init_lora_weights = \"{init}\" needs r <= min(in, out) = {k} of `{}`, but its rank is {}",
                    lin.name(),
                    p.r
                ),
            ));
        }
        if matches!(
            cfg.init_lora_weights.kind(),
            Ok(InitKind::Pissa { .. } | InitKind::Loftq)
        ) && p.scale.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err(Error::key(
                "LoRA config",
                "lora_alpha",
                format!(
                    "init_lora_weights = \"{init}\" needs a positive scaling (alpha / r), `{}` has {}",
                    lin.name(),
                    p.scale
                ),
            ));
        }
    }
    Ok(())
}

/// A PiSSA / OLoRA adapter for `lin`, whose base weight becomes the residual `W − s·B₀A₀` in
/// its own dtype (PEFT casts it back too; a quantized weight becomes dense f32: its type is
/// returned). The decomposition runs on the CPU in f64.
fn mutating_init(
    lin: &mut Linear,
    kind: InitKind,
    p: super::config::ModuleParams,
    dropout: f32,
    dropout_seed: u64,
    dev: &candle_core::Device,
) -> Result<(LoraAdapter, Option<String>)> {
    let w = lin
        .weight()
        .to_dense_f32()?
        .to_device(&candle_core::Device::Cpu)?;
    let m = match kind {
        InitKind::Olora => init::olora(&w, p.r, p.scale)?,
        InitKind::Pissa { niter } => init::pissa(&w, p.r, p.scale, niter, dropout_seed)?,
        other => {
            return Err(crate::Error::msg(format!(
                "{}: init_lora_weights {other:?} does not change the base weight",
                lin.name()
            )))
        }
    };
    let residual = m.residual.to_device(dev)?;
    let deq = match lin.weight() {
        LinearWeight::Frozen(w) => {
            let dt = w.dtype();
            lin.set_weight(LinearWeight::Frozen(residual.to_dtype(dt)?));
            None
        }
        LinearWeight::Trainable(v) => {
            v.set(&residual.to_dtype(v.dtype())?)?;
            None
        }
        LinearWeight::Quantized(_) => {
            let ty = lin.weight().stored_type().to_uppercase();
            lin.set_weight(LinearWeight::Frozen(residual));
            Some(ty)
        }
    };
    let a = started_at(m.a, m.b, p, dropout, dropout_seed, dev)?;
    Ok((a, deq))
}

/// A LoRA layer that starts at (A₀, B₀) of a base-changing init and keeps them (for the
/// conversion at save and for resuming).
fn started_at(
    a0: Tensor,
    b0: Tensor,
    p: super::config::ModuleParams,
    dropout: f32,
    dropout_seed: u64,
    dev: &candle_core::Device,
) -> Result<LoraAdapter> {
    let (a0, b0) = (a0.to_device(dev)?, b0.to_device(dev)?);
    Ok(LoraAdapter::from_weights(
        a0.clone(),
        b0.clone(),
        p.alpha,
        p.scale,
        dropout,
        dropout_seed,
    )?
    .with_mutated_init(a0, b0))
}

/// `loftq_config` (PEFT's defaults when absent).
fn loftq_settings(cfg: &LoraConfig) -> Result<LoftqConfig> {
    Ok(cfg
        .loftq_config()
        .map_err(|e| Error::key("LoRA config", "loftq_config", e))?
        .unwrap_or(LoftqConfig { bits: 4, iter: 1 }))
}

/// A LoftQ adapter for `lin` (see `init::loftq`). A base quantized at load is re-quantized in
/// its own format from the file's weight (`originals`), so `loftq_bits` must be that format's
/// width; a dense base becomes the dequantized LoftQ base, NF4 without double quantization for
/// 4 bits and int8 for 8, as PEFT's `loftq_init` leaves it. `None` for a dense weight whose rows
/// are not whole blocks of that format (`base_quant` kept it dense, and said so): it gets the
/// default init.
fn loftq_init(
    lin: &mut Linear,
    lq: LoftqConfig,
    p: super::config::ModuleParams,
    dropout: f32,
    dropout_seed: u64,
    dev: &candle_core::Device,
    originals: Option<OriginalWeights>,
) -> Result<Option<LoraAdapter>> {
    use crate::quant::{bnb::FourBitKind, BaseQuant, QuantWeight};
    let name = lin.name().to_string();
    let shape = (lin.out_features(), lin.in_features());
    let quantizer = |bq: BaseQuant| {
        let name = name.clone();
        move |t: &Tensor| -> Result<(QuantWeight, Tensor)> {
            let q = bq.quantize(t)?.ok_or_else(|| {
                Error::msg(format!(
                    "{name}: rows of {} values are not whole {}-value blocks of {}, which LoftQ needs",
                    shape.1,
                    bq.block_size(),
                    bq.name()
                ))
            })?;
            let d = q.dequantize()?;
            Ok((q, d))
        }
    };
    let (a0, b0) = match lin.weight() {
        LinearWeight::Quantized(q) => {
            let stored = lin.weight().stored_type();
            let bq = q.base_quant().ok_or_else(|| {
                Error::msg(format!(
                    "{name}: init_lora_weights = \"loftq\" re-quantizes the base, and there is no quantizer for its {stored} weights"
                ))
            })?;
            let want = bq.code_bits();
            if lq.bits != want {
                return Err(Error::key(
                    "LoRA config",
                    "loftq_config",
                    format!(
                        "loftq_bits = {} but the base is quantized to {} ({want} bits): set loftq_bits = {want}",
                        lq.bits,
                        bq.name(),
                    ),
                ));
            }
            let w = match originals.map(|f| f(&name)).transpose()?.flatten() {
                Some(w) => w,
                None => {
                    return Err(Error::msg(format!(
                        "{name}: init_lora_weights = \"loftq\" measures the quantized base against its unquantized weights, and there are none for this {stored} weight: LoftQ reads them from a dense safetensors folder quantized at load (train.base_quant), not from a GGUF file or a pre-quantized folder"
                    )))
                }
            };
            if w.dims() != [shape.0, shape.1] {
                return Err(Error::msg(format!(
                    "{name}: the stored weight has shape {:?}, the layer {shape:?}",
                    w.dims()
                )));
            }
            let (qw, a0, b0) =
                init::loftq(&w, p.r, p.scale, lq.iter, dropout_seed, &mut quantizer(bq))?;
            lin.set_weight(LinearWeight::Quantized(std::sync::Arc::new(qw)));
            (a0, b0)
        }
        dense => {
            let bq = if lq.bits == 4 {
                BaseQuant::FourBit {
                    kind: FourBitKind::Nf4,
                    double_quant: false,
                }
            } else {
                BaseQuant::Int8
            };
            if !shape.1.is_multiple_of(bq.block_size()) {
                tracing::warn!(
                    "{name}: rows of {} values are not whole {}-value blocks of {}: no LoftQ, the default init",
                    shape.1,
                    bq.block_size(),
                    bq.name()
                );
                return Ok(None);
            }
            let w = dense.to_dense_f32()?.to_device(&candle_core::Device::Cpu)?;
            let quantize = quantizer(bq);
            let mut dequantized = |t: &Tensor| quantize(t).map(|(_, d)| (d.clone(), d));
            let (deq, a0, b0) =
                init::loftq(&w, p.r, p.scale, lq.iter, dropout_seed, &mut dequantized)?;
            let deq = deq.to_device(dev)?;
            let dtype = match lin.weight() {
                LinearWeight::Trainable(v) => {
                    v.set(&deq.to_dtype(v.dtype())?)?;
                    None
                }
                LinearWeight::Frozen(t) => Some(t.dtype()),
                LinearWeight::Quantized(_) => Some(DType::F32),
            };
            if let Some(dt) = dtype {
                lin.set_weight(LinearWeight::Frozen(deq.to_dtype(dt)?));
            }
            (a0, b0)
        }
    };
    started_at(a0, b0, p, dropout, dropout_seed, dev).map(Some)
}

/// Every LoRA layer of adapter `adapter_name` with its module name; errors if there is none.
fn for_each_lora(
    model: &dyn Model,
    adapter_name: &str,
    mut f: impl FnMut(&Linear, &LoraAdapter) -> Result<()>,
) -> Result<()> {
    let mut found = false;
    for lin in model.linears() {
        if let Some(a) = lora_on(lin, adapter_name)? {
            found = true;
            f(lin, a)?;
        }
    }
    if !found {
        return Err(no_such_adapter(model, adapter_name));
    }
    Ok(())
}

/// Switch one LoRA adapter (and its `modules_to_save` copies) on or off, leaving the others as
/// they are.
pub fn set_adapter_active(model: &dyn Model, adapter_name: &str, on: bool) -> Result<()> {
    for_each_lora(model, adapter_name, |_, a| {
        a.set_active(on);
        Ok(())
    })?;
    for lin in model.linears() {
        for (n, a) in lin.adapters() {
            if let Some(s) = as_saved_module(a).filter(|_| n == adapter_name) {
                s.set_active(on);
            }
        }
    }
    Ok(())
}

/// Make exactly `names` the active LoRA adapters (PEFT's `set_adapter`); other LoRA adapters
/// are switched off. Every name must be attached.
pub fn set_active_adapters(model: &dyn Model, names: &[&str]) -> Result<()> {
    let attached = adapter_names(model);
    if let Some(n) = names.iter().find(|n| !attached.iter().any(|a| a == *n)) {
        return Err(no_such_adapter(model, n));
    }
    for lin in model.linears() {
        for (n, a) in lin.adapters() {
            if let Some(l) = as_lora(a) {
                l.set_active(names.contains(&n));
            } else if let Some(s) = as_saved_module(a) {
                s.set_active(names.contains(&n));
            }
        }
    }
    Ok(())
}

/// What merging changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeReport {
    /// Modules whose base weight now includes the adapter.
    pub modules: Vec<String>,
    /// Stored types of quantized bases that had to be dequantized to f32 ("Q4_1", ...).
    pub dequantized: Vec<String>,
}

impl MergeReport {
    /// e.g. "dequantized Q4_1 base to f32 for merging" when a quantized base was replaced.
    pub fn message(&self) -> Option<String> {
        let mut types: Vec<&str> = self.dequantized.iter().map(String::as_str).collect();
        types.sort();
        types.dedup();
        (!types.is_empty())
            .then(|| format!("dequantized {} base to f32 for merging", types.join(", ")))
    }
}

fn check_mergeable(model: &dyn Model, adapter_name: &str, want_merged: bool) -> Result<()> {
    for_each_lora(model, adapter_name, |lin, a| {
        if a.is_merged() != want_merged {
            return Err(Error::msg(format!(
                "adapter `{adapter_name}` is {} merged into {}",
                if a.is_merged() { "already" } else { "not" },
                lin.name()
            )));
        }
        if model.tied(lin.name()) {
            return Err(Error::msg(format!(
                "adapter `{adapter_name}` adapts {}, which is tied to the embeddings: merging would change the input embeddings too",
                if lin.name() == "lm_head" { "the LM head".to_string() } else { format!("`{}`", lin.name()) }
            )));
        }
        Ok(())
    })
}

/// Add (sign +1) or subtract (-1) `delta` (f32, (out, in)) to the base weight of `lin`.
/// Dense weights keep their dtype; a quantized weight becomes dense f32 (its type is returned).
fn add_to_weight(
    lin: &mut Linear,
    delta: &candle_core::Tensor,
    sign: f64,
) -> Result<Option<String>> {
    let delta = (delta * sign)?;
    let (new, deq) = match lin.weight() {
        LinearWeight::Frozen(w) => {
            let dt = w.dtype();
            let sum = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?;
            (LinearWeight::Frozen(sum.to_dtype(dt)?), None)
        }
        LinearWeight::Trainable(v) => {
            let sum = (v.as_tensor().detach() + delta.to_dtype(v.dtype())?)?;
            v.set(&sum)?;
            return Ok(None);
        }
        LinearWeight::Quantized(q) => {
            let ty = lin.weight().stored_type().to_uppercase();
            (LinearWeight::Frozen((q.dequantize()? + delta)?), Some(ty))
        }
    };
    lin.set_weight(new);
    Ok(deq)
}

/// DoRA merges by rescaling, not by adding a delta (PEFT's `DoraLinearVariant.merge`):
/// `W' = m/‖W+ΔW‖ ⊙ (W+ΔW)`, and unmerges with the norm kept at merge time. `None` when the
/// layer's adapter is plain LoRA; `Some(dequantized type)` when it rewrote the weight.
fn dora_rewrite(
    lin: &mut Linear,
    adapter_name: &str,
    merge: bool,
) -> Result<Option<Option<String>>> {
    let Some(a) = lora_on(lin, adapter_name)?.filter(|a| a.magnitude().is_some()) else {
        return Ok(None);
    };
    let w = lin.weight().to_dense_f32()?;
    let new = if merge {
        a.dora_merged(&w)?
    } else {
        a.dora_unmerged(&w)?
    };
    let deq = match lin.weight() {
        LinearWeight::Frozen(w) => {
            let dt = w.dtype();
            lin.set_weight(LinearWeight::Frozen(new.to_dtype(dt)?));
            None
        }
        LinearWeight::Trainable(v) => {
            v.set(&new.to_dtype(v.dtype())?)?;
            None
        }
        LinearWeight::Quantized(_) => {
            let ty = lin.weight().stored_type().to_uppercase();
            lin.set_weight(LinearWeight::Frozen(new));
            Some(ty)
        }
    };
    Ok(Some(deq))
}

fn deltas(model: &dyn Model, adapter_name: &str) -> Result<Vec<(String, candle_core::Tensor)>> {
    let mut out = Vec::new();
    for_each_lora(model, adapter_name, |lin, a| {
        let d = a
            .delta_weight()?
            .ok_or_else(|| Error::msg("LoRA adapter without a delta weight"))?;
        out.push((lin.name().to_string(), d));
        Ok(())
    })?;
    Ok(out)
}

fn set_merged(model: &dyn Model, adapter_name: &str, on: bool) -> Result<()> {
    for_each_lora(model, adapter_name, |_, a| {
        a.set_merged(on);
        Ok(())
    })
}

/// Fold adapter `adapter_name` into the base weights: `W += scale · B A` in W's stored dtype
/// (a quantized W is dequantized to f32 first; see [`MergeReport::message`]). The adapter stays
/// attached but is skipped in forward, so [`unmerge_adapter`] can take it out again.
pub fn merge_adapter(model: &mut dyn Model, adapter_name: &str) -> Result<MergeReport> {
    check_mergeable(model, adapter_name, false)?;
    let deltas = deltas(model, adapter_name)?;
    let mut report = MergeReport::default();
    for lin in model.linears_mut() {
        if let Some((_, d)) = deltas.iter().find(|(n, _)| n == lin.name()) {
            if let Some(ty) = dora_rewrite(lin, adapter_name, true)? {
                report.dequantized.extend(ty);
                report.modules.push(lin.name().to_string());
                continue;
            }
            if let Some(ty) = add_to_weight(lin, d, 1.0)? {
                report.dequantized.push(ty);
            }
            report.modules.push(lin.name().to_string());
        }
    }
    set_merged(model, adapter_name, true)?;
    Ok(report)
}

/// Undo [`merge_adapter`]: `W -= scale · B A` and run the adapter on the fly again. A base that
/// was dequantized for merging stays dense f32.
pub fn unmerge_adapter(model: &mut dyn Model, adapter_name: &str) -> Result<()> {
    check_mergeable(model, adapter_name, true)?;
    let deltas = deltas(model, adapter_name)?;
    for lin in model.linears_mut() {
        if let Some((_, d)) = deltas.iter().find(|(n, _)| n == lin.name()) {
            if dora_rewrite(lin, adapter_name, false)?.is_none() {
                add_to_weight(lin, d, -1.0)?;
            }
        }
    }
    set_merged(model, adapter_name, false)
}

/// Merge adapter `adapter_name` and detach it (PEFT's `merge_and_unload` for one adapter): a
/// module in `modules_to_save` gets its trained copy's weights in place of the base's. The
/// model is then a plain model that `model::convert::write_hf_folder` can save.
pub fn merge_and_unload(model: &mut dyn Model, adapter_name: &str) -> Result<MergeReport> {
    let mut report = merge_adapter(model, adapter_name)?;
    for lin in model.linears_mut() {
        let is_saved = lin
            .adapters()
            .any(|(n, a)| n == adapter_name && as_saved_module(a).is_some());
        if !is_saved {
            continue;
        }
        let copy = lin
            .remove_adapter(adapter_name)
            .expect("the layer has the adapter");
        let copy = as_saved_module(&*copy).expect("checked above");
        // PEFT keeps the original module where the adapter's copy is not active.
        if copy.is_active() {
            copy.write_into(lin)?;
            report.modules.push(lin.name().to_string());
        }
    }
    crate::peft::remove_adapter(model, adapter_name)?;
    Ok(report)
}
