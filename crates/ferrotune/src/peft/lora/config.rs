//! `LoraConfig`: the fields of PEFT's `adapter_config.json` for `peft_type: "LORA"`, with the
//! same names, defaults and meaning, so a config written by PEFT loads here and ours loads there.
//!
//! Module matching follows PEFT's `check_target_module_exists`: a list entry matches a module
//! whose name equals it or ends in `.entry`; a single string is a regex that must match the whole
//! name (`"all-linear"` is the exception: every linear but the output layer).
use crate::peft::config_check;
use crate::{Error, Result};
use fancy_regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A list of module names, or one string (a regex matched against the whole module name, or
/// `"all-linear"`). PEFT's `target_modules` / `exclude_modules` / `layers_pattern` take either.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a list of module names, or one string (a regex over the whole name, or \"all-linear\")"
)]
pub enum ModuleSpec {
    List(Vec<String>),
    One(String),
}

/// `init_lora_weights`: `true` (A Kaiming-uniform, B zero), `false` (both Kaiming-uniform, so the
/// adapter changes the output from the start; PEFT uses it for tests), `"gaussian"`
/// (A ~ N(0, 1/r), B zero), or one of the inits that move part of the base weight into the
/// adapter (see `peft::lora::init`): `"pissa"` (the top-r singular triplets), `"pissa_niter_K"`
/// (the same from a randomized SVD with K subspace iterations) and `"olora"` (the leading r
/// columns of a QR decomposition), and `"loftq"` (LoftQ: the base is quantized and the adapter
/// starts as the best rank-r fix of the quantization error; settings in `loftq_config`, see
/// `peft::lora::init::loftq`). PEFT's data-driven inits (EVA, CorDA, ...) are not supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\" or \"loftq\""
)]
pub enum InitLoraWeights {
    Bool(bool),
    Name(String),
}

/// [`InitLoraWeights`] parsed as PEFT's `LoraLayer.update_layer` reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    /// `true`.
    Default,
    /// `false`.
    Random,
    /// `"gaussian"` (any case, as PEFT lower-cases it).
    Gaussian,
    /// `"pissa"` (`niter: None`, a full SVD) or `"pissa_niter_K"`.
    Pissa { niter: Option<usize> },
    /// `"olora"` (any case).
    Olora,
    /// `"loftq"` (any case), with [`LoraConfig::loftq_config`].
    Loftq,
}

impl InitKind {
    /// PiSSA and OLoRA replace the base weight W by `W − scale·B₀A₀`, LoftQ by a quantized
    /// `W − scale·B₀A₀`: the adapter is only meaningful on that base, or converted against
    /// (A₀, B₀) for the original one.
    pub fn mutates_base(self) -> bool {
        matches!(
            self,
            InitKind::Pissa { .. } | InitKind::Olora | InitKind::Loftq
        )
    }
}

/// The values of `init_lora_weights` we implement, for messages.
const SUPPORTED_INITS: &str =
    "true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\", \"loftq\"";

/// PEFT's `LoftQConfig` (`loftq_config` beside `init_lora_weights = "loftq"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoftqConfig {
    /// `loftq_bits`: 4 or 8 (PEFT's default 4). On a base quantized at load it must be that
    /// format's width.
    pub bits: u32,
    /// `loftq_iter`: alternating quantize / low-rank steps (PEFT's default 1).
    pub iter: usize,
}

/// The most `loftq_iter` accepts (the LoftQ paper uses 1 to 5; each is one quantization and one
/// truncated SVD of every target weight).
pub const MAX_LOFTQ_ITER: usize = 100;

/// The most subspace iterations `"pissa_niter_K"` accepts (PEFT's examples use 4 to 16; each is
/// two QR decompositions of an (out × r) matrix).
pub const MAX_PISSA_NITER: usize = 1000;

impl InitLoraWeights {
    /// What the value asks for; an error names the supported values.
    pub fn kind(&self) -> std::result::Result<InitKind, String> {
        let n = match self {
            InitLoraWeights::Bool(true) => return Ok(InitKind::Default),
            InitLoraWeights::Bool(false) => return Ok(InitKind::Random),
            InitLoraWeights::Name(n) => n.as_str(),
        };
        // PEFT compares "pissa..." and "corda" as written, the others lower-cased.
        if n == "pissa" {
            return Ok(InitKind::Pissa { niter: None });
        }
        if let Some(k) = n.strip_prefix("pissa_niter_") {
            return match k.parse::<usize>() {
                Ok(k) if k <= MAX_PISSA_NITER => Ok(InitKind::Pissa { niter: Some(k) }),
                Ok(k) => Err(format!(
                    "`{n}`: {k} subspace iterations is more than the limit {MAX_PISSA_NITER}"
                )),
                Err(_) => Err(format!(
                    "`{n}`: the number after `pissa_niter_` must be a whole number of iterations"
                )),
            };
        }
        let lower = n.to_ascii_lowercase();
        match lower.as_str() {
            "gaussian" => Ok(InitKind::Gaussian),
            "olora" => Ok(InitKind::Olora),
            "loftq" => Ok(InitKind::Loftq),
            _ if n.starts_with("corda")
                || ["eva", "mica", "orthogonal", "lora_ga"].contains(&lower.as_str()) =>
            {
                Err(format!(
                    "`{n}` is not supported (supported: {SUPPORTED_INITS})"
                ))
            }
            _ => Err(format!(
                "`{n}` is not a LoRA initialisation (supported: {SUPPORTED_INITS})"
            )),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "expected a layer index or a list of them")]
pub enum LayerIndices {
    One(usize),
    List(Vec<usize>),
}

impl LayerIndices {
    fn contains(&self, i: usize) -> bool {
        match self {
            LayerIndices::One(j) => *j == i,
            LayerIndices::List(v) => v.contains(&i),
        }
    }
    fn is_empty(&self) -> bool {
        matches!(self, LayerIndices::List(v) if v.is_empty())
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}

/// PEFT writes `lora_alpha` and `alpha_pattern` values as integers when they are whole numbers;
/// writing `16` rather than `16.0` keeps our files byte-compatible in spirit with theirs.
mod int_if_whole {
    use serde::Serializer;
    pub fn ser<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            s.serialize_i64(*x as i64)
        } else {
            s.serialize_f64(*x)
        }
    }
    pub fn ser_map<S: Serializer>(
        m: &std::collections::BTreeMap<String, f64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                map.serialize_entry(k, &(*v as i64))?;
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// PEFT's `LoraConfig` as stored in `adapter_config.json`. Unknown keys written by other PEFT
/// versions are kept in `extra` and written back; the ones that switch on a feature we do not
/// implement (DoRA, LoRA bias, ...) are rejected by [`LoraConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha", serialize_with = "int_if_whole::ser")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// None: PEFT's default for LLaMA-family models (`q_proj`, `v_proj`).
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    /// Scale by alpha/sqrt(r) (rank-stabilized LoRA) instead of alpha/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row (`lora_magnitude_vector`), see `layer`.
    #[serde(default)]
    pub use_dora: bool,
    /// Only "none" is supported (no bias is trained).
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Only meaningful for GPT-2 style Conv1D weights; must be false for our linears.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Modules trained in full next to the adapter (a classification head), as PEFT's
    /// `ModulesToSaveWrapper` does; see `peft::modules_to_save`. For SEQ_CLS / TOKEN_CLS models
    /// `["classifier", "score"]` are added, as PEFT adds them.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    #[serde(default)]
    pub layers_pattern: Option<ModuleSpec>,
    /// Per-module rank overrides: key is a regex matched as PEFT's `get_pattern_key` does.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, matched like `rank_pattern`.
    #[serde(default, serialize_with = "int_if_whole::ser_map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            use_rslora: false,
            use_dora: false,
            bias: default_bias(),
            init_lora_weights: default_init(),
            fan_in_fan_out: false,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// PEFT features switched on by keys we keep in `extra` but do not implement. A key is "on" when
/// its value is not null/false/empty.
const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    ("lora_bias", "LoRA bias"),
    ("target_parameters", "targeting parameters"),
    ("trainable_token_indices", "trainable tokens"),
    ("layer_replication", "layer replication"),
    ("use_qalora", "QA-LoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("megatron_config", "Megatron"),
    ("use_bdlora", "block-diagonal LoRA"),
];

fn is_on(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// Python `re.fullmatch(pattern, name)`.
fn full_regex(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex `{pattern}`: {e}"))
}

fn regex_matches(re: &Regex, s: &str) -> bool {
    // Backtracking-limit errors mean "no match" here, as the pattern came from the user.
    re.is_match(s).unwrap_or(false)
}

/// The largest LoRA rank accepted (`r` and `rank_pattern` values). Ranks used in practice are
/// 4 to 256; the bound stops a typo such as 2^40 from sizing an allocation, while the adapter
/// tensors in a file are checked against the base model's modules as well.
pub const MAX_RANK: usize = 1 << 16;
/// The largest |lora_alpha| accepted (LoRA alphas are 1 to a few thousand).
pub const MAX_ALPHA: f64 = 1e6;

/// Resolved per-module hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleParams {
    pub r: usize,
    pub alpha: f64,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scale: f64,
}

impl LoraConfig {
    /// A config for the common case: rank, alpha and target module names.
    pub fn new(r: usize, lora_alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(ModuleSpec::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Check the hyper-parameters; `source` names the file (or "--lora-*" flags) in messages.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::key(source, key, what));
        config_check::peft_type(source, &self.peft_type, "LORA")?;
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if self.r > MAX_RANK {
            return bad(
                "r",
                format!("{} is larger than the limit {MAX_RANK}", self.r),
            );
        }
        // PEFT takes any alpha (a negative one flips the update's sign); past MAX_ALPHA the
        // scale alpha / r overflows what f32 updates can hold, and a typo is the likelier cause.
        let sane = |a: f64| a.is_finite() && a.abs() <= MAX_ALPHA;
        if !sane(self.lora_alpha) {
            return bad(
                "lora_alpha",
                format!(
                    "{} is not a number between -{MAX_ALPHA:e} and {MAX_ALPHA:e}",
                    crate::error::shown(self.lora_alpha)
                ),
            );
        }
        if let Some((k, a)) = self.alpha_pattern.iter().find(|(_, a)| !sane(**a)) {
            return bad(
                "alpha_pattern",
                format!(
                    "alpha of `{k}` is {}; it must be a number between -{MAX_ALPHA:e} and {MAX_ALPHA:e}",
                    crate::error::shown(*a)
                ),
            );
        }
        config_check::probability(source, "lora_dropout", self.lora_dropout)?;
        if self.bias != "none" {
            return bad(
                "bias",
                format!("`{}` is not supported (only \"none\")", self.bias),
            );
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "must be false: LLaMA-family linears store (out, in) weights".into(),
            );
        }
        for m in self.modules_to_save.iter().flatten() {
            config_check::no_empty_name(source, "modules_to_save", [m])?;
            saved_module_regex(m).map_err(|e| Error::key(source, "modules_to_save", e))?;
        }
        if let Err(e) = self.init_lora_weights.kind() {
            return bad("init_lora_weights", e);
        }
        if let Err(e) = self.loftq_config() {
            return bad("loftq_config", e);
        }
        if let Some((k, what)) = UNSUPPORTED_KEYS
            .iter()
            .find(|(k, _)| self.extra.get(*k).is_some_and(is_on))
        {
            return bad(k, format!("{what} is not supported"));
        }
        if let Some((k, &r)) = self
            .rank_pattern
            .iter()
            .find(|(_, &r)| r == 0 || r > MAX_RANK)
        {
            return bad(
                "rank_pattern",
                format!("rank of `{k}` is {r}; it must be in 1..={MAX_RANK}"),
            );
        }
        for k in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            pattern_regex(k).map_err(|e| Error::key(source, "rank_pattern/alpha_pattern", e))?;
        }
        if let Some(ModuleSpec::One(s)) = &self.target_modules {
            if !s.eq_ignore_ascii_case("all-linear") {
                full_regex(s).map_err(|e| Error::key(source, "target_modules", e))?;
            }
            // PEFT rejects these combinations too (LoraConfig.__post_init__).
            if self.layers_to_transform.is_some() {
                return bad(
                    "layers_to_transform",
                    "cannot be used when target_modules is a regex string".into(),
                );
            }
        }
        if let Some(ModuleSpec::One(s)) = &self.exclude_modules {
            full_regex(s).map_err(|e| Error::key(source, "exclude_modules", e))?;
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return bad(
                "layers_pattern",
                "needs layers_to_transform to be set".into(),
            );
        }
        Ok(())
    }

    /// The target list after applying PEFT's default for LLaMA-family models.
    pub fn targets(&self) -> ModuleSpec {
        self.target_modules
            .clone()
            .unwrap_or_else(|| ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()]))
    }

    pub fn is_all_linear(&self) -> bool {
        matches!(&self.target_modules, Some(ModuleSpec::One(s)) if s.eq_ignore_ascii_case("all-linear"))
    }

    /// Whether PEFT would wrap the module `name` (`lm_head` only counts as a linear when named
    /// explicitly: "all-linear" excludes the output layer, as PEFT does).
    pub fn matches(&self, name: &str) -> Result<bool> {
        if self.is_excluded(name)? {
            return Ok(false);
        }
        let found = match self.targets() {
            ModuleSpec::One(s) if s.eq_ignore_ascii_case("all-linear") => name != "lm_head",
            ModuleSpec::One(s) => regex_matches(
                &full_regex(&s).map_err(|e| Error::key("LoRA config", "target_modules", e))?,
                name,
            ),
            ModuleSpec::List(list) => list.iter().any(|t| name_matches_entry(name, t)),
        };
        if !found {
            return Ok(false);
        }
        self.layer_selected(name)
    }

    fn is_excluded(&self, name: &str) -> Result<bool> {
        // PEFT never puts an adapter on a module it saves in full, nor inside one.
        for m in self.modules_to_save.iter().flatten() {
            let re = saved_module_regex(m)
                .map_err(|e| Error::key("LoRA config", "modules_to_save", e))?;
            if regex_matches(&re, name) {
                return Ok(true);
            }
        }
        Ok(match &self.exclude_modules {
            None => false,
            Some(ModuleSpec::One(s)) => regex_matches(
                &full_regex(s).map_err(|e| Error::key("LoRA config", "exclude_modules", e))?,
                name,
            ),
            Some(ModuleSpec::List(l)) => l.iter().any(|t| name_matches_entry(name, t)),
        })
    }

    /// `layers_to_transform` / `layers_pattern`: the first numbered segment of the name is its
    /// layer index (PEFT's lazy `.*?\.[^.]*\.(\d+)\.` so nested indices are not picked up).
    fn layer_selected(&self, name: &str) -> Result<bool> {
        let Some(layers) = &self.layers_to_transform else {
            return Ok(true);
        };
        if layers.is_empty() {
            return Ok(true);
        }
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![],
            Some(ModuleSpec::One(s)) => vec![s.clone()],
            Some(ModuleSpec::List(l)) => l.clone(),
        };
        let idx_re = |p: &str| -> Result<Regex> {
            Regex::new(p).map_err(|e| Error::key("LoRA config", "layers_pattern", e))
        };
        let mut idx = None;
        if patterns.is_empty() {
            idx = first_capture(&idx_re(r"^.*?\.[^.]*\.(\d+)\.")?, name);
        } else {
            for p in patterns {
                idx = first_capture(&idx_re(&format!(r"^(?:^|.*?\.){p}\.(\d+)\."))?, name);
                if idx.is_some() {
                    break;
                }
            }
        }
        Ok(idx.is_some_and(|i| layers.contains(i)))
    }

    /// `loftq_config` (kept in `extra`): PEFT's `{"loftq_bits": 4, "loftq_iter": 1}`, either key
    /// left out taking PEFT's default; `None` when absent or empty (`{}`, PEFT's default for
    /// every other init). Unknown keys and values PEFT would refuse are errors.
    pub fn loftq_config(&self) -> std::result::Result<Option<LoftqConfig>, String> {
        let v = match self.extra.get("loftq_config") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) if m.is_empty() => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(_) => return Err("must be a table: {loftq_bits = 4, loftq_iter = 1}".into()),
        };
        let mut c = LoftqConfig { bits: 4, iter: 1 };
        for (k, x) in v {
            let n = x.as_u64();
            match k.as_str() {
                "loftq_bits" => match n {
                    Some(b @ (4 | 8)) => c.bits = b as u32,
                    _ => {
                        return Err(format!(
                            "loftq_bits: must be 4 or 8, got {}",
                            crate::error::clipped(&x.to_string())
                        ))
                    }
                },
                "loftq_iter" => match n {
                    Some(i) if (1..=MAX_LOFTQ_ITER as u64).contains(&i) => c.iter = i as usize,
                    _ => {
                        return Err(format!(
                            "loftq_iter: must be a whole number from 1 to {MAX_LOFTQ_ITER}, got {}",
                            crate::error::clipped(&x.to_string())
                        ))
                    }
                },
                other => {
                    return Err(format!(
                        "unknown key `{}` (known: loftq_bits, loftq_iter)",
                        crate::error::clipped(other)
                    ))
                }
            }
        }
        Ok(Some(c))
    }

    /// Rank, alpha and scale for module `name` (rank_pattern / alpha_pattern applied; the first
    /// key in the map's order that matches wins, like PEFT iterating its dict).
    pub fn module_params(&self, name: &str) -> ModuleParams {
        let find = |keys: Vec<&String>| -> Option<String> {
            keys.into_iter()
                .find(|k| {
                    pattern_regex(k)
                        .map(|re| regex_matches(&re, name))
                        .unwrap_or(false)
                })
                .cloned()
        };
        let r = find(self.rank_pattern.keys().collect())
            .and_then(|k| self.rank_pattern.get(&k).copied())
            .unwrap_or(self.r);
        let alpha = find(self.alpha_pattern.keys().collect())
            .and_then(|k| self.alpha_pattern.get(&k).copied())
            .unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        ModuleParams { r, alpha, scale }
    }

    /// The dropout probability, as f32.
    pub fn dropout(&self) -> f32 {
        self.lora_dropout as f32
    }
}

/// PEFT's `check_target_module_exists` guard: `re.match(rf"(^|.*\.){m}($|\..*)", key)` keeps
/// adapters off `modules_to_save` entry `m` and everything inside it.
fn saved_module_regex(m: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!(r"^(^|.*\.){m}($|\..*)"))
        .map_err(|e| format!("invalid module name `{m}`: {e}"))
}

/// PEFT's `get_pattern_key`: `re.match(rf"(.*\.)?({key})$", name)`.
fn pattern_regex(key: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| format!("invalid regex `{key}`: {e}"))
}

fn first_capture(re: &Regex, s: &str) -> Option<usize> {
    re.captures(s)
        .ok()
        .flatten()
        .and_then(|c| c.get(1))
        .and_then(|m| m.as_str().parse().ok())
}

/// A list entry matches the module with exactly that name, or any module whose name ends in
/// `.entry` (so "q_proj" and "self_attn.q_proj" both match `model.layers.0.self_attn.q_proj`).
pub fn name_matches_entry(name: &str, entry: &str) -> bool {
    name == entry
        || (name.len() > entry.len()
            && name.ends_with(entry)
            && name.as_bytes()[name.len() - entry.len() - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        let mut v = Vec::new();
        for i in 0..3 {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{i}.{m}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    fn matched(cfg: &LoraConfig) -> Vec<String> {
        names()
            .into_iter()
            .filter(|n| cfg.matches(n).unwrap())
            .collect()
    }

    #[test]
    fn list_entries_match_exact_names_and_dot_suffixes() {
        let c = LoraConfig::new(4, 8.0, &["q_proj", "layers.2.mlp.down_proj", "lm_head"]);
        assert_eq!(
            matched(&c),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.2.self_attn.q_proj",
                "model.layers.2.mlp.down_proj",
                "lm_head"
            ]
        );
        // A suffix must start at a '.': "proj" alone is not a module name.
        let c = LoraConfig::new(4, 8.0, &["proj"]);
        assert!(matched(&c).is_empty());
        assert!(!name_matches_entry(
            "model.layers.0.self_attn.xq_proj",
            "q_proj"
        ));
    }

    #[test]
    fn a_string_is_a_full_match_regex_and_all_linear_skips_the_head() {
        let mut c = LoraConfig {
            target_modules: Some(ModuleSpec::One(r".*\.1\..*_proj".into())),
            ..Default::default()
        };
        assert_eq!(
            matched(&c),
            [
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        // fullmatch: a pattern matching only part of the name does not count.
        c.target_modules = Some(ModuleSpec::One("q_proj".into()));
        assert!(matched(&c).is_empty());
        c.target_modules = Some(ModuleSpec::One("all-linear".into()));
        assert_eq!(matched(&c).len(), 9);
        assert!(!matched(&c).contains(&"lm_head".to_string()));
    }

    #[test]
    fn layers_to_transform_and_exclude_modules() {
        let mut c = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
        c.layers_to_transform = Some(LayerIndices::List(vec![0, 2]));
        c.exclude_modules = Some(ModuleSpec::List(vec!["layers.2.self_attn.v_proj".into()]));
        assert_eq!(
            matched(&c),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.2.self_attn.q_proj"
            ]
        );
        c.layers_pattern = Some(ModuleSpec::One("layers".into()));
        c.layers_to_transform = Some(LayerIndices::One(1));
        c.exclude_modules = None;
        assert_eq!(
            matched(&c),
            [
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj"
            ]
        );
    }

    #[test]
    fn rank_and_alpha_patterns_and_rslora_scale() {
        let mut c = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
        c.rank_pattern.insert("v_proj".into(), 2);
        c.alpha_pattern
            .insert(r"layers\.1\.self_attn\.q_proj".into(), 4.0);
        let q0 = c.module_params("model.layers.0.self_attn.q_proj");
        assert_eq!((q0.r, q0.alpha, q0.scale), (8, 16.0, 2.0));
        let v0 = c.module_params("model.layers.0.self_attn.v_proj");
        assert_eq!((v0.r, v0.alpha, v0.scale), (2, 16.0, 8.0));
        let q1 = c.module_params("model.layers.1.self_attn.q_proj");
        assert_eq!((q1.r, q1.alpha, q1.scale), (8, 4.0, 0.5));
        // `v_proj` must match a whole trailing segment, not "xv_proj".
        assert_eq!(c.module_params("model.layers.0.self_attn.xv_proj").r, 8);
        c.use_rslora = true;
        let v0 = c.module_params("model.layers.0.self_attn.v_proj");
        assert!((v0.scale - 16.0 / 2f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn config_json_roundtrip_keeps_unknown_keys_and_writes_integers() {
        let text = r#"{"peft_type":"LORA","task_type":"CAUSAL_LM","r":4,"lora_alpha":8,
            "target_modules":["q_proj","v_proj"],"use_dora":false,"peft_version":"0.21.2",
            "alpha_pattern":{"q_proj":2},"layers_to_transform":null}"#;
        let c: LoraConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.extra.get("peft_version").unwrap(), "0.21.2");
        c.validate("adapter_config.json").unwrap();
        let out = serde_json::to_value(&c).unwrap();
        assert_eq!(out["lora_alpha"], serde_json::json!(8));
        assert_eq!(out["alpha_pattern"]["q_proj"], serde_json::json!(2));
        assert_eq!(out["use_dora"], serde_json::json!(false));
        let back: LoraConfig = serde_json::from_value(out).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unsupported_settings_are_one_line_errors_naming_the_key() {
        let base = LoraConfig::new(4, 8.0, &["q_proj"]);
        let mut c = base.clone();
        c.extra.insert("use_qalora".into(), Value::Bool(true));
        let e = c.validate("a/adapter_config.json").unwrap_err().to_string();
        assert_eq!(
            e,
            "a/adapter_config.json: key `use_qalora`: QA-LoRA is not supported"
        );
        let mut c = base.clone();
        c.bias = "all".into();
        assert!(c.validate("x").unwrap_err().to_string().contains("`bias`"));
        let mut c = base.clone();
        c.init_lora_weights = InitLoraWeights::Name("eva".into());
        assert_eq!(
            c.validate("x").unwrap_err().to_string(),
            "x: key `init_lora_weights`: `eva` is not supported (supported: true, false, \"gaussian\", \"pissa\", \"pissa_niter_K\", \"olora\", \"loftq\")"
        );
        // LoftQ: PEFT's loftq_config, its defaults for keys left out, errors naming the key
        let mut c = base.clone();
        c.init_lora_weights = InitLoraWeights::Name("LoftQ".into());
        assert_eq!(c.init_lora_weights.kind(), Ok(InitKind::Loftq));
        assert!(InitKind::Loftq.mutates_base());
        assert_eq!(c.loftq_config(), Ok(None));
        c.extra
            .insert("loftq_config".into(), serde_json::json!({"loftq_iter": 5}));
        assert_eq!(c.loftq_config(), Ok(Some(LoftqConfig { bits: 4, iter: 5 })));
        c.validate("x").unwrap();
        for (v, want) in [
            (
                serde_json::json!({"loftq_bits": 3}),
                "loftq_bits: must be 4 or 8, got 3",
            ),
            (
                serde_json::json!({"loftq_iter": 0}),
                "loftq_iter: must be a whole number from 1 to 100, got 0",
            ),
            (
                serde_json::json!({"loftq_iter": 1.5}),
                "loftq_iter: must be a whole number from 1 to 100, got 1.5",
            ),
            (
                serde_json::json!({"bits": 4}),
                "unknown key `bits` (known: loftq_bits, loftq_iter)",
            ),
            (
                serde_json::json!(4),
                "must be a table: {loftq_bits = 4, loftq_iter = 1}",
            ),
        ] {
            c.extra.insert("loftq_config".into(), v);
            assert_eq!(
                c.validate("x").unwrap_err().to_string(),
                format!("x: key `loftq_config`: {want}")
            );
        }
        let mut c = base.clone();
        c.target_modules = Some(ModuleSpec::One("(".into()));
        let e = c.validate("x").unwrap_err().to_string();
        assert!(e.contains("`target_modules`") && !e.contains('\n'), "{e}");
        let mut c = base;
        c.lora_dropout = 1.0;
        assert!(c.validate("x").is_err());
    }

    #[test]
    fn init_lora_weights_parse_as_peft_reads_them() {
        let kind = |v: Value| serde_json::from_value::<InitLoraWeights>(v).unwrap().kind();
        assert_eq!(kind(Value::Bool(true)), Ok(InitKind::Default));
        assert_eq!(kind(Value::Bool(false)), Ok(InitKind::Random));
        assert_eq!(kind("Gaussian".into()), Ok(InitKind::Gaussian));
        assert_eq!(kind("OLoRA".into()), Ok(InitKind::Olora));
        assert_eq!(kind("pissa".into()), Ok(InitKind::Pissa { niter: None }));
        assert_eq!(
            kind("pissa_niter_4".into()),
            Ok(InitKind::Pissa { niter: Some(4) })
        );
        assert!(InitKind::Olora.mutates_base() && !InitKind::Gaussian.mutates_base());
        for bad in [
            "PiSSA",
            "pissa_niter_",
            "pissa_niter_x",
            "pissa_niter_-1",
            "eva",
            "corda",
            "kaiming",
        ] {
            let e = kind(bad.into()).unwrap_err();
            assert!(e.contains(&format!("`{bad}`")) && !e.contains('\n'), "{e}");
        }
        assert!(kind("pissa_niter_1001".into())
            .unwrap_err()
            .contains("limit 1000"));
        assert!(kind("eva".into()).unwrap_err().contains("not supported"));
    }

    #[test]
    fn ranks_are_bounded_and_alphas_finite() {
        let base = LoraConfig::new(4, 8.0, &["q_proj"]);
        let mut c = base.clone();
        c.r = 1 << 40;
        let e = c.validate("a/adapter_config.json").unwrap_err().to_string();
        assert_eq!(
            e,
            "a/adapter_config.json: key `r`: 1099511627776 is larger than the limit 65536"
        );
        c.r = MAX_RANK;
        c.validate("x").unwrap();
        let mut c = base.clone();
        c.rank_pattern.insert("v_proj".into(), 1 << 40);
        let e = c.validate("x").unwrap_err().to_string();
        assert!(e.contains("`rank_pattern`") && e.contains("v_proj"), "{e}");
        for alpha in [f64::NAN, f64::INFINITY] {
            let mut c = base.clone();
            c.lora_alpha = alpha;
            assert!(c
                .validate("x")
                .unwrap_err()
                .to_string()
                .contains("`lora_alpha`"));
            let mut c = base.clone();
            c.alpha_pattern.insert("q_proj".into(), alpha);
            let e = c.validate("x").unwrap_err().to_string();
            assert!(e.contains("`alpha_pattern`") && e.contains("q_proj"), "{e}");
        }
        // Past MAX_ALPHA the scale overflows f32 updates; a negative alpha is PEFT's too.
        for (alpha, ok) in [
            (1e30, false),
            (-1e7, false),
            (MAX_ALPHA, true),
            (-4.0, true),
        ] {
            let mut c = base.clone();
            c.lora_alpha = alpha;
            assert_eq!(c.validate("x").is_ok(), ok, "lora_alpha {alpha}");
            let mut c = base.clone();
            c.alpha_pattern.insert("q_proj".into(), alpha);
            assert_eq!(c.validate("x").is_ok(), ok, "alpha_pattern {alpha}");
        }
        // A target list of the wrong type says what it takes (not serde's enum name).
        let e = serde_json::from_value::<LoraConfig>(
            serde_json::json!({"peft_type": "LORA", "r": 4, "target_modules": 5}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("a list of module names") && !e.contains("untagged"),
            "{e}"
        );
        for p in [f64::NAN, -0.1, 1.0] {
            let mut c = base.clone();
            c.lora_dropout = p;
            assert!(c
                .validate("x")
                .unwrap_err()
                .to_string()
                .contains("`lora_dropout`"));
        }
    }
}
