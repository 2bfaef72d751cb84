//! `[selective]` and the `selective_config.json` written beside the changed tensors.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The config file of a selective folder.
pub const CONFIG_FILE: &str = "selective_config.json";
/// The changed tensors, by HF name.
pub const WEIGHTS_FILE: &str = "selective.safetensors";
/// What `peft_type` says in [`CONFIG_FILE`] (not a PEFT type: PEFT has no selective method).
pub const PEFT_TYPE: &str = "SELECTIVE";

/// A layer range: `"0-3"` (inclusive), `"5"`, or a list `[0, 1, 2]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a layer range: \"0-3\", \"5\" or a list [0, 1, 2]"
)]
pub enum LayerRange {
    List(Vec<usize>),
    Text(String),
}

impl LayerRange {
    /// The layer indices, or a one-line reason the text is not a range.
    pub fn indices(&self) -> std::result::Result<Vec<usize>, String> {
        match self {
            LayerRange::List(v) if v.is_empty() => Err("the list is empty".into()),
            LayerRange::List(v) => Ok(v.clone()),
            LayerRange::Text(s) => {
                let mut out = Vec::new();
                for part in s.split(',') {
                    let part = part.trim();
                    let bad = || format!("`{s}` is not a layer range like \"0-3\" or \"0,2,5\"");
                    match part.split_once('-') {
                        Some((a, b)) => {
                            let a: usize = a.trim().parse().map_err(|_| bad())?;
                            let b: usize = b.trim().parse().map_err(|_| bad())?;
                            if a > b {
                                return Err(format!("`{s}`: {a} is after {b}"));
                            }
                            if b - a > 100_000 {
                                return Err(format!("`{s}` is absurd"));
                            }
                            out.extend(a..=b);
                        }
                        None => out.push(part.parse().map_err(|_| bad())?),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The rules of a selective run (`[selective]` in the run config; the same keys in
/// [`CONFIG_FILE`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectiveConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<LayerRange>,
    #[serde(default)]
    pub bitfit: bool,
}

impl SelectiveConfig {
    /// At least one rule, each well-formed; errors name the key.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.modules.is_none() && self.regex.is_none() && self.layers.is_none() && !self.bitfit {
            return Err((
                "selective",
                "set at least one of modules = [...], regex = \"...\", layers = \"0-3\" or bitfit = true".into(),
            ));
        }
        if let Some(m) = &self.modules {
            if m.is_empty() {
                return Err(("selective.modules", "the list is empty".into()));
            }
        }
        if let Some(r) = &self.regex {
            fancy_regex::Regex::new(r).map_err(|e| {
                (
                    "selective.regex",
                    format!("`{r}` is not a valid regex: {e}"),
                )
            })?;
        }
        if let Some(l) = &self.layers {
            l.indices().map_err(|e| ("selective.layers", e))?;
        }
        Ok(())
    }

    /// Whether only `modules` is set (the original selective run: whole modules by name).
    pub fn modules_only(&self) -> bool {
        self.regex.is_none() && self.layers.is_none() && !self.bitfit
    }
}

/// The layer index in a parameter name: the number after `layers.`, `layer.`, `block.` or `h.`.
pub fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "block" | "h")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// A compiled rule set.
pub struct Rules {
    modules: Option<Vec<String>>,
    regex: Option<fancy_regex::Regex>,
    layers: Option<Vec<usize>>,
    bitfit: bool,
}

impl Rules {
    pub fn new(cfg: &SelectiveConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|(k, e)| Error::msg(format!("[{k}]: {e}")))?;
        let regex = match &cfg.regex {
            Some(r) => Some(
                fancy_regex::Regex::new(r)
                    .map_err(|e| Error::msg(format!("[selective] regex: {e}")))?,
            ),
            None => None,
        };
        let layers = match &cfg.layers {
            Some(l) => Some(
                l.indices()
                    .map_err(|e| Error::msg(format!("[selective] layers: {e}")))?,
            ),
            None => None,
        };
        Ok(Rules {
            modules: cfg.modules.clone(),
            regex,
            layers,
            bitfit: cfg.bitfit,
        })
    }

    /// Whether parameter `name` is trained.
    pub fn selects(&self, name: &str) -> bool {
        if let Some(m) = &self.modules {
            if !m
                .iter()
                .any(|m| name == m || name.starts_with(&format!("{m}.")))
            {
                return false;
            }
        }
        if let Some(r) = &self.regex {
            if !r.is_match(name).unwrap_or(false) {
                return false;
            }
        }
        if let Some(l) = &self.layers {
            if !layer_of(name).is_some_and(|i| l.contains(&i)) {
                return false;
            }
        }
        if self.bitfit && !name.ends_with("bias") {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_and_rules() {
        assert_eq!(
            LayerRange::Text("0-3".into()).indices().unwrap(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(
            LayerRange::Text("1, 4-5".into()).indices().unwrap(),
            vec![1, 4, 5]
        );
        assert!(LayerRange::Text("3-1".into()).indices().is_err());
        assert!(LayerRange::Text("a-b".into()).indices().is_err());
        assert!(LayerRange::List(vec![]).indices().is_err());
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_of("encoder.layer.3.output.dense.bias"), Some(3));
        assert_eq!(
            layer_of("decoder.block.1.layer.0.SelfAttention.q.weight"),
            Some(1)
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);

        let rules = Rules::new(&SelectiveConfig {
            layers: Some(LayerRange::List(vec![0])),
            bitfit: true,
            ..Default::default()
        })
        .unwrap();
        assert!(rules.selects("encoder.layer.0.attention.self.query.bias"));
        assert!(!rules.selects("encoder.layer.0.attention.self.query.weight"));
        assert!(!rules.selects("encoder.layer.1.attention.self.query.bias"));
        let rules = Rules::new(&SelectiveConfig {
            regex: Some(r"mlp\.(up|down)_proj".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(rules.selects("model.layers.3.mlp.up_proj.weight"));
        assert!(!rules.selects("model.layers.3.mlp.gate_proj.weight"));
        let e = SelectiveConfig::default().validate().unwrap_err();
        assert_eq!(e.0, "selective");
        let e = SelectiveConfig {
            regex: Some("(".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.0, "selective.regex");
    }
}
