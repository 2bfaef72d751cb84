//! `BottleneckConfig`: what `adapter_config.json` holds for a bottleneck adapter, and the
//! `[adapter]` section of a training config (same keys).
use crate::peft::PeftMethod;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which sub-layers get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterType {
    /// After the attention block(s) and after the feed-forward block (Houlsby et al. 2019).
    Houlsby,
    /// After the feed-forward block only (Pfeiffer et al. 2021): half the adapters, about the
    /// same quality.
    #[default]
    Pfeiffer,
}

/// The bottleneck's non-linearity (torch's defaults: `gelu` is the exact erf form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Gelu,
    /// x · sigmoid(x) (also called SiLU), Houlsby's choice.
    #[serde(alias = "silu")]
    Swish,
    Tanh,
}

impl Activation {
    pub fn apply(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Swish => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// The bottleneck-adapter config. Keys follow PEFT's conventions (`peft_type`, `task_type`,
/// `target_modules`, `modules_to_save`, `inference_mode`, `base_model_name_or_path`, `revision`)
/// and AdapterHub's names for the method's own settings (`reduction_factor`, `non_linearity`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleneckConfig {
    #[serde(default = "peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    /// `houlsby` (after attention and feed-forward) or `pfeiffer` (after feed-forward only).
    #[serde(default)]
    pub adapter_type: AdapterType,
    /// hidden / bottleneck width (16: a 576-wide model gets 36-wide adapters).
    #[serde(default = "default_reduction_factor")]
    pub reduction_factor: f64,
    /// Default: `swish` for Houlsby, `relu` for Pfeiffer (AdapterHub's defaults).
    #[serde(default)]
    pub non_linearity: Option<Activation>,
    /// Output projections to wrap instead of the family's defaults for `adapter_type`: module
    /// names (`down_proj` matches every `*.down_proj`).
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// Modules trained in full next to the adapter (a classifier), as PEFT's.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
}

fn peft_type() -> String {
    BottleneckConfig::PEFT_TYPE.to_string()
}

fn default_reduction_factor() -> f64 {
    16.0
}

/// The widest hidden size / reduction factor we accept: a larger factor leaves no bottleneck.
const MAX_REDUCTION_FACTOR: f64 = 65536.0;

impl Default for BottleneckConfig {
    fn default() -> Self {
        BottleneckConfig {
            peft_type: peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            adapter_type: AdapterType::default(),
            reduction_factor: default_reduction_factor(),
            non_linearity: None,
            target_modules: None,
            modules_to_save: None,
        }
    }
}

impl BottleneckConfig {
    pub fn activation(&self) -> Activation {
        self.non_linearity.unwrap_or(match self.adapter_type {
            AdapterType::Houlsby => Activation::Swish,
            AdapterType::Pfeiffer => Activation::Relu,
        })
    }

    /// The bottleneck width for a module `hidden` wide: hidden / reduction_factor, at least 1.
    pub fn bottleneck_size(&self, hidden: usize) -> usize {
        ((hidden as f64 / self.reduction_factor).floor() as usize).max(1)
    }
}

impl PeftMethod for BottleneckConfig {
    const PEFT_TYPE: &'static str = "BOTTLENECK";
    type Info = super::model::BottleneckInfo;

    fn validate(&self, source: &str) -> Result<()> {
        if self.peft_type != Self::PEFT_TYPE {
            return Err(Error::key(
                source,
                "peft_type",
                format!("is `{}`, expected `{}`", self.peft_type, Self::PEFT_TYPE),
            ));
        }
        let f = self.reduction_factor;
        if !(f.is_finite() && (1.0..=MAX_REDUCTION_FACTOR).contains(&f)) {
            return Err(Error::key(
                source,
                "reduction_factor",
                format!("{f} must be a number in [1, {MAX_REDUCTION_FACTOR}]"),
            ));
        }
        if let Some(t) = &self.target_modules {
            if t.is_empty() {
                return Err(Error::key(
                    source,
                    "target_modules",
                    "is empty (leave it out for the family's defaults)",
                ));
            }
        }
        Ok(())
    }

    fn attach(
        &self,
        model: &mut dyn crate::model::Model,
        adapter_name: &str,
        seed: u64,
    ) -> Result<Self::Info> {
        super::model::attach_bottleneck(model, self, adapter_name, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: BottleneckConfig = serde_json::from_str(r#"{"peft_type": "BOTTLENECK"}"#).unwrap();
        assert_eq!(c.adapter_type, AdapterType::Pfeiffer);
        assert_eq!(c.activation(), Activation::Relu);
        assert_eq!(c.bottleneck_size(576), 36);
        assert_eq!(c.bottleneck_size(8), 1);
        let h: BottleneckConfig =
            serde_json::from_str(r#"{"adapter_type": "houlsby", "reduction_factor": 8}"#).unwrap();
        assert_eq!(h.activation(), Activation::Swish);
        assert_eq!(h.bottleneck_size(576), 72);
        let bad = BottleneckConfig {
            reduction_factor: 0.5,
            ..BottleneckConfig::default()
        };
        let e = bad.validate("cfg.json").unwrap_err().to_string();
        assert!(e.contains("reduction_factor"), "{e}");
        let e = serde_json::from_str::<BottleneckConfig>(r#"{"reduction": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reduction"), "{e}");
        let e = serde_json::from_str::<BottleneckConfig>(r#"{"non_linearity": "softplus"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("softplus"), "{e}");
    }
}
