//! `Ia3Config`: the fields of PEFT's `adapter_config.json` for `peft_type: "IA3"`, with the same
//! names, defaults and meaning, so a config written by PEFT loads here and ours loads there.
//!
//! Module matching is LoRA's (PEFT's `check_target_module_exists`: a list entry matches a module
//! named exactly so or ending in `.entry`, a string is a whole-name regex); which targets are
//! feed-forward follows PEFT's `_check_target_module_feedforward`: a string is a whole-name
//! regex, a list entry matches any name that merely *ends with* it (no `.` needed, as in PEFT).
use crate::peft::config_check;
use crate::peft::lora::config::{name_matches_entry, ModuleSpec};
use crate::{Error, Result};
use fancy_regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

fn default_peft_type() -> String {
    "IA3".into()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_true() -> bool {
    true
}

/// PEFT's `IA3Config` as stored in `adapter_config.json`. Unknown keys written by other PEFT
/// versions are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
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
    /// None: PEFT's default for the family ([`default_targets`]).
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    /// Targets whose *input* is scaled (a (1, in) vector) rather than their output ((out, 1)).
    /// None: PEFT's default for the family.
    #[serde(default)]
    pub feedforward_modules: Option<ModuleSpec>,
    /// Only for GPT-2 style Conv1D weights; must be false for our linears.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// true: the vectors start at 1 (the adapter is a no-op); false: N(0, 1) (PEFT's tests).
    #[serde(default = "default_true")]
    pub init_ia3_weights: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            extra: BTreeMap::new(),
        }
    }
}

/// PEFT's `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and `..._FEEDFORWARD_MODULES_MAPPING`
/// for a model of `family` / `architecture` (transformers class): (targets, feed-forward).
pub fn default_targets(
    family: &str,
    architecture: &str,
) -> (&'static [&'static str], &'static [&'static str]) {
    match family {
        "t5" => (&["k", "v", "wo"], &["wo"]),
        "bert" => (&["key", "value", "output.dense"], &["output.dense"]),
        // PEFT's qwen2 entry adapts q_proj where llama and mistral adapt k_proj.
        _ if architecture.starts_with("Qwen2") => {
            (&["q_proj", "v_proj", "down_proj"], &["down_proj"])
        }
        _ => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    }
}

/// Python `re.fullmatch(pattern, name)`.
fn full_regex(pattern: &str) -> std::result::Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("invalid regex `{pattern}`: {e}"))
}

impl Ia3Config {
    /// A config for the common case: target names and the feed-forward ones among them.
    pub fn new(targets: &[&str], feedforward: &[&str]) -> Self {
        let list = |v: &[&str]| Some(ModuleSpec::List(v.iter().map(|s| s.to_string()).collect()));
        Self {
            target_modules: list(targets),
            feedforward_modules: list(feedforward),
            ..Default::default()
        }
    }

    /// The config with the family defaults filled in where it names no targets, as PEFT's
    /// `_prepare_adapter_config` does before saving.
    pub fn with_defaults(&self, family: &str, architecture: &str) -> Self {
        let (t, f) = default_targets(family, architecture);
        let list = |v: &[&str]| ModuleSpec::List(v.iter().map(|s| s.to_string()).collect());
        let mut c = self.clone();
        if c.target_modules.is_none() {
            c.target_modules = Some(list(t));
        }
        if c.feedforward_modules.is_none() {
            c.feedforward_modules = Some(list(f));
        }
        c
    }

    /// Check the settings; `source` names the file (or the TOML table) in messages.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::key(source, key, what));
        config_check::peft_type(source, &self.peft_type, "IA3")?;
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "must be false: our linears store (out, in) weights".into(),
            );
        }
        for (key, spec) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
            ("feedforward_modules", &self.feedforward_modules),
        ] {
            match spec {
                Some(ModuleSpec::One(s)) if !s.eq_ignore_ascii_case("all-linear") => {
                    full_regex(s).map_err(|e| Error::key(source, key, e))?;
                }
                Some(ModuleSpec::List(l)) => config_check::no_empty_name(source, key, l)?,
                _ => {}
            }
        }
        // PEFT's IA3Config.__post_init__ rule.
        if let (Some(ModuleSpec::List(ff)), Some(ModuleSpec::List(t))) =
            (&self.feedforward_modules, &self.target_modules)
        {
            if let Some(f) = ff.iter().find(|f| !t.contains(f)) {
                return bad(
                    "feedforward_modules",
                    format!("`{f}` is not in target_modules (feedforward_modules must be a subset of target_modules)"),
                );
            }
        }
        config_check::no_empty_name(
            source,
            "modules_to_save",
            self.modules_to_save.iter().flatten(),
        )
    }

    /// Whether PEFT would wrap module `name` (`output` is the model's output layer, which
    /// "all-linear" leaves out). Modules in `modules_to_save`, and everything inside them, never are.
    pub fn matches(&self, name: &str, output: Option<&str>) -> Result<bool> {
        for m in self.modules_to_save.iter().flatten() {
            let re = Regex::new(&format!(r"^(^|.*\.){m}($|\..*)"))
                .map_err(|e| Error::key("IA3 config", "modules_to_save", e))?;
            if re.is_match(name).unwrap_or(false) {
                return Ok(false);
            }
        }
        if spec_matches(&self.exclude_modules, name, "exclude_modules")? {
            return Ok(false);
        }
        match &self.target_modules {
            Some(ModuleSpec::One(s)) if s.eq_ignore_ascii_case("all-linear") => {
                Ok(output != Some(name) && name != "lm_head")
            }
            spec => spec_matches(spec, name, "target_modules"),
        }
    }

    /// Whether target `name` is a feed-forward module (its input is scaled).
    pub fn is_feedforward(&self, name: &str) -> Result<bool> {
        Ok(match &self.feedforward_modules {
            None => false,
            Some(ModuleSpec::One(s)) => full_regex(s)
                .map_err(|e| Error::key("IA3 config", "feedforward_modules", e))?
                .is_match(name)
                .unwrap_or(false),
            Some(ModuleSpec::List(l)) => l.iter().any(|f| name.ends_with(f.as_str())),
        })
    }
}

fn spec_matches(spec: &Option<ModuleSpec>, name: &str, key: &str) -> Result<bool> {
    Ok(match spec {
        None => false,
        Some(ModuleSpec::One(s)) => full_regex(s)
            .map_err(|e| Error::key("IA3 config", key, e))?
            .is_match(name)
            .unwrap_or(false),
        Some(ModuleSpec::List(l)) => l.iter().any(|t| name_matches_entry(name, t)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedforward_list_entries_match_by_plain_suffix_like_peft() {
        let c = Ia3Config::new(&["key", "value", "output.dense"], &["output.dense"]);
        c.validate("x").unwrap();
        let attn_out = "bert.encoder.layer.0.attention.output.dense";
        let ffn_out = "bert.encoder.layer.0.output.dense";
        for n in [attn_out, ffn_out] {
            assert!(c.matches(n, None).unwrap() && c.is_feedforward(n).unwrap());
        }
        assert!(c
            .matches("bert.encoder.layer.0.attention.self.key", None)
            .unwrap());
        assert!(!c
            .is_feedforward("bert.encoder.layer.0.attention.self.key")
            .unwrap());
        assert!(!c
            .matches("bert.encoder.layer.0.intermediate.dense", None)
            .unwrap());
    }

    #[test]
    fn config_roundtrip_defaults_and_errors() {
        let text = r#"{"peft_type":"IA3","task_type":"CAUSAL_LM","target_modules":["k_proj","v_proj","down_proj"],
            "feedforward_modules":["down_proj"],"init_ia3_weights":true,"peft_version":"0.21.2"}"#;
        let c: Ia3Config = serde_json::from_str(text).unwrap();
        c.validate("a/adapter_config.json").unwrap();
        assert_eq!(c.extra["peft_version"], "0.21.2");
        let back: Ia3Config = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let d = Ia3Config::default().with_defaults("t5", "T5ForConditionalGeneration");
        assert_eq!(
            d,
            Ia3Config {
                task_type: d.task_type.clone(),
                ..Ia3Config::new(&["k", "v", "wo"], &["wo"])
            }
        );
        let q = Ia3Config::default().with_defaults("llama", "Qwen2ForCausalLM");
        assert_eq!(
            q.target_modules,
            Ia3Config::new(&["q_proj", "v_proj", "down_proj"], &[]).target_modules
        );
        let e = Ia3Config::new(&["k_proj"], &["down_proj"])
            .validate("a/adapter_config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("a/adapter_config.json: key `feedforward_modules`") && !e.contains('\n'),
            "{e}"
        );
        let mut r = Ia3Config::new(&["k_proj"], &[]);
        r.target_modules = Some(ModuleSpec::One("(".into()));
        assert!(r
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("`target_modules`"));
    }
}
