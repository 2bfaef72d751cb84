//! The config of a prompt learning method, with PEFT's `adapter_config.json` keys
//! (`PromptTuningConfig`, `PrefixTuningConfig`, `PromptEncoderConfig`, all
//! `PromptLearningConfig`s).
use crate::model::{Model, TaskType};
use crate::peft::config_check;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// The most virtual tokens a config may ask for (a prompt longer than any context is absurd).
pub const MAX_VIRTUAL_TOKENS: usize = 1 << 16;
/// The widest prompt encoder MLP hidden layer accepted.
pub const MAX_ENCODER_HIDDEN: usize = 1 << 16;

/// Which prompt learning method (PEFT's `peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromptMethod {
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
    #[serde(rename = "PREFIX_TUNING")]
    PrefixTuning,
    #[serde(rename = "P_TUNING")]
    PTuning,
}

impl PromptMethod {
    pub const ALL: [PromptMethod; 3] = [
        PromptMethod::PromptTuning,
        PromptMethod::PrefixTuning,
        PromptMethod::PTuning,
    ];

    /// PEFT's `peft_type`.
    pub fn peft_type(self) -> &'static str {
        match self {
            PromptMethod::PromptTuning => "PROMPT_TUNING",
            PromptMethod::PrefixTuning => "PREFIX_TUNING",
            PromptMethod::PTuning => "P_TUNING",
        }
    }

    pub fn from_peft_type(s: &str) -> Option<PromptMethod> {
        PromptMethod::ALL.into_iter().find(|m| m.peft_type() == s)
    }
}

/// How prompt tuning's virtual tokens start (PEFT's `PromptTuningInit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PromptTuningInit {
    /// N(0, 1), as a fresh `torch.nn.Embedding`.
    #[default]
    #[serde(rename = "RANDOM")]
    Random,
    /// Embeddings of tokens drawn uniformly from the vocabulary.
    #[serde(rename = "SAMPLE_VOCAB")]
    SampleVocab,
    /// Embeddings of the tokens of `prompt_tuning_init_text`, repeated or cut to length.
    #[serde(rename = "TEXT")]
    Text,
}

/// `adapter_config.json` of a prompt learning adapter. Sizes left `None` are filled from the
/// model when the adapter is attached ([`PromptLearningConfig::for_model`]), as PEFT's
/// `_prepare_prompt_learning_config` does; a saved config has them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLearningConfig {
    pub peft_type: PromptMethod,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// A saved adapter holds the prompt itself (`prompt_embeddings`), not the encoder: PEFT
    /// writes `false` while training and reads the file as in inference mode either way.
    #[serde(default)]
    pub inference_mode: bool,
    pub num_virtual_tokens: usize,
    /// Width of one virtual token: the hidden size (prompt tuning, P-tuning) or one layer's
    /// key width, kv heads × head dim (prefix tuning).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoders, 2 for encoder-decoders (a prompt for each stack).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    // ---- PROMPT_TUNING ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init: Option<PromptTuningInit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name_or_path: Option<String>,
    // ---- PREFIX_TUNING ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_projection: Option<bool>,
    // ---- PREFIX_TUNING (projection) and P_TUNING ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hidden_size: Option<usize>,
    // ---- P_TUNING ----
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_reparameterization_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_dropout: Option<f64>,
}

impl PromptLearningConfig {
    /// A config of `method` with PEFT's defaults for its own keys.
    pub fn new(method: PromptMethod, num_virtual_tokens: usize) -> Self {
        let mut c = PromptLearningConfig {
            peft_type: method,
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            num_virtual_tokens,
            token_dim: None,
            num_transformer_submodules: None,
            num_attention_heads: None,
            num_layers: None,
            prompt_tuning_init: None,
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            prefix_projection: None,
            encoder_hidden_size: None,
            encoder_reparameterization_type: None,
            encoder_num_layers: None,
            encoder_dropout: None,
        };
        match method {
            PromptMethod::PromptTuning => c.prompt_tuning_init = Some(PromptTuningInit::Random),
            PromptMethod::PrefixTuning => c.prefix_projection = Some(false),
            PromptMethod::PTuning => {
                c.encoder_reparameterization_type = Some("MLP".into());
                c.encoder_num_layers = Some(2);
                c.encoder_dropout = Some(0.0);
            }
        }
        c
    }

    /// Whether the prompt comes out of an MLP (P-tuning; prefix tuning with projection).
    pub fn has_encoder_mlp(&self) -> bool {
        match self.peft_type {
            PromptMethod::PromptTuning => false,
            PromptMethod::PrefixTuning => self.prefix_projection.unwrap_or(false),
            PromptMethod::PTuning => true,
        }
    }

    /// Check the hyper-parameters; `source` names the file or section in one-line errors.
    pub fn validate(&self, source: &str) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::key(source, key, what));
        config_check::size_in_range(
            source,
            "num_virtual_tokens",
            self.num_virtual_tokens,
            MAX_VIRTUAL_TOKENS,
        )?;
        if let Some(h) = self.encoder_hidden_size {
            config_check::size_in_range(source, "encoder_hidden_size", h, MAX_ENCODER_HIDDEN)?;
        }
        if let Some(s) = self.num_transformer_submodules {
            if !(1..=2).contains(&s) {
                return bad("num_transformer_submodules", format!("{s} is not 1 or 2"));
            }
        }
        if self.peft_type == PromptMethod::PromptTuning
            && self.prompt_tuning_init == Some(PromptTuningInit::Text)
            && !self.inference_mode
            && self
                .prompt_tuning_init_text
                .as_deref()
                .is_none_or(|t| t.is_empty())
        {
            return bad(
                "prompt_tuning_init_text",
                "prompt_tuning_init = \"TEXT\" needs a non-empty prompt_tuning_init_text".into(),
            );
        }
        if self.peft_type == PromptMethod::PTuning {
            match self.encoder_reparameterization_type.as_deref() {
                None | Some("MLP") => {}
                Some("LSTM") => {
                    return bad(
                        "encoder_reparameterization_type",
                        "LSTM is not supported (use MLP)".into(),
                    )
                }
                Some(o) => {
                    return bad(
                        "encoder_reparameterization_type",
                        format!("`{o}` is not MLP or LSTM"),
                    )
                }
            }
            if let Some(d) = self.encoder_dropout {
                config_check::probability(source, "encoder_dropout", d)?;
            }
        }
        Ok(())
    }

    /// Fill the sizes from the model as PEFT's `_prepare_prompt_learning_config` does
    /// (prefix tuning on grouped-query attention: the kv heads' width), and check those a
    /// config gives against it.
    pub fn for_model(&self, model: &dyn Model, source: &str) -> Result<PromptLearningConfig> {
        let d = model.dims();
        let mut c = self.clone();
        let submodules = match model.task_type() {
            TaskType::Seq2SeqLm => 2,
            _ => 1,
        };
        // Prefix tuning feeds the decoder's self-attention: one prefix per decoder layer, as
        // wide as its keys. The other methods only record PEFT's defaults (`num_hidden_layers`:
        // the encoder's layers on T5).
        let (layers, token_dim, heads) = match c.peft_type {
            PromptMethod::PrefixTuning => (
                if d.decoder_layers > 0 {
                    d.decoder_layers
                } else {
                    d.layers
                },
                d.kv_heads * d.head_dim,
                d.kv_heads,
            ),
            _ => (
                if d.encoder_layers > 0 {
                    d.encoder_layers
                } else {
                    d.layers
                },
                d.hidden_size,
                d.attention_heads,
            ),
        };
        let want = [
            ("token_dim", &mut c.token_dim, token_dim),
            ("num_layers", &mut c.num_layers, layers),
            ("num_attention_heads", &mut c.num_attention_heads, heads),
            (
                "num_transformer_submodules",
                &mut c.num_transformer_submodules,
                submodules,
            ),
        ];
        for (key, slot, value) in want {
            match *slot {
                Some(v) if v != value => {
                    return Err(Error::key(
                        source,
                        key,
                        format!("{v} but the model, {}, implies {value}", model.describe()),
                    ))
                }
                _ => *slot = Some(value),
            }
        }
        if c.has_encoder_mlp() && c.encoder_hidden_size.is_none() {
            c.encoder_hidden_size = c.token_dim;
        }
        c.task_type = Some(model.task_type().as_peft().to_string());
        Ok(c)
    }

    /// Rows of the trained embedding table: `num_virtual_tokens` × submodules (prefix tuning:
    /// `num_virtual_tokens`).
    pub fn total_virtual_tokens(&self) -> usize {
        match self.peft_type {
            PromptMethod::PrefixTuning => self.num_virtual_tokens,
            _ => self.num_virtual_tokens * self.num_transformer_submodules.unwrap_or(1),
        }
    }

    /// Width of the prompt the model reads: `token_dim` (prompts), `num_layers · 2 ·
    /// token_dim` (prefixes). Only after [`Self::for_model`].
    pub fn prompt_width(&self) -> usize {
        let t = self.token_dim.unwrap_or(0);
        match self.peft_type {
            PromptMethod::PrefixTuning => self.num_layers.unwrap_or(0) * 2 * t,
            _ => t,
        }
    }
}

/// `[prompt_tuning]` of a train config: PEFT's `PromptTuningConfig` keys users set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTuningSection {
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// Kept in the saved config; the text is always read with the model's own tokenizer.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
}

/// `[prefix_tuning]`: PEFT's `PrefixTuningConfig` keys users set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixTuningSection {
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
}

/// `[p_tuning]`: PEFT's `PromptEncoderConfig` keys users set (MLP only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningSection {
    pub num_virtual_tokens: usize,
    #[serde(default)]
    pub encoder_reparameterization_type: Option<String>,
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default)]
    pub encoder_num_layers: Option<usize>,
    #[serde(default)]
    pub encoder_dropout: Option<f64>,
}

impl PromptTuningSection {
    pub fn to_peft(&self, base_model: &str) -> PromptLearningConfig {
        let mut c = PromptLearningConfig::new(PromptMethod::PromptTuning, self.num_virtual_tokens);
        c.base_model_name_or_path = Some(base_model.to_string());
        c.prompt_tuning_init = Some(self.prompt_tuning_init);
        c.prompt_tuning_init_text = self.prompt_tuning_init_text.clone();
        c.tokenizer_name_or_path = self.tokenizer_name_or_path.clone().or_else(|| {
            (self.prompt_tuning_init == PromptTuningInit::Text).then(|| base_model.to_string())
        });
        c
    }
}

impl PrefixTuningSection {
    pub fn to_peft(&self, base_model: &str) -> PromptLearningConfig {
        let mut c = PromptLearningConfig::new(PromptMethod::PrefixTuning, self.num_virtual_tokens);
        c.base_model_name_or_path = Some(base_model.to_string());
        c.prefix_projection = Some(self.prefix_projection);
        c.encoder_hidden_size = self.encoder_hidden_size;
        c
    }
}

impl PTuningSection {
    pub fn to_peft(&self, base_model: &str) -> PromptLearningConfig {
        let mut c = PromptLearningConfig::new(PromptMethod::PTuning, self.num_virtual_tokens);
        c.base_model_name_or_path = Some(base_model.to_string());
        if let Some(t) = &self.encoder_reparameterization_type {
            c.encoder_reparameterization_type = Some(t.clone());
        }
        c.encoder_hidden_size = self.encoder_hidden_size;
        if self.encoder_num_layers.is_some() {
            c.encoder_num_layers = self.encoder_num_layers;
        }
        if self.encoder_dropout.is_some() {
            c.encoder_dropout = self.encoder_dropout;
        }
        c
    }
}
