//! PEFT adapter folders: `adapter_config.json` plus `adapter_model.safetensors`, with tensors
//! named as PEFT's `save_pretrained` names them for a causal LM
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`: no adapter name in the key)
//! and, for modules trained in full (`modules_to_save`), the module's own parameter names
//! (`base_model.model.classifier.weight`, `base_model.model.classifier.bias`).
//! Folders written here load in PEFT and folders written by PEFT load here.
use super::bottleneck::BottleneckConfig;
use super::ia3::Ia3Config;
use super::lora::LoraConfig;
use super::prompt_learning::{PromptLearningConfig, PromptMethod};
use super::{adapter_params, param_count, ParamCount, PeftMethod};
use crate::fsutil::{write_atomic, write_safetensors};
use crate::model::{Model, TaskType};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before the module name: `PeftModel.base_model` (the tuner) wraps `.model`.
pub const KEY_PREFIX: &str = "base_model.model.";

/// An adapter config of any supported method, as read from `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    Bottleneck(BottleneckConfig),
    /// PROMPT_TUNING, PREFIX_TUNING, P_TUNING.
    Prompt(PromptLearningConfig),
}

impl AdapterConfig {
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => <LoraConfig as PeftMethod>::PEFT_TYPE,
            AdapterConfig::Ia3(_) => <Ia3Config as PeftMethod>::PEFT_TYPE,
            AdapterConfig::Bottleneck(_) => <BottleneckConfig as PeftMethod>::PEFT_TYPE,
            AdapterConfig::Prompt(c) => c.peft_type.peft_type(),
        }
    }
}

/// Read and validate `dir/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.exists() {
        return Err(Error::file(
            &path,
            "missing: not a PEFT adapter folder (expected adapter_config.json and adapter_model.safetensors)",
        ));
    }
    let text = crate::fsutil::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let src = path.display().to_string();
    let peft_type = v
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::key(&src, "peft_type", "missing or not a string"))?;
    match peft_type {
        "LORA" => {
            let cfg: LoraConfig = serde_json::from_value(v.clone())
                .map_err(|e| Error::file(&path, format!("invalid LoRA config: {e}")))?;
            cfg.validate(&src)?;
            Ok(AdapterConfig::Lora(cfg))
        }
        "IA3" => {
            let cfg: Ia3Config = serde_json::from_value(v.clone())
                .map_err(|e| Error::file(&path, format!("invalid IA3 config: {e}")))?;
            cfg.validate(&src)?;
            Ok(AdapterConfig::Ia3(cfg))
        }
        "BOTTLENECK" => {
            let cfg: BottleneckConfig = serde_json::from_value(v.clone()).map_err(|e| {
                Error::file(&path, format!("invalid bottleneck adapter config: {e}"))
            })?;
            cfg.validate(&src)?;
            Ok(AdapterConfig::Bottleneck(cfg))
        }
        t if PromptMethod::from_peft_type(t).is_some() => {
            let cfg: PromptLearningConfig = serde_json::from_value(v.clone())
                .map_err(|e| Error::file(&path, format!("invalid {t} config: {e}")))?;
            cfg.validate(&src)?;
            Ok(AdapterConfig::Prompt(cfg))
        }
        other => Err(Error::key(
            &src,
            "peft_type",
            format!("`{other}` is not supported (supported: LORA, IA3, BOTTLENECK, PROMPT_TUNING, PREFIX_TUNING, P_TUNING)"),
        )),
    }
}

/// Write adapter `adapter_name` of `model` with its config `cfg` as a PEFT folder in `dir`
/// (created if needed); `task_type` is the model's. Both files are written to a temporary name
/// and renamed, so an interrupted save never leaves a truncated adapter behind.
pub fn save_adapter<M: PeftMethod>(
    model: &dyn Model,
    adapter_name: &str,
    cfg: &M,
    dir: &Path,
) -> Result<()> {
    let params = adapter_params(model, adapter_name);
    if params.is_empty() {
        return Err(super::no_such_adapter(model, adapter_name));
    }
    let mut sd: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in params {
        let t = v.as_tensor().detach().to_dtype(DType::F32)?.contiguous()?;
        sd.insert(format!("{KEY_PREFIX}{name}"), t);
    }
    save_adapter_with(model, cfg, &sd, dir)
}

/// [`save_adapter`] for tensors computed elsewhere (PEFT key names): a PiSSA adapter converted
/// for the original base (`peft::lora::convert`).
pub fn save_adapter_with<M: PeftMethod>(
    model: &dyn Model,
    cfg: &M,
    sd: &HashMap<String, Tensor>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), sd)?;

    let mut json = serde_json::to_value(cfg)
        .map_err(|e| Error::msg(format!("cannot serialize the adapter config: {e}")))?;
    json["peft_type"] = M::PEFT_TYPE.into();
    json["task_type"] = model.task_type().as_peft().into();
    // PEFT's SEQ_CLS / TOKEN_CLS models add their classifier names to the config it saves.
    if let Some(v) = json.get_mut("modules_to_save") {
        let mut list: Option<Vec<String>> = serde_json::from_value(v.clone()).ok().flatten();
        super::modules_to_save::add_task_defaults(&mut list, model);
        *v = serde_json::to_value(list).expect("a list of strings serializes");
    }
    let text = serde_json::to_string_pretty(&json).expect("a JSON value always serializes");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}

/// An adapter read by [`load_adapter`].
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub adapter_name: String,
    pub config: AdapterConfig,
    /// Module names the adapter wraps.
    pub modules: Vec<String>,
    pub params: ParamCount,
}

/// Check the `task_type` of `dir/adapter_config.json` against the model's: an adapter made for
/// another kind of model (a CAUSAL_LM adapter on a SEQ_2_SEQ_LM model) is a one-line error. A
/// missing or null `task_type` is accepted (PEFT allows it).
pub fn check_task_type(model: &dyn Model, dir: &Path) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = crate::fsutil::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    let src = path.display().to_string();
    let want = model.task_type();
    match v.get("task_type") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(t)) => match TaskType::from_peft(t) {
            Some(got) if got == want => Ok(()),
            Some(got) => Err(Error::key(
                &src,
                "task_type",
                format!(
                    "the adapter is {got} but the model, {}, is {want}",
                    model.describe()
                ),
            )),
            None => Err(Error::key(
                &src,
                "task_type",
                format!(
                    "`{t}` is not supported (supported: {})",
                    TaskType::ALL.map(TaskType::as_peft).join(", ")
                ),
            )),
        },
        Some(other) => Err(Error::key(
            &src,
            "task_type",
            format!("expected a string, found {other}"),
        )),
    }
}

/// Attach the adapter in `dir` (written by PEFT or by us) to `model` as `adapter_name`.
/// The config is validated (its `task_type` must be the model's), every tensor the config
/// implies must be in the file with the shape the model implies, and the file may hold nothing
/// else. On error nothing stays attached.
pub fn load_adapter(
    model: &mut dyn Model,
    dir: &Path,
    adapter_name: &str,
) -> Result<LoadedAdapter> {
    let config = read_adapter_config(dir)?;
    check_task_type(model, dir)?;
    if let AdapterConfig::Prompt(cfg) = &config {
        // A soft prompt wraps no linear: the model reads it before its inputs.
        let (cfg, params) = super::prompt_learning::load_prompt_adapter(model, cfg, dir)?;
        return Ok(LoadedAdapter {
            adapter_name: adapter_name.to_string(),
            config: AdapterConfig::Prompt(cfg),
            modules: Vec::new(),
            params,
        });
    }
    let path = dir.join(WEIGHTS_FILE);
    if !path.exists() {
        let bin = dir.join("adapter_model.bin");
        return Err(if bin.exists() {
            Error::file(
                &bin,
                "pickled adapters are not supported; re-save it with PEFT's save_pretrained(safe_serialization=True)",
            )
        } else {
            Error::file(&path, "missing")
        });
    }
    // Shapes first, from the header: nothing is allocated for a rank or a module the file does
    // not back with tensors of the right size.
    let shapes = header_shapes(&path)?;
    match &config {
        AdapterConfig::Lora(cfg) => check_lora_shapes(model, cfg, dir, &path, &shapes)?,
        AdapterConfig::Ia3(cfg) => check_ia3_shapes(model, cfg, dir, &path, &shapes)?,
        AdapterConfig::Bottleneck(cfg) => check_bottleneck_shapes(model, cfg, dir, &path, &shapes)?,
        // Soft prompts returned above; an error value rather than a panic if that ever changes.
        AdapterConfig::Prompt(c) => return Err(prompt_not_linear(dir, c)),
    }
    let tensors = load_finite(&path, model.device())?;
    match &config {
        AdapterConfig::Lora(cfg) => {
            // Initial values do not matter: every tensor is overwritten from the file.
            cfg.attach(model, adapter_name, 0)
                .map_err(|e| Error::file(dir.join(CONFIG_FILE), e))?;
        }
        AdapterConfig::Ia3(cfg) => {
            cfg.attach(model, adapter_name, 0)
                .map_err(|e| Error::file(dir.join(CONFIG_FILE), e))?;
        }
        AdapterConfig::Bottleneck(cfg) => {
            cfg.attach(model, adapter_name, 0)
                .map_err(|e| Error::file(dir.join(CONFIG_FILE), e))?;
        }
        AdapterConfig::Prompt(c) => return Err(prompt_not_linear(dir, c)),
    }
    let implied_copies = match &config {
        AdapterConfig::Lora(cfg) => cfg.modules_to_save.is_none(),
        AdapterConfig::Ia3(cfg) => cfg.modules_to_save.is_none(),
        AdapterConfig::Bottleneck(cfg) => cfg.modules_to_save.is_none(),
        AdapterConfig::Prompt(c) => return Err(prompt_not_linear(dir, c)),
    };
    if let Err(e) = fill_from(model, adapter_name, tensors, &path, implied_copies) {
        // Leave the model as it was (a PiSSA / OLoRA attach changed the base weights).
        super::lora::convert::undo_mutated_init(model, adapter_name)?;
        for lin in model.linears_mut() {
            lin.remove_adapter(adapter_name);
        }
        return Err(e);
    }
    let modules = model
        .linears()
        .iter()
        .filter(|l| l.adapters().any(|(n, _)| n == adapter_name))
        .map(|l| l.name().to_string())
        .collect();
    Ok(LoadedAdapter {
        adapter_name: adapter_name.to_string(),
        config,
        modules,
        params: param_count(model, adapter_name),
    })
}

fn prompt_not_linear(dir: &Path, c: &PromptLearningConfig) -> Error {
    Error::file(
        dir.join(CONFIG_FILE),
        format!(
            "a {} adapter is a soft prompt, not a wrapper of linear layers",
            c.peft_type.peft_type()
        ),
    )
}

/// Tensor name -> shape, from a safetensors header (the header and byte ranges are validated).
/// The tensors of an adapter file, every value finite: an adapter that diverged in training (or
/// a damaged file) would otherwise turn every output into NaN or garbage without a word.
pub(crate) fn load_finite(
    path: &Path,
    device: &candle_core::Device,
) -> Result<HashMap<String, candle_core::Tensor>> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::file(path, crate::error::first_line(&e.to_string())))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        // An integer tensor would be read as numbers of another meaning: PEFT writes floats.
        let dtype = tensors[name].dtype();
        if !dtype.is_float() {
            return Err(Error::file(
                path,
                format!("tensor `{name}` is stored as {dtype:?}: an adapter's weights are floating point (f32, f16, bf16)"),
            ));
        }
        let v = tensors[name]
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{name}` holds {} at index {i}: the adapter diverged in training or the file is damaged",
                    v[i]
                ),
            ));
        }
    }
    Ok(tensors)
}

pub(crate) fn header_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    if !std::fs::metadata(path)
        .map_err(|e| Error::file(path, e))?
        .is_file()
    {
        return Err(Error::file(
            path,
            "is not a regular file (a folder, FIFO or device); refused",
        ));
    }
    let file = crate::fsutil::open_regular(path)?;
    // SAFETY: read-only map of a file we only read; a concurrent writer could change the bytes
    // but not the memory safety of reading them.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// Every LoRA tensor the config implies must be in the file with the shape its base module and
/// rank imply (A: (r, in), B: (out, r)), so must the weight and bias of every module in
/// `modules_to_save` (the base module's shapes), and the file may hold nothing else.
fn check_lora_shapes(
    model: &dyn Model,
    cfg: &LoraConfig,
    dir: &Path,
    path: &Path,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    let mut check = ShapeCheck::new(dir, path, shapes);
    let targets = super::lora::resolve_targets(model, cfg).map_err(|e| check.config_error(e))?;
    for lin in model.linears() {
        if !targets.iter().any(|t| t == lin.name()) {
            continue;
        }
        let (in_f, out_f) = (lin.in_features(), lin.out_features());
        let r = cfg.module_params(lin.name()).r;
        let rank_key = if cfg.r == r { "r" } else { "rank_pattern" };
        for (part, want) in [("lora_A", [r, in_f]), ("lora_B", [out_f, r])] {
            let key = format!("{KEY_PREFIX}{}.{part}.weight", lin.name());
            let config_path = check.config_path.display().to_string();
            check.targeted(key, &want, || {
                format!(
                    "module `{}` ({in_f} in, {out_f} out) with {config_path} key `{rank_key}` {r} implies {want:?}",
                    lin.name(),
                )
            })?;
        }
        if cfg.use_dora {
            let key = format!("{KEY_PREFIX}{}.lora_magnitude_vector", lin.name());
            let config_path = check.config_path.display().to_string();
            check.tensor(
                key,
                &[out_f],
                || format!("{config_path} sets use_dora"),
                || {
                    format!(
                        "module `{}` has {out_f} outputs (DoRA: one magnitude per output)",
                        lin.name()
                    )
                },
            )?;
        }
    }
    let saved =
        super::lora::resolve_modules_to_save(model, cfg).map_err(|e| check.config_error(e))?;
    check.finish(model, &saved, cfg.modules_to_save.is_none())
}

/// The IA3 vector of every target must be in the file shaped as PEFT saves it ((out, 1), or
/// (1, in) for a feed-forward module), with the `modules_to_save` tensors, and nothing else.
fn check_ia3_shapes(
    model: &dyn Model,
    cfg: &Ia3Config,
    dir: &Path,
    path: &Path,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    let mut check = ShapeCheck::new(dir, path, shapes);
    let targets = super::ia3::resolve_targets(model, cfg).map_err(|e| check.config_error(e))?;
    for lin in model.linears() {
        let Some((_, ff)) = targets.iter().find(|(n, _)| n == lin.name()) else {
            continue;
        };
        let (in_f, out_f) = (lin.in_features(), lin.out_features());
        let want = if *ff { [1, in_f] } else { [out_f, 1] };
        let key = format!("{KEY_PREFIX}{}.ia3_l", lin.name());
        check.targeted(key, &want, || {
            format!(
                "module `{}` ({in_f} in, {out_f} out, {}) implies {want:?}",
                lin.name(),
                if *ff {
                    "feed-forward: input scaling"
                } else {
                    "output scaling"
                }
            )
        })?;
    }
    let full = super::ia3::config_for_model(model, cfg);
    check.finish_listed(
        model,
        full.modules_to_save.as_deref(),
        "IA3 config",
        cfg.modules_to_save.is_none(),
    )
}

/// Every bottleneck tensor the config implies ([`super::bottleneck::expected_shapes`]) must be
/// in the file with its shape, with the `modules_to_save` tensors, and nothing else.
fn check_bottleneck_shapes(
    model: &dyn Model,
    cfg: &BottleneckConfig,
    dir: &Path,
    path: &Path,
    shapes: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    let mut check = ShapeCheck::new(dir, path, shapes);
    let want = super::bottleneck::expected_shapes(model, cfg).map_err(|e| check.config_error(e))?;
    for (key, shape) in want {
        let config_path = check.config_path.display().to_string();
        check.targeted(key, &shape, || {
            format!("the model and {config_path} imply {shape:?}")
        })?;
    }
    let full = super::bottleneck::model::config_for_model(model, cfg);
    check.finish_listed(
        model,
        full.modules_to_save.as_deref(),
        "adapter config",
        cfg.modules_to_save.is_none(),
    )
}

/// A `modules_to_save` copy's parameter (`classifier.weight`): a linear's own weight or bias,
/// not an adapter tensor under it (`q_proj.lora_A.weight`, `k_proj.ia3_l`).
fn is_module_copy(model: &dyn Model, param: &str) -> bool {
    let module = param
        .strip_suffix(".weight")
        .or_else(|| param.strip_suffix(".bias"));
    module.is_some_and(|m| model.linears().iter().any(|l| l.name() == m))
}

/// An adapter file's tensor shapes (from its header) checked against what its config and the
/// model imply, one tensor at a time; what has been checked is `expected`, and [`Self::finish`]
/// refuses anything else in the file. The same checks and messages for every method.
struct ShapeCheck<'a> {
    config_path: std::path::PathBuf,
    path: &'a Path,
    shapes: &'a HashMap<String, Vec<usize>>,
    expected: HashSet<String>,
}

impl<'a> ShapeCheck<'a> {
    fn new(dir: &Path, path: &'a Path, shapes: &'a HashMap<String, Vec<usize>>) -> Self {
        ShapeCheck {
            config_path: dir.join(CONFIG_FILE),
            path,
            shapes,
            expected: HashSet::new(),
        }
    }

    /// An error in what the config file says (its targets, its `modules_to_save`).
    fn config_error(&self, e: impl std::fmt::Display) -> Error {
        Error::file(&self.config_path, e)
    }

    /// Tensor `key` must be in the file with shape `want`: if missing, the error says why it
    /// should be there (`missing`); if of another shape, what implies `want` (`implies`).
    fn tensor(
        &mut self,
        key: String,
        want: &[usize],
        missing: impl FnOnce() -> String,
        implies: impl FnOnce() -> String,
    ) -> Result<()> {
        let got = self.shapes.get(&key).ok_or_else(|| {
            Error::file(
                self.path,
                format!("tensor `{key}` is missing ({})", missing()),
            )
        })?;
        if got.as_slice() != want {
            return Err(Error::file(
                self.path,
                format!("tensor `{key}` is {got:?} but {}", implies()),
            ));
        }
        self.expected.insert(key);
        Ok(())
    }

    /// [`Self::tensor`] for a tensor of a module the config targets.
    fn targeted(
        &mut self,
        key: String,
        want: &[usize],
        implies: impl FnOnce() -> String,
    ) -> Result<()> {
        self.tensor(
            key,
            want,
            || "the config targets this module".to_string(),
            implies,
        )
    }

    /// [`Self::finish`] with `modules_to_save` as the config lists it (`None`: none), resolved
    /// against the model's modules (`source` names the config in errors).
    fn finish_listed(
        self,
        model: &dyn Model,
        modules_to_save: Option<&[String]>,
        source: &str,
        implied_copies: bool,
    ) -> Result<()> {
        let saved = super::modules_to_save::resolve(model, modules_to_save.unwrap_or(&[]), source)
            .map_err(|e| self.config_error(e))?;
        self.finish(model, &saved, implied_copies)
    }

    /// The weight and bias of every module in `modules_to_save` (`saved`) must be in the file
    /// with the base module's shapes, and the file may hold nothing beyond them and what was
    /// checked before.
    fn finish(mut self, model: &dyn Model, saved: &[String], implied_copies: bool) -> Result<()> {
        for lin in model.linears() {
            if !saved.iter().any(|s| s == lin.name()) {
                continue;
            }
            let (in_f, out_f) = (lin.in_features(), lin.out_features());
            let mut parts = vec![("weight", vec![out_f, in_f])];
            if lin.bias().is_some() {
                parts.push(("bias", vec![out_f]));
            }
            // PEFT adds a SEQ_CLS / TOKEN_CLS model's classifier to modules_to_save on its own; an
            // adapter whose config names none and whose file has no tensors for it keeps the base's
            // head (PEFT loads it with the copy left as the original).
            let weight_key = format!("{KEY_PREFIX}{}.weight", lin.name());
            if implied_copies && !self.shapes.contains_key(&weight_key) {
                continue;
            }
            for (part, want) in parts {
                let key = format!("{KEY_PREFIX}{}.{part}", lin.name());
                let config_path = self.config_path.display().to_string();
                self.tensor(
                    key,
                    &want,
                    || {
                        format!(
                            "modules_to_save in {config_path} selects module `{}`",
                            lin.name()
                        )
                    },
                    || {
                        format!(
                            "the model's `{}` ({in_f} in, {out_f} out) is {want:?} (a head for another number of labels?)",
                            lin.name()
                        )
                    },
                )?;
            }
        }
        let mut extra: Vec<&String> = self
            .shapes
            .keys()
            .filter(|k| !self.expected.contains(*k))
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(Error::file(
                self.path,
                format!(
                    "tensor `{first}` belongs to no module the config targets ({} unexpected tensors)",
                    extra.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Copy the file's tensors into the freshly attached adapter's parameters.
fn fill_from(
    model: &dyn Model,
    adapter_name: &str,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
    implied_copies: bool,
) -> Result<()> {
    for (name, var) in adapter_params(model, adapter_name) {
        let key = format!("{KEY_PREFIX}{name}");
        // A module copy the config did not ask for (the task type's default head), absent from
        // the file: it stays the base module's copy ([`check_lora_shapes`]).
        if implied_copies && is_module_copy(model, &name) && !tensors.contains_key(&key) {
            continue;
        }
        let t = tensors.remove(&key).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{key}` is missing (the config targets this module)"),
            )
        })?;
        if t.dims() != var.dims() {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{key}` has shape {:?} but the model and config imply {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    if let Some(extra) = {
        let mut left: Vec<&String> = tensors.keys().collect();
        left.sort();
        left.first().map(|s| s.to_string())
    } {
        return Err(Error::file(
            path,
            format!(
                "tensor `{extra}` belongs to no module the config targets ({} unexpected tensors)",
                tensors.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_tensors_that_are_not_finite_are_refused_by_name() {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-load-finite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(WEIGHTS_FILE);
        let dev = candle_core::Device::Cpu;
        let ok = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0]], &dev).unwrap();
        let mut bad = vec![0.1f32; 6];
        bad[4] = f32::NAN;
        let bad = Tensor::from_vec(bad, (2, 3), &dev).unwrap();
        let mut tensors = HashMap::new();
        tensors.insert("a.lora_A.weight".to_string(), ok.clone());
        write_safetensors(&path, &tensors).unwrap();
        assert_eq!(load_finite(&path, &dev).unwrap().len(), 1);
        tensors.insert("b.lora_B.weight".to_string(), bad);
        write_safetensors(&path, &tensors).unwrap();
        let e = load_finite(&path, &dev).unwrap_err().to_string();
        assert!(
            e.contains("`b.lora_B.weight` holds NaN at index 4") && !e.contains('\n'),
            "{e}"
        );
        // integer weights are not read as numbers
        let mut tensors = HashMap::new();
        tensors.insert(
            "a.lora_A.weight".to_string(),
            Tensor::new(&[[1i64, 2], [3, 4]], &dev).unwrap(),
        );
        write_safetensors(&path, &tensors).unwrap();
        let e = load_finite(&path, &dev).unwrap_err().to_string();
        assert!(e.contains("`a.lora_A.weight` is stored as I64"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
