//! The training config: one TOML file, every section with `deny_unknown_fields`, so a typo is a
//! one-line error naming the file and the key instead of a silently ignored setting.
//!
//! ```toml
//! model = "path/or/hf:org/name"   # a .gguf file, an HF folder, or hf:org/name[@revision]
//! method = "lora"                 # lora | full (every weight) | selective ([selective]: modules,
//!                                 # regex, layers = "0-3", bitfit = true)
//!                                 # | ia3 (the [ia3] table: PEFT's IA3Config keys)
//!                                 # | prompt_tuning | prefix_tuning | p_tuning (soft prompts)
//!                                 # | adapter (bottleneck adapters, the [adapter] table)
//! task = "causal_lm"              # causal_lm | seq2seq_lm | sequence_classification |
//!                                 # token_classification (default: the model's own)
//! objective = "sft"               # sft | clm | mlm | span_corruption (default sft)
//! output_dir = "runs/dialogsum-lora"
//!
//! [data]                          # see data::config: train/validation/split/template/...
//! train = "train.jsonl"
//! template = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
//! completion = " {summary}"
//!
//! [[tasks]]               # multi-task instruction tuning, instead of [data] train / mixture:
//! name = "summarize"      # one entry per task (data::TaskConfig); [data] keeps the shared
//! train = "train.jsonl"   # settings (mixing_rates, mixing_cap, split, max_seq_len, ...)
//! validation = "dev.jsonl"
//! template = "..."        # or templates = [...]; completion = "..."; weight = 1.0
//!
//! [lora]
//! r = 16                  # rank (default 8)
//! alpha = 32              # scale is alpha / r (default 2 r)
//! dropout = 0.05          # on the adapter input (default 0)
//! targets = ["q_proj", "v_proj"]   # module names, "all-linear", or one regex string
//!                                  # (default: PEFT's for the family: q_proj/v_proj, T5 q/v,
//!                                  # BERT query/value)
//! rslora = false          # scale by alpha / sqrt(r)
//! modules_to_save = ["classifier"]  # trained in full beside the adapter (PEFT's modules_to_save;
//!                         # classification models: their classifier, always)
//! use_dora = false        # DoRA: a trained magnitude per output row (lora_magnitude_vector)
//! rank_pattern = { v_proj = 2 }      # per-module rank / alpha (PEFT's keys)
//! alpha_pattern = { v_proj = 4 }
//! loraplus_lr_ratio = 16  # LoRA+: B matrices learn 16x faster (not saved in the adapter)
//! init_lora_weights = "pissa"  # or true, false, "gaussian", "pissa_niter_4", "olora": PiSSA /
//!                         # OLoRA change the base; adapter/ is saved converted for the original
//!                         # PEFT's names work too: lora_alpha, lora_dropout, target_modules,
//!                         # use_rslora, init_lora_weights (a key and its alias: an error)
//!
//! [ia3]                   # method = "ia3": PEFT's IA3Config keys
//! target_modules = ["k_proj", "v_proj", "down_proj"]   # default: PEFT's for the family
//! feedforward_modules = ["down_proj"]                  # these scale the input, not the output
//!
//! [train]
//! batch_size = 4          # examples per micro-batch (default 4)
//! grad_accum = 1          # micro-batches per optimizer step (default 1)
//! max_steps = 300         # optimizer steps; overrides `epochs` (HF semantics)
//! epochs = 1.0            # used when max_steps is unset (default 1)
//! max_seq_len = 512       # longest example, in tokens (default min(512, model context))
//! lr = 2e-4               # peak learning rate (default 2e-4)
//! lr_schedule = "cosine"  # cosine | linear | constant | inverse_sqrt (default cosine)
//! warmup_steps = 20       # linear warmup from lr/warmup to lr (default 0)
//! min_lr_ratio = 0.0      # decay ends at min_lr_ratio * lr (default 0)
//! weight_decay = 0.0      # decoupled, as torch.optim.AdamW (default 0)
//! betas = [0.9, 0.999]    # AdamW betas
//! eps = 1e-8              # AdamW epsilon
//! max_grad_norm = 1.0     # clip the global gradient norm; 0 disables (default 1.0)
//! optimizer = "adamw"     # adamw | sgd | adafactor | adamw_8bit (default adamw); weight decay
//!                         # skips biases and norm weights (HF Trainer's rule)
//! sgd = { momentum = 0.9, dampening = 0.0, nesterov = false }      # torch.optim.SGD
//! adafactor = { scale_parameter = false, relative_step = false, warmup_init = false,
//!               clip_threshold = 1.0, decay_rate = -0.8, beta1 = 0.9, eps = [1e-30, 1e-3] }
//! adamw_8bit = { min_8bit_size = 4096 }   # bitsandbytes AdamW8bit (betas, eps: as AdamW)
//! max_shard_size = "5GB"  # full / selective: model/ weights above it are sharded (transformers')
//! eval_every = 50         # validation every N steps (default: only before and after training)
//! eval_batches = 10       # validation batches per evaluation (default 10; 0 = all)
//! early_stopping_patience = 3   # stop after N evaluations without a better val loss
//! save_every = 100        # checkpoint every N steps (a checkpoint is always written at the end)
//! keep_checkpoints = 3    # keep only the newest N checkpoints (default: all)
//! log_every = 10          # plain log line every N steps when stderr is not a terminal (default 10)
//! seed = 42               # LoRA init, dropout, data order (default 42; [data] seed defaults to it)
//! threads = 2             # worker threads (default: all cores)
//! dequantize = false      # dequantize a quantized (GGUF) base to f32 at load
//! base_quant = "nf4"      # quantize the frozen base's linears at load (QLoRA): nf4 | fp4 |
//!                         # int8 | q8_0 | q4_0 | q4_1 | none (default none); PEFT methods only
//! double_quant = true     # nf4/fp4: 8-bit quantized absmax, as QLoRA (default true)
//! device = "cpu"          # cpu or cuda[:N]
//! stop_after = 150        # stop (with a checkpoint) after this step; resume continues the run
//! model_dropout = true    # the model's own dropout (T5 dropout_rate, BERT hidden/attention)
//! ```
//!
//! Relative paths in the file (`model`, `output_dir`, data files) are relative to the file's
//! folder; relative paths given with `--set` are relative to the current directory.
use crate::data::DataConfig;
use crate::peft::ia3::Ia3Config;
use crate::peft::lora::{LoraConfig, ModuleSpec};
use crate::peft::prompt_learning::config::{
    PTuningSection, PrefixTuningSection, PromptTuningSection,
};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// `--model` spec: a GGUF file, an HF folder or `hf:org/name[@revision]`.
    pub model: String,
    /// Fine-tuning method.
    #[serde(default)]
    pub method: Method,
    /// What the run teaches the model; `None`: the model's default task (checked against the
    /// model once it is loaded).
    #[serde(default)]
    pub task: Option<crate::model::Task>,
    /// Supervised pairs (`sft`) or a pre-training objective on raw text.
    #[serde(default)]
    pub objective: Objective,
    /// Where checkpoints, metrics, the plot, the final adapter and the summary go.
    pub output_dir: PathBuf,
    /// `[data]`: required unless `[[tasks]]` give the data (then it holds the shared settings).
    #[serde(default)]
    pub data: DataConfig,
    /// `[[tasks]]`: the tasks of a multi-task run. [`parse_config`] copies them into
    /// `data.tasks`, where the data loader reads them.
    #[serde(default, deserialize_with = "crate::data::config::non_empty_list")]
    pub tasks: Vec<crate::data::TaskConfig>,
    #[serde(default)]
    pub lora: LoraSection,
    /// `[ia3]`: PEFT's IA3Config keys for `method = "ia3"`.
    #[serde(default)]
    pub ia3: Ia3Section,
    /// `[selective]`: the modules `method = "selective"` trains (everything else frozen).
    #[serde(default)]
    pub selective: Option<SelectiveSection>,
    /// `[adapter]`: the bottleneck adapters of `method = "adapter"`.
    #[serde(default)]
    pub adapter: Option<AdapterSection>,
    /// `[prompt_tuning]`, `[prefix_tuning]`, `[p_tuning]`: PEFT's config keys of the soft prompt
    /// methods.
    #[serde(default)]
    pub prompt_tuning: Option<PromptTuningSection>,
    #[serde(default)]
    pub prefix_tuning: Option<PrefixTuningSection>,
    #[serde(default)]
    pub p_tuning: Option<PTuningSection>,
    #[serde(default)]
    pub train: TrainSection,
    /// `[eval]`: benchmark tasks run on the base and on the result (the forgetting report).
    #[serde(default)]
    pub eval: Option<super::bench_eval::EvalSection>,
}

/// `[adapter]`: bottleneck adapters (`method = "adapter"`); the keys of the adapter's
/// `adapter_config.json` (see `peft::bottleneck::BottleneckConfig`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// `houlsby` (after attention and feed-forward blocks) or `pfeiffer` (after feed-forward).
    #[serde(default)]
    pub adapter_type: crate::peft::bottleneck::AdapterType,
    /// hidden / bottleneck width; default 16.
    pub reduction_factor: Option<f64>,
    /// `relu`, `gelu`, `swish` (= `silu`), `tanh`; default swish (Houlsby) / relu (Pfeiffer).
    pub non_linearity: Option<crate::peft::bottleneck::Activation>,
    /// Output projections to wrap instead of the family's defaults.
    pub target_modules: Option<Vec<String>>,
    /// Modules trained in full next to the adapters (a classifier is added for classifiers).
    pub modules_to_save: Option<Vec<String>>,
}

impl AdapterSection {
    /// The adapter config this section stands for (what `adapter_config.json` will hold).
    pub fn to_config(&self, base_model: &str) -> crate::peft::bottleneck::BottleneckConfig {
        let d = crate::peft::bottleneck::BottleneckConfig::default();
        crate::peft::bottleneck::BottleneckConfig {
            base_model_name_or_path: Some(base_model.to_string()),
            adapter_type: self.adapter_type,
            reduction_factor: self.reduction_factor.unwrap_or(d.reduction_factor),
            non_linearity: self.non_linearity,
            target_modules: self.target_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            ..d
        }
    }
}

impl TrainConfig {
    /// The PEFT config of a soft prompt method (`None` for the other methods, or when its
    /// section is missing: [`validate`] refuses that).
    pub fn prompt_config(&self) -> Option<crate::peft::prompt_learning::PromptLearningConfig> {
        match self.method {
            Method::PromptTuning => self.prompt_tuning.as_ref().map(|s| s.to_peft(&self.model)),
            Method::PrefixTuning => self.prefix_tuning.as_ref().map(|s| s.to_peft(&self.model)),
            Method::PTuning => self.p_tuning.as_ref().map(|s| s.to_peft(&self.model)),
            _ => None,
        }
    }
}

/// `[selective]`: train the base parameters the rules select and freeze the rest: `modules`
/// (whole modules by name, e.g. only a classification head on a frozen encoder:
/// `modules = ["classifier", "bert.pooler"]`), `regex` (parameter names), `layers` (`"0-3"` or
/// `[0, 1]`), `bitfit = true` (biases only). See `peft::selective`.
pub type SelectiveSection = crate::peft::selective::SelectiveConfig;

/// Fine-tuning methods. Each has its own config section; only that section may be present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Lora,
    /// Full fine-tuning: every weight trainable (f32 master weights); saved as an HF folder.
    Full,
    /// Whole modules named in `[selective]` trainable, the rest frozen.
    Selective,
    /// Bottleneck adapters (Houlsby / Pfeiffer), `[adapter]`.
    Adapter,
    /// IA3 (PEFT `IA3`): learned vectors rescaling keys, values and the feed-forward input.
    Ia3,
    /// PEFT's PROMPT_TUNING: trained virtual-token embeddings (`[prompt_tuning]`).
    #[serde(rename = "prompt_tuning")]
    PromptTuning,
    /// PEFT's PREFIX_TUNING: per-layer key/value prefixes (`[prefix_tuning]`).
    #[serde(rename = "prefix_tuning")]
    PrefixTuning,
    /// PEFT's P_TUNING: virtual tokens from an MLP prompt encoder (`[p_tuning]`).
    #[serde(rename = "p_tuning")]
    PTuning,
}

impl Method {
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Full => "full",
            Method::Selective => "selective",
            Method::Adapter => "adapter",
            Method::Ia3 => "ia3",
            Method::PromptTuning => "prompt_tuning",
            Method::PrefixTuning => "prefix_tuning",
            Method::PTuning => "p_tuning",
        }
    }
}

/// `objective = ...`: what the loss is computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Supervised fine-tuning: prompt / completion (or chat) pairs, loss on the completion.
    #[default]
    Sft,
    /// Causal language modelling on raw text (decoders).
    Clm,
    /// Masked language modelling on raw text (encoders).
    Mlm,
    /// T5's span corruption on raw text (encoder-decoders).
    SpanCorruption,
}

impl Objective {
    pub fn as_str(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Clm => "clm",
            Objective::Mlm => "mlm",
            Objective::SpanCorruption => "span_corruption",
        }
    }

    /// The pre-training objective this continues (`None` for `sft`).
    pub fn pretraining(self) -> Option<crate::model::Objective> {
        match self {
            Objective::Sft => None,
            Objective::Clm => Some(crate::model::Objective::Clm),
            Objective::Mlm => Some(crate::model::Objective::Mlm),
            Objective::SpanCorruption => Some(crate::model::Objective::SpanCorruption),
        }
    }

    /// Whether a model can train with it: `sft` any, a pre-training objective only the kind of
    /// model it was made for (`clm` decoders, `mlm` encoders, `span_corruption`
    /// encoder-decoders). The error is one line for the `objective` key.
    pub fn check_fits(self, model: &dyn crate::model::Model) -> std::result::Result<(), String> {
        use crate::model::ArchitectureKind as K;
        let Some(pre) = self.pretraining() else {
            return Ok(());
        };
        let fits = match pre {
            crate::model::Objective::Clm => K::Decoder,
            crate::model::Objective::Mlm => K::Encoder,
            crate::model::Objective::SpanCorruption => K::EncoderDecoder,
        };
        if model.kind() != fits {
            return Err(format!(
                "`{}` is for {fits} models, but the model, {}, was pre-trained with `{}`; use \"sft\" or \"{}\"",
                self.as_str(),
                model.describe(),
                model.pretraining_objective(),
                model.pretraining_objective()
            ));
        }
        Ok(())
    }
}

/// `[lora]`: the hyper-parameters users set; everything else keeps PEFT's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default = "default_r")]
    pub r: usize,
    /// Default: 2 r (scale 2), the common choice.
    pub alpha: Option<f64>,
    #[serde(default)]
    pub dropout: f64,
    /// A list of module names (`q_proj` matches every `*.q_proj`), `"all-linear"`, or one regex
    /// string matched against the whole module name. `None`: PEFT's default for the family
    /// ([`crate::model::Model::default_lora_targets`]).
    #[serde(default)]
    pub targets: Option<ModuleSpec>,
    /// Rank-stabilized LoRA: scale by alpha / sqrt(r).
    #[serde(default)]
    pub rslora: bool,
    /// Modules trained in full next to the adapter (PEFT's `modules_to_save`); a sequence- or
    /// token-classification model always adds its classifier, as PEFT does.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    // PEFT's key names, accepted beside ours (`lora_alpha` = `alpha`, ...); giving both a key
    // and its alias is an error. [`Self::apply_peft_names`] folds them into the fields above.
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    #[serde(default)]
    pub lora_dropout: Option<f64>,
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub use_rslora: Option<bool>,
    /// DoRA: a trained magnitude per output row (PEFT's `use_dora`).
    #[serde(default)]
    pub use_dora: bool,
    /// PEFT's `init_lora_weights`: true, false, "gaussian", "pissa", "pissa_niter_K", "olora" or
    /// "loftq".
    #[serde(default)]
    pub init_lora_weights: Option<crate::peft::lora::InitLoraWeights>,
    /// PEFT's `LoftQConfig` for `init_lora_weights = "loftq"`.
    #[serde(default)]
    pub loftq_config: Option<LoftqSection>,
    /// Per-module ranks and alphas (PEFT's regex / suffix keys).
    #[serde(default)]
    pub rank_pattern: std::collections::BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: std::collections::BTreeMap<String, f64>,
    /// LoRA+ (Hayou et al. 2024): the B matrices learn `loraplus_lr_ratio` times faster (PEFT's
    /// `create_loraplus_optimizer`; an optimizer setting, so not in adapter_config.json).
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
}

fn default_r() -> usize {
    8
}

/// `[lora] loftq_config = { loftq_bits = 4, loftq_iter = 1 }` (PEFT's `LoftQConfig`, its
/// defaults). Checked with the rest of the LoRA config when the adapter is attached.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoftqSection {
    #[serde(default = "default_loftq_bits")]
    pub loftq_bits: u64,
    #[serde(default = "default_loftq_iter")]
    pub loftq_iter: u64,
}

fn default_loftq_bits() -> u64 {
    4
}

fn default_loftq_iter() -> u64 {
    1
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            r: default_r(),
            alpha: None,
            dropout: 0.0,
            targets: None,
            rslora: false,
            modules_to_save: None,
            lora_alpha: None,
            lora_dropout: None,
            target_modules: None,
            use_rslora: None,
            use_dora: false,
            init_lora_weights: None,
            loftq_config: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            loraplus_lr_ratio: None,
        }
    }
}

impl LoraSection {
    /// Fold PEFT's key names into ours; `Err((key, message))` when a key and its alias are
    /// both set.
    pub fn apply_peft_names(&mut self) -> std::result::Result<(), (String, String)> {
        fn both(peft: &str, ours: &str) -> (String, String) {
            (
                format!("lora.{peft}"),
                format!("is PEFT's name for `{ours}`, which is set too; set only one"),
            )
        }
        if let Some(a) = self.lora_alpha.take() {
            if self.alpha.is_some() {
                return Err(both("lora_alpha", "alpha"));
            }
            self.alpha = Some(a);
        }
        if let Some(p) = self.lora_dropout.take() {
            if self.dropout != 0.0 {
                return Err(both("lora_dropout", "dropout"));
            }
            self.dropout = p;
        }
        if let Some(t) = self.target_modules.take() {
            if self.targets.is_some() {
                return Err(both("target_modules", "targets"));
            }
            self.targets = Some(t);
        }
        if let Some(r) = self.use_rslora.take() {
            if self.rslora {
                return Err(both("use_rslora", "rslora"));
            }
            self.rslora = r;
        }
        Ok(())
    }

    /// Whether `init_lora_weights` is `"loftq"`.
    pub fn is_loftq(&self) -> bool {
        self.init_lora_weights
            .as_ref()
            .is_some_and(|w| matches!(w.kind(), Ok(crate::peft::lora::InitKind::Loftq)))
    }

    /// The PEFT config this section stands for (what `adapter_config.json` will hold), with
    /// LLaMA's default targets when none are set ([`Self::to_peft_for`] takes the model's).
    pub fn to_peft(&self, base_model: &str) -> LoraConfig {
        self.to_peft_for(base_model, &["q_proj", "v_proj"])
    }

    /// [`Self::to_peft`] with `default_targets` (the model's) when the section sets none.
    pub fn to_peft_for(&self, base_model: &str, default_targets: &[&str]) -> LoraConfig {
        let targets = self.targets.clone().unwrap_or_else(|| {
            ModuleSpec::List(default_targets.iter().map(|t| t.to_string()).collect())
        });
        LoraConfig {
            r: self.r,
            lora_alpha: self.alpha.unwrap_or(2.0 * self.r as f64),
            lora_dropout: self.dropout,
            target_modules: Some(targets),
            use_rslora: self.rslora,
            use_dora: self.use_dora,
            init_lora_weights: self
                .init_lora_weights
                .clone()
                .unwrap_or(crate::peft::lora::InitLoraWeights::Bool(true)),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            modules_to_save: self.modules_to_save.clone(),
            base_model_name_or_path: Some(base_model.to_string()),
            // PEFT refuses "loftq" without a loftq_config: write its defaults when none is set
            extra: self
                .loftq_config
                .or_else(|| {
                    self.is_loftq().then_some(LoftqSection {
                        loftq_bits: default_loftq_bits(),
                        loftq_iter: default_loftq_iter(),
                    })
                })
                .map(|l| {
                    let v =
                        serde_json::json!({"loftq_bits": l.loftq_bits, "loftq_iter": l.loftq_iter});
                    std::collections::BTreeMap::from([("loftq_config".to_string(), v)])
                })
                .unwrap_or_default(),
            ..LoraConfig::default()
        }
    }
}

/// `[ia3]`: PEFT's `IA3Config` keys, with PEFT's defaults (the family's targets and
/// feed-forward modules when `target_modules` is unset).
///
/// ```toml
/// method = "ia3"
/// [ia3]
/// target_modules = ["k_proj", "v_proj", "down_proj"]   # default: PEFT's for the family
/// feedforward_modules = ["down_proj"]                  # input-scaled; a subset of the targets
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ia3Section {
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub feedforward_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// true (default): vectors start at 1, the adapter a no-op.
    #[serde(default)]
    pub init_ia3_weights: Option<bool>,
}

impl Ia3Section {
    /// The PEFT config this section stands for (family defaults are filled in on attach).
    pub fn to_peft(&self, base_model: &str) -> Ia3Config {
        Ia3Config {
            target_modules: self.target_modules.clone(),
            feedforward_modules: self.feedforward_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            init_ia3_weights: self.init_ia3_weights.unwrap_or(true),
            base_model_name_or_path: Some(base_model.to_string()),
            ..Ia3Config::default()
        }
    }
}

/// Learning-rate schedule after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Cosine,
    Linear,
    Constant,
    InverseSqrt,
}

/// `[train]`: the loop, the optimizer and the schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    pub max_steps: Option<usize>,
    pub epochs: Option<f64>,
    pub max_seq_len: Option<usize>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// `adamw` (default) | `sgd` | `adafactor` | `adamw_8bit` (see `train::optim`).
    #[serde(default)]
    pub optimizer: super::optim::OptimizerKind,
    /// `[train.sgd]`: momentum, dampening, nesterov.
    #[serde(default)]
    pub sgd: super::optim::SgdConfig,
    /// `[train.adafactor]`: transformers' Adafactor keys.
    #[serde(default)]
    pub adafactor: super::optim::AdafactorConfig,
    /// `[train.adamw_8bit]`: min_8bit_size.
    #[serde(default)]
    pub adamw_8bit: super::optim::AdamW8bitConfig,
    /// Full / selective runs: the largest weights file of `model/` (transformers'
    /// `max_shard_size`, default "5GB"); more weights are split into shards with an index.
    pub max_shard_size: Option<String>,
    pub eval_every: Option<usize>,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    pub early_stopping_patience: Option<usize>,
    pub save_every: Option<usize>,
    pub keep_checkpoints: Option<usize>,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub threads: Option<usize>,
    #[serde(default)]
    pub dequantize: bool,
    /// Quantize the frozen base's linear weights at load (`quant::BaseQuant`: nf4, fp4, int8,
    /// q8_0, q4_0, q4_1; "none" or absent: keep them as stored).
    pub base_quant: Option<String>,
    /// Double quantization of the 4-bit formats' absmax (QLoRA's default: on).
    #[serde(default = "yes")]
    pub double_quant: bool,
    /// Hold the frozen dense base weights in this dtype (`f32`, `bf16`, `f16`; default: as
    /// stored). Trainable parameters (the LoRA matrices) stay f32 master copies whatever it is.
    pub dtype: Option<String>,
    /// Recompute each decoder layer's forward pass during backward instead of keeping its
    /// activations (see `train::checkpointing`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// How a quantized base computes input gradients (see `quant::BackwardWeights`).
    #[serde(default)]
    pub quantized_backward: QuantizedBackward,
    /// Bits per activation value in the quantized base's forward kernels while training (8 or
    /// 16; see `quant::ActPrecision`). Inference keeps its own default (16).
    #[serde(default = "default_activation_bits")]
    pub activation_bits: u8,
    /// Refuse to start when the memory estimate exceeds the memory available (default true).
    #[serde(default = "yes")]
    pub memory_check: bool,
    #[serde(default = "default_device")]
    pub device: String,
    /// Stop after this optimizer step (writing a checkpoint) as if interrupted; the schedule
    /// still runs to `max_steps`, so `--resume` continues the same run.
    pub stop_after: Option<usize>,
    /// The model's own dropout while training (T5's `dropout_rate`, BERT's
    /// `hidden_dropout_prob` / `attention_probs_dropout_prob` / `classifier_dropout`), as
    /// transformers applies it in train mode; `false` trains without it (LoRA's dropout is
    /// `[lora] dropout`). Families without dropout ignore it.
    #[serde(default = "yes")]
    pub model_dropout: bool,
    /// Training across processes (`train::distributed`, `train::zero`, `train::zero3`): `none`
    /// (default), `ddp`, `zero1` (optimizer state sharded), `zero2` (and gradients) or `zero3`
    /// (and the parameters; LLaMA family); run under `mpirun` / `srun` / `ferrotune launch`
    /// (the `mpi` feature).
    #[serde(default)]
    pub distributed: Distributed,
    /// A collective that waits this long for the other ranks (a rank died or hangs) ends the
    /// job with an error naming the rank (`dist`'s watchdog).
    #[serde(default = "default_dist_timeout_s")]
    pub dist_timeout_s: u64,
    /// The collectives of a multi-rank job: `auto` (NCCL for a run on GPUs when built with the
    /// `nccl` feature, or under a torchrun-style launch; MPI otherwise), `mpi` or `nccl`.
    #[serde(default)]
    pub dist_backend: crate::dist::BackendChoice,
    /// DDP, ZeRO-1 and ZeRO-2 on the LLaMA family: send each decoder layer's gradients while
    /// the backward pass goes on through the layers before it (`train::overlap`); ZeRO-3:
    /// gather the next layer and reduce the last on a thread of their own. `true`, `false`, or
    /// `"auto"` (the default; [`OverlapComm::resolve`]): on where the collectives do not need the
    /// cores that train.
    #[serde(default)]
    pub overlap_comm: OverlapComm,
}

/// `[train] overlap_comm`: `true`, `false` or `"auto"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverlapComm {
    /// On for NCCL (the GPU runs the collectives) and for MPI ranks on several machines (a
    /// network carries them) or with a core to spare on this one; off where every core trains:
    /// MPI's shared-memory collectives copy and add on the CPU, and Open MPI progresses them only
    /// inside MPI calls, so the communication thread must run beside the training threads
    /// (measured: DDP and ZeRO-3 on 2 ranks x 1 thread on 2 cores ran 6-13% slower overlapped,
    /// with the same CPU time in the step: the wall time grew).
    #[default]
    Auto,
    On,
    Off,
}

impl OverlapComm {
    /// Whether this rank would overlap, and why when `auto` decided, from the job's back-end,
    /// ranks per machine, threads per rank and cores. Ranks on different machines or bindings
    /// may see different cores: the trainer has them vote, so all overlap or none does.
    pub fn resolve(
        self,
        backend: &str,
        world: usize,
        ranks_here: usize,
        threads: usize,
        cores: usize,
    ) -> (bool, Option<String>) {
        match self {
            OverlapComm::On => (true, None),
            OverlapComm::Off => (false, None),
            OverlapComm::Auto if backend == "nccl" => {
                (true, Some("auto: NCCL runs the collectives on the GPU".into()))
            }
            OverlapComm::Auto if ranks_here < world => (
                true,
                Some("auto: the ranks span several machines".into()),
            ),
            OverlapComm::Auto if ranks_here * threads < cores => (
                true,
                Some(format!(
                    "auto: {} x {} leave a core of {cores} free",
                    count(ranks_here, "rank"),
                    count(threads, "thread")
                )),
            ),
            OverlapComm::Auto => (
                false,
                Some(format!(
                    "auto: {} x {} fill the {cores} cores, and shared-memory collectives would take time from training; true forces it",
                    count(ranks_here, "rank"),
                    count(threads, "thread")
                )),
            ),
        }
    }
}

/// `1 thread`, `2 threads`.
fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

impl<'de> Deserialize<'de> for OverlapComm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Choice;
        impl serde::de::Visitor<'_> for Choice {
            type Value = OverlapComm;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(
                self,
                v: bool,
            ) -> std::result::Result<OverlapComm, E> {
                Ok(if v { OverlapComm::On } else { OverlapComm::Off })
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<OverlapComm, E> {
                match v {
                    "auto" => Ok(OverlapComm::Auto),
                    // At most 40 characters of what was given: the error stays one line.
                    _ => {
                        let shown: String = v.chars().take(40).collect();
                        let more = if shown.len() < v.len() { "..." } else { "" };
                        let given = format!("{shown}{more}");
                        Err(E::invalid_value(serde::de::Unexpected::Str(&given), &self))
                    }
                }
            }
        }
        d.deserialize_any(Choice)
    }
}

/// `[train] distributed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distributed {
    /// One process (a multi-rank launch is refused: N copies would write one folder).
    #[default]
    None,
    /// Data parallel: a full replica per rank, gradients averaged across ranks.
    Ddp,
    /// ZeRO-1: each rank keeps the optimizer state of the parameters it owns.
    Zero1,
    /// ZeRO-2: and receives only its parameters' summed gradients.
    Zero2,
    /// ZeRO-3 / FSDP full shard: and holds only its own weights between uses, each layer's
    /// gathered just before it runs (LLaMA family; see `train::zero3`).
    Zero3,
}

impl Distributed {
    pub fn as_str(self) -> &'static str {
        match self {
            Distributed::None => "none",
            Distributed::Ddp => "ddp",
            Distributed::Zero1 => "zero1",
            Distributed::Zero2 => "zero2",
            Distributed::Zero3 => "zero3",
        }
    }
}

fn default_dist_timeout_s() -> u64 {
    crate::dist::DEFAULT_TIMEOUT.as_secs()
}

/// `[train] quantized_backward`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantizedBackward {
    /// `grad_y @ W` on a transposed Q8_0 copy of each quantized weight with 8-bit gradient
    /// blocks: faster, about 1% relative error in the base's input gradients (2% on AVX2
    /// without VNNI, where the copy is narrowed: `quant::kernels::narrow_q8_backward`).
    #[default]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Dequantize tiles to f32: exact up to f32 rounding.
    Exact,
}

fn default_activation_bits() -> u8 {
    8
}

fn yes() -> bool {
    true
}

fn default_batch_size() -> usize {
    4
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    2e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_eval_batches() -> usize {
    10
}
fn default_log_every() -> usize {
    10
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> String {
    "cpu".into()
}

impl TrainSection {
    /// The optimizer settings of the run: `optimizer` picks one; `betas`, `eps` and
    /// `weight_decay` are shared.
    pub fn optimizer_config(&self) -> super::optim::OptimizerConfig {
        use super::optim::{AdamWConfig, OptimizerConfig};
        let mut c = OptimizerConfig {
            kind: self.optimizer,
            adamw: AdamWConfig {
                betas: self.betas,
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            sgd: self.sgd,
            adafactor: self.adafactor,
            adamw_8bit: self.adamw_8bit,
        };
        c.sgd.weight_decay = self.weight_decay;
        c.adafactor.weight_decay = self.weight_decay;
        c.adamw_8bit.betas = self.betas;
        c.adamw_8bit.eps = self.eps;
        c.adamw_8bit.weight_decay = self.weight_decay;
        c
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        // The serde defaults, in one place: deserializing an empty table.
        toml::Value::Table(toml::Table::new())
            .try_into()
            .expect("every [train] key has a default")
    }
}

/// A parsed config with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TrainConfig,
    /// The config file (for messages).
    pub path: PathBuf,
    /// Folder that relative data paths are resolved against (the config file's folder).
    pub base_dir: PathBuf,
    /// The effective config as TOML (after `--set`), saved next to the run for the record.
    pub effective: toml::Table,
    /// The file's text, to name the line of a key in messages.
    pub text: String,
    /// The `--set` overrides in order, with the dotted key each sets.
    pub overrides: Vec<(String, String)>,
}

impl LoadedConfig {
    pub fn source(&self) -> String {
        self.path.display().to_string()
    }

    /// Where `key` was set, for messages: the last `--set` of it, else the file and the line
    /// (`run.toml: line 12`), else the file.
    pub fn key_source(&self, key: &str) -> String {
        if let Some((_, o)) = self.overrides.iter().rev().find(|(k, _)| k == key) {
            return format!("--set `{}`", shown(o));
        }
        match key_line(&self.text, key) {
            Some(line) => format!("{}: line {line}", self.source()),
            None => self.source(),
        }
    }

    /// A one-line error about the value of `key`, blamed on where it was set.
    pub fn key_error(&self, key: &str, what: impl std::fmt::Display) -> Error {
        Error::key(self.key_source(key), key, what)
    }
}

/// The 1-based line of the dotted `key` in TOML `text` (`[train]` then `lr = ...`, or
/// `train.lr = ...`), if it is there.
pub fn key_line(text: &str, key: &str) -> Option<usize> {
    let unquote = |k: &str| -> String {
        k.split('.')
            .map(|p| p.trim().trim_matches('"').trim_matches('\'').to_string())
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        if l.starts_with('[') {
            let inner = l.trim_start_matches('[');
            if let Some(end) = inner.find(']') {
                table = unquote(&inner[..end]);
            }
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = unquote(k);
            let full = if table.is_empty() {
                k
            } else {
                format!("{table}.{k}")
            };
            if full == key {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The 1-based line of `key` in the `index`-th (0-based) `[[tasks]]` entry of TOML `text`, else
/// the line of that entry's header, if the file has it.
pub fn task_key_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let mut header = None;
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            if header.is_some() {
                // The entry ended without setting the key.
                break;
            }
            let inner: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            if inner.starts_with("[[tasks]]") {
                if seen == index {
                    header = Some(i + 1);
                }
                seen += 1;
            }
            continue;
        }
        if header.is_some() {
            let k = l.split_once('=').map(|(k, _)| k.trim().trim_matches('"'));
            if k == Some(key) {
                return Some(i + 1);
            }
        }
    }
    header
}

/// Read `path`, apply `--set key=value` overrides, check every value. See the module docs.
pub fn load_config(path: &Path, overrides: &[String]) -> Result<LoadedConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let base_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    parse_config(&text, path, &base_dir, overrides)
}

/// [`load_config`] on text already read; `path` is only used in messages.
pub fn parse_config(
    text: &str,
    path: &Path,
    base_dir: &Path,
    overrides: &[String],
) -> Result<LoadedConfig> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let mut from_cli: Vec<String> = Vec::new();
    for o in overrides {
        let key = apply_override(&mut table, o)?;
        from_cli.push(key);
    }
    // Deserialize from the text when nothing was overridden: errors then carry a line number.
    let mut config: TrainConfig = if overrides.is_empty() {
        toml::from_str(text).map_err(|e| toml_error(path, text, &e))?
    } else {
        toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e| override_error(path, text, &e, overrides, &from_cli))?
    };
    // The data order follows the run's seed unless [data] sets its own.
    let data_seed_set = table
        .get("data")
        .and_then(|d| d.as_table())
        .is_some_and(|d| d.contains_key("seed"));
    if !data_seed_set {
        config.data.seed = config.train.seed;
    }
    config.data.tasks = config.tasks.clone();
    let cwd = std::env::current_dir().map_err(|e| Error::msg(format!("current directory: {e}")))?;
    let resolve = |key: &str, p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else if from_cli.iter().any(|k| k == key) {
            normalize(&cwd.join(p))
        } else {
            normalize(&base_dir.join(p))
        }
    };
    if !config.model.starts_with("hf:") {
        config.model = resolve("model", Path::new(&config.model))
            .display()
            .to_string();
    }
    config.output_dir = resolve("output_dir", &config.output_dir);
    // Data paths from --set are made absolute here; the ones from the file stay relative and
    // data::load joins them to base_dir.
    for (key, slot) in [
        ("data.train", &mut config.data.train),
        ("data.validation", &mut config.data.validation),
        ("data.test", &mut config.data.test),
    ] {
        if let Some(p) = slot.as_mut() {
            if from_cli.iter().any(|k| k == key) && p.is_relative() {
                *p = normalize(&cwd.join(&*p));
            }
        }
    }
    let mut loaded = LoadedConfig {
        config,
        path: path.to_path_buf(),
        base_dir: base_dir.to_path_buf(),
        effective: table,
        text: text.to_string(),
        overrides: from_cli
            .into_iter()
            .zip(overrides.iter().cloned())
            .collect(),
    };
    if let Err((key, what)) = loaded.config.lora.apply_peft_names() {
        return Err(loaded.key_error(&key, what));
    }
    // A bad value is blamed on where it was set: its `--set`, else the file and the line.
    validate(&loaded)?;
    Ok(loaded)
}

/// Drop `.` and fold `dir/..` without touching the file system (so `examples/x/../../runs`
/// prints as `runs`). A leading `..` stays.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) => {}
                _ => out.push(c),
            },
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// Set `key=value` (dotted key, TOML-typed value; a value that is not valid TOML is taken as a
/// string, so `--set data.train=../x.jsonl` needs no quotes). Returns the key.
pub fn apply_override(table: &mut toml::Table, o: &str) -> Result<String> {
    let (key, value) = o
        .split_once('=')
        .ok_or_else(|| Error::msg(format!("--set `{}`: expected key=value", shown(o))))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::msg(format!(
            "--set `{}`: empty key part in `{}`",
            shown(o),
            shown(key)
        )));
    }
    let value = parse_value(value.trim());
    let mut t = table;
    for (i, p) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| {
            Error::msg(format!(
                "--set `{}`: `{}` is not a table",
                shown(o),
                shown(&parts[..=i].join("."))
            ))
        })?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(parts.join("."))
}

/// `s` for a one-line message (see [`crate::error::clipped`]).
fn shown(s: &str) -> String {
    crate::error::clipped(s)
}

/// `msg` with every `"..."` and `` `...` `` span passed through [`shown`] (serde quotes the
/// offending value or key in full).
fn clip_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(512));
    let mut rest = msg;
    while let Some(i) = rest.find(['"', '`']) {
        let q = rest[i..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=i]);
        rest = &rest[i + 1..];
        // the closing quote: the next one not escaped by a backslash (serde escapes the value)
        let mut esc = false;
        let close = rest.char_indices().find_map(|(j, c)| {
            let hit = c == q && !esc;
            esc = c == '\\' && !esc;
            hit.then_some(j)
        });
        match close {
            Some(j) => {
                out.push_str(&shown(&rest[..j]));
                out.push(q);
                rest = &rest[j + 1..];
            }
            None => break,
        }
    }
    out.push_str(&shown_tail(rest));
    out
}

/// The unquoted remainder of a message: control characters escaped, at most 200 characters
/// (a value with quotes of its own can leave part of itself outside the pairs).
fn shown_tail(s: &str) -> String {
    s.chars()
        .take(200)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn parse_value(s: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {s}")) {
        Ok(mut t) => t.remove("v").expect("just parsed"),
        Err(_) => toml::Value::String(s.to_string()),
    }
}

/// One line: `file: line L, column C: message` (or `file: message in `section``).
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> Error {
    Error::file(path, toml_message(text, e))
}

/// [`toml_error`] without the file: `line L, column C: message`, or `message (in [table])`.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e
        .message()
        .trim()
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
        // toml's words for a number or boolean where a name (`method = "lora"`) belongs
        .replace(
            "invalid type: unit variant, expected string only",
            "expected a name in quotes (a string), found a value of another type",
        )
        .replace(
            "wanted string or table",
            "expected a name in quotes (a string), found a value of another type",
        );
    match e.span() {
        Some(span) if !text.is_empty() => {
            let mut start = span.start.min(text.len());
            // A missing key is reported over its whole table, from the blank line before the
            // header: point at the header, so the table named is the one missing the key.
            if msg.starts_with("missing key") {
                let spanned = &text[start..span.end.clamp(start, text.len())];
                let skip = spanned.len() - spanned.trim_start().len();
                if spanned.trim_start().starts_with('[') {
                    start += skip;
                }
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            // The table the line at `start` is in (that line may be the table's header).
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            let section = section_at(&text[..line_end]);
            // A bad value: name its key too (an unknown key is already named).
            let key = text
                .lines()
                .nth(line - 1)
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim().trim_matches('"'))
                .filter(|k| !k.is_empty() && !k.starts_with('[') && !msg.starts_with("unknown key"))
                .map(|k| match &section {
                    Some(s) => format!("key `{s}.{k}`: "),
                    None => format!("key `{k}`: "),
                })
                .unwrap_or_default();
            let within = section.map(|s| format!(" (in [{s}])")).unwrap_or_default();
            format!("line {line}, column {col}{within}: {key}{msg}")
        }
        _ => {
            // The key path is only in Display ("...\nin `train`"); keep it, on one line.
            let full = e.to_string();
            let within = full
                .lines()
                .find_map(|l| l.strip_prefix("in `"))
                .map(|k| {
                    let k = k.trim_end_matches('`');
                    // An unknown key is reported at its table, other errors at the value.
                    if msg.starts_with("unknown key") {
                        format!(" (in [{k}])")
                    } else {
                        format!(" (at `{k}`)")
                    }
                })
                .unwrap_or_default();
            format!("{msg}{within}")
        }
    }
}

/// An error of the config with `--set` overrides applied, blamed on what caused it: the
/// `--set` whose key it is about, else the file, with the line number that deserializing the
/// file alone gives for the same error (the merged table has no spans).
fn override_error(
    path: &Path,
    text: &str,
    e: &toml::de::Error,
    overrides: &[String],
    keys: &[String],
) -> Error {
    if let Some(at) = error_key(e) {
        // `--set a.b=..` causes errors at `a.b` and below, and the unknown key `a` when no table
        // `a` exists. (A missing key is reported at its table, which a `--set` below it does
        // not cause.) The last `--set` of a key is the one in force.
        // A `--set a.b.c=..` also turns a value `a.b` into a table ("invalid type: map").
        let below = e.message().starts_with("unknown field")
            || e.message().starts_with("invalid type: map");
        let hit = keys.iter().rposition(|k| {
            *k == at
                || at.starts_with(&format!("{k}."))
                || (below && k.starts_with(&format!("{at}.")))
        });
        if let Some(i) = hit {
            return Error::msg(format!(
                "--set `{}`: {}",
                shown(&overrides[i]),
                clip_quoted(&toml_message("", e))
            ));
        }
    }
    match toml::from_str::<TrainConfig>(text) {
        Err(alone) if alone.message() == e.message() => toml_error(path, text, &alone),
        _ => toml_error(path, "", e),
    }
}

/// The dotted key a span-less error is about: the value's key, or for an unknown key the key
/// itself (its table is in Display's "in `table`" line; top-level keys have none).
fn error_key(e: &toml::de::Error) -> Option<String> {
    let full = e.to_string();
    let table = full
        .lines()
        .find_map(|l| l.strip_prefix("in `"))
        .map(|k| k.trim_end_matches('`').to_string());
    let unknown = e
        .message()
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next());
    match (table, unknown) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (t, None) => t,
    }
}

/// The `[section]` header in force at the end of `before`, if any.
fn section_at(before: &str) -> Option<String> {
    before.lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']'))
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    })
}

/// Largest micro-batch, in rows: far beyond any machine's memory, small enough that sizes
/// computed from it cannot overflow.
pub const MAX_BATCH_SIZE: usize = 1 << 24;
/// Largest number of micro-batches per optimizer step.
pub const MAX_GRAD_ACCUM: usize = 1 << 20;
/// Largest example length, in tokens (no model has a context this long).
pub const MAX_SEQ_LEN: usize = 1 << 24;
/// Largest number of epochs.
pub const MAX_EPOCHS: f64 = 1e6;
/// Largest LoRA rank.
pub const MAX_LORA_R: usize = 1 << 16;
/// Most worker threads.
pub const MAX_THREADS: usize = 4096;

fn validate(c: &LoadedConfig) -> Result<()> {
    let bad = |key: &str, what: &str| Err(c.key_error(key, what));
    let cfg = &c.config;
    let t = &cfg.train;
    if cfg.model.trim().is_empty() {
        return bad("model", "is empty");
    }
    if cfg.tasks.is_empty() && !c.effective.contains_key("data") {
        return Err(Error::msg(format!(
            "{}: missing [data] section (or [[tasks]]): say what to train on",
            c.source()
        )));
    }
    match cfg.data.task_problem() {
        None => {}
        Some(crate::data::config::TaskProblem {
            task: None,
            key,
            what,
        }) => return bad(&format!("data.{key}"), &what),
        Some(crate::data::config::TaskProblem {
            task: Some(i),
            key,
            what,
        }) => {
            let at = match task_key_line(&c.text, i, key) {
                Some(line) => format!("{}: line {line}", c.source()),
                None => c.source(),
            };
            let task = crate::data::config::task_label(&cfg.tasks, i);
            return Err(Error::key(format!("{at}: {task}"), key, what));
        }
    }
    // The raw value: after resolving, "" would be the config's own folder.
    let raw_out = c.effective.get("output_dir").and_then(|v| v.as_str());
    if raw_out.is_some_and(|o| o.trim().is_empty()) {
        return bad("output_dir", "is empty: name a new folder for the run");
    }
    if cfg.output_dir.parent().is_none() {
        return bad(
            "output_dir",
            "is the root of the file system: name a new folder for the run",
        );
    }
    let double_quant_set = c
        .effective
        .get("train")
        .and_then(|t| t.get("double_quant"))
        .and_then(|v| v.as_bool())
        == Some(true);
    // A config written for QLoRA is often rerun with another base_quant (`--set
    // train.base_quant=int8`): say that its double_quant no longer applies rather than refuse.
    let other_quant = t
        .base_quant
        .as_deref()
        .map(str::to_ascii_lowercase)
        .filter(|b| !matches!(b.as_str(), "nf4" | "fp4" | "none"));
    if let (true, Some(b)) = (double_quant_set, other_quant) {
        tracing::warn!(
            "train.double_quant = true has no effect with train.base_quant = \"{b}\": it applies to the 4-bit formats (nf4, fp4) only"
        );
    }
    if let Some(bq) = &t.base_quant {
        let parsed = crate::quant::BaseQuant::parse(bq, t.double_quant)
            .map_err(|e| c.key_error("train.base_quant", e))?;
        if parsed.is_some() && matches!(cfg.method, Method::Full | Method::Selective) {
            return bad(
                "train.base_quant",
                &format!(
                    "quantizes the frozen base, but method `{}` trains the base's own weights: use a PEFT method (lora, ia3, ...) or base_quant = \"none\"",
                    cfg.method.as_str()
                ),
            );
        }
        if parsed.is_some() && t.dequantize {
            return bad(
                "train.base_quant",
                "and train.dequantize = true contradict each other: choose one",
            );
        }
    }
    if t.batch_size == 0 {
        return bad("train.batch_size", "must be at least 1");
    }
    if t.batch_size > MAX_BATCH_SIZE {
        return bad(
            "train.batch_size",
            &format!("{} is absurd (at most {MAX_BATCH_SIZE})", t.batch_size),
        );
    }
    if t.grad_accum == 0 {
        return bad("train.grad_accum", "must be at least 1");
    }
    if t.grad_accum > MAX_GRAD_ACCUM {
        return bad(
            "train.grad_accum",
            &format!("{} is absurd (at most {MAX_GRAD_ACCUM})", t.grad_accum),
        );
    }
    if t.max_steps == Some(0) {
        return bad("train.max_steps", "must be at least 1");
    }
    if let Some(e) = t.epochs {
        if !(e.is_finite() && e > 0.0) {
            return bad("train.epochs", "must be a positive number");
        }
        if e > MAX_EPOCHS {
            return bad(
                "train.epochs",
                &format!("{e} is absurd (at most {MAX_EPOCHS})"),
            );
        }
    }
    if t.max_seq_len.is_some_and(|n| n < 2) {
        return bad("train.max_seq_len", "must be at least 2");
    }
    if t.max_seq_len.is_some_and(|n| n > MAX_SEQ_LEN) {
        return bad(
            "train.max_seq_len",
            &format!("is absurd (at most {MAX_SEQ_LEN})"),
        );
    }
    if let (Some(a), Some(b)) = (t.max_seq_len, cfg.data.max_seq_len) {
        if a != b {
            return bad(
                "train.max_seq_len",
                &format!("is {a} but [data] max_seq_len is {b}; set only one"),
            );
        }
    }
    if !(t.lr.is_finite() && t.lr > 0.0) {
        return bad("train.lr", "must be a positive number");
    }
    if !(0.0..=1.0).contains(&t.min_lr_ratio) {
        return bad("train.min_lr_ratio", "must be in [0, 1]");
    }

    if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
        return bad("train.weight_decay", "must be >= 0");
    }
    if t.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return bad("train.betas", "each beta must be in [0, 1)");
    }
    if let Some(m) = &t.max_shard_size {
        if let Err(e) = crate::model::convert::parse_size(m) {
            return bad("train.max_shard_size", &e);
        }
    }
    if let Err(e) = t.sgd.validate() {
        return bad("train.sgd", &e);
    }
    if let Err(e) = t.adafactor.validate() {
        return bad("train.adafactor", &e);
    }
    if !(t.eps.is_finite() && t.eps > 0.0) {
        return bad("train.eps", "must be a positive number");
    }
    if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
        return bad("train.max_grad_norm", "must be >= 0 (0 disables clipping)");
    }
    for (k, v) in [
        ("train.eval_every", t.eval_every),
        ("train.save_every", t.save_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.early_stopping_patience", t.early_stopping_patience),
        ("train.threads", t.threads),
        ("train.stop_after", t.stop_after),
    ] {
        if v == Some(0) {
            return bad(k, "must be at least 1 (leave it out to disable)");
        }
    }
    if t.threads.is_some_and(|n| n > MAX_THREADS) {
        return bad(
            "train.threads",
            &format!("is absurd (at most {MAX_THREADS})"),
        );
    }
    if t.log_every == 0 {
        return bad("train.log_every", "must be at least 1");
    }
    if !matches!(t.activation_bits, 8 | 16) {
        return bad(
            "train.activation_bits",
            &format!("{} is not supported: use 8 or 16", t.activation_bits),
        );
    }
    if let Some(d) = t.dtype.as_deref() {
        if !matches!(d, "f32" | "bf16" | "f16") {
            return bad(
                "train.dtype",
                &format!("`{d}` is not one of f32, bf16, f16"),
            );
        }
    }
    let task_validation = cfg.tasks.iter().any(|t| t.validation.is_some());
    if t.early_stopping_patience.is_some()
        && cfg.data.validation.is_none()
        && cfg.data.split.is_none()
        && !task_validation
    {
        return bad(
            "train.early_stopping_patience",
            "needs a validation split ([data] validation or split, or a task's validation)",
        );
    }
    parse_device(&t.device).map_err(|e| c.key_error("train.device", e))?;
    if t.dist_timeout_s == 0 {
        return bad("train.dist_timeout_s", "must be at least 1 (seconds)");
    }
    match cfg.method {
        Method::Lora => {
            let l = &cfg.lora;
            if let Some(a) = l.alpha {
                if !(a.is_finite() && a > 0.0) {
                    return bad("lora.alpha", "must be a positive number");
                }
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad("lora.dropout", "must be in [0, 1)");
            }
            if l.r == 0 {
                return bad("lora.r", "must be at least 1");
            }
            if l.r > MAX_LORA_R {
                return bad(
                    "lora.r",
                    &format!("{} is absurd (at most {MAX_LORA_R})", l.r),
                );
            }
            if let Some(k) = l.loraplus_lr_ratio {
                if !(k.is_finite() && k > 0.0) {
                    return bad("lora.loraplus_lr_ratio", "must be a positive number");
                }
            }
            l.to_peft(&cfg.model)
                .validate(&format!("{}: [lora]", c.source()))
                .map_err(|e| Error::msg(e.to_string()))?;
            // LoftQ re-quantizes the base in the run's own format: its width must agree
            let base = t
                .base_quant
                .as_deref()
                .and_then(|b| crate::quant::BaseQuant::parse(b, t.double_quant).ok().flatten());
            let bits = l.loftq_config.map_or(default_loftq_bits(), |x| x.loftq_bits);
            if let (Some(bq), true) = (base, l.is_loftq()) {
                let want = u64::from(bq.code_bits());
                if bits != want {
                    return bad(
                        "lora.loftq_config",
                        &format!(
                            "loftq_bits = {bits} (PEFT's default 4 when unset) but train.base_quant = \"{}\" is {want}-bit: set loftq_config = {{ loftq_bits = {want} }}",
                            t.base_quant.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
            // as PEFT does (a config is often rerun with another init through --set)
            if l.loftq_config.is_some() && !l.is_loftq() {
                tracing::warn!(
                    "lora.loftq_config has no effect unless lora.init_lora_weights = \"loftq\""
                );
            }
        }
        Method::Full => {}
        Method::Ia3 => cfg
            .ia3
            .to_peft(&cfg.model)
            .validate(&format!("{}: [ia3]", c.source()))
            .map_err(|e| Error::msg(e.to_string()))?,
        Method::Selective => match &cfg.selective {
            None => {
                return bad(
                    "selective",
                    "method = \"selective\" needs a [selective] section with modules = [...], regex = \"...\", layers = \"0-3\" or bitfit = true",
                )
            }
            Some(s) => {
                if let Err((key, what)) = s.validate() {
                    return bad(key, &what);
                }
            }
        },
        Method::Adapter => {
            use crate::peft::PeftMethod;
            cfg.adapter
                .clone()
                .unwrap_or_default()
                .to_config(&cfg.model)
                .validate(&format!("{}: [adapter]", c.source()))
                .map_err(|e| Error::msg(e.to_string()))?;
        }
        Method::PromptTuning | Method::PrefixTuning | Method::PTuning => {
            let section = cfg.method.as_str();
            match cfg.prompt_config() {
                None => {
                    return bad(
                        section,
                        &format!("method = \"{section}\" needs a [{section}] section with num_virtual_tokens = N"),
                    )
                }
                Some(p) => p
                    .validate(&format!("{}: [{section}]", c.source()))
                    .map_err(|e| Error::msg(e.to_string()))?,
            }
        }
    }
    // A config may hold the sections of several methods when `--set method=...` picks one
    // (`ferrotune compare` runs one base config with each method); otherwise a section of
    // another method is a mistake (`[adapter]` with the default method = "lora").
    let method_from_cli = c.overrides.iter().any(|(k, _)| k == "method");
    for (section, present, method) in [
        (
            "prompt_tuning",
            cfg.prompt_tuning.is_some(),
            Method::PromptTuning,
        ),
        (
            "prefix_tuning",
            cfg.prefix_tuning.is_some(),
            Method::PrefixTuning,
        ),
        ("p_tuning", cfg.p_tuning.is_some(), Method::PTuning),
    ] {
        if !method_from_cli && present && cfg.method != method {
            return bad(
                section,
                &format!(
                    "[{section}] is for method = \"{section}\", not \"{}\"",
                    cfg.method.as_str()
                ),
            );
        }
    }
    if !method_from_cli && cfg.method != Method::Adapter && cfg.adapter.is_some() {
        return bad(
            "adapter",
            &format!(
                "[adapter] is for method = \"adapter\", not \"{}\"",
                cfg.method.as_str()
            ),
        );
    }
    if !method_from_cli && cfg.method != Method::Selective && cfg.selective.is_some() {
        return bad(
            "selective",
            &format!(
                "[selective] is for method = \"selective\", not \"{}\"",
                cfg.method.as_str()
            ),
        );
    }
    Ok(())
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        s => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("`{s}`: expected cpu, cuda or cuda:N")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn device(&self) -> Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(*n).map_err(|e| {
                Error::msg(format!(
                    "device cuda:{n}: {}",
                    crate::error::first_line(&e.to_string())
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_comm_is_true_false_or_auto_and_auto_follows_the_cores() {
        let parse = |v: &str| -> std::result::Result<OverlapComm, String> {
            #[derive(Deserialize)]
            struct T {
                #[serde(default)]
                overlap_comm: OverlapComm,
            }
            toml::from_str::<T>(v)
                .map(|t| t.overlap_comm)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("").unwrap(), OverlapComm::Auto);
        assert_eq!(parse("overlap_comm = true").unwrap(), OverlapComm::On);
        assert_eq!(parse("overlap_comm = false").unwrap(), OverlapComm::Off);
        assert_eq!(parse("overlap_comm = \"auto\"").unwrap(), OverlapComm::Auto);
        for bad in ["overlap_comm = \"sometimes\"", "overlap_comm = 3"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("expected true, false or \"auto\""), "{bad}: {e}");
        }
        let auto = OverlapComm::Auto;
        // 2 ranks x 1 thread on 2 cores: every core trains.
        assert!(!auto.resolve("mpi", 2, 2, 1, 2).0);
        assert!(auto.resolve("mpi", 2, 2, 1, 4).0, "a core to spare");
        assert!(auto.resolve("mpi", 4, 2, 1, 2).0, "two machines");
        assert!(auto.resolve("nccl", 2, 2, 8, 2).0);
        assert!(!auto.resolve("mpi", 2, 2, 2, 4).0);
        assert!(OverlapComm::On.resolve("mpi", 2, 2, 1, 2).0);
        assert!(!OverlapComm::Off.resolve("nccl", 2, 2, 1, 2).0);
        assert!(auto
            .resolve("mpi", 2, 2, 1, 2)
            .1
            .unwrap()
            .contains("fill the 2 cores"));
    }

    const MINIMAL: &str = r#"
model = "m.gguf"
output_dir = "out"
[data]
train = "train.jsonl"
template = "Q: {q}\nA:"
completion = " {a}"
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<LoadedConfig> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_config(text, Path::new("cfg/run.toml"), Path::new("cfg"), &o)
    }

    #[test]
    fn defaults_and_path_resolution() {
        let c = parse(MINIMAL, &[]).unwrap();
        let cfg = &c.config;
        assert_eq!(cfg.method, Method::Lora);
        assert_eq!(cfg.model, "cfg/m.gguf");
        assert_eq!(cfg.output_dir, Path::new("cfg/out"));
        assert_eq!(cfg.train.batch_size, 4);
        assert_eq!(cfg.train.seed, 42);
        assert_eq!(cfg.data.seed, 42, "[data] seed follows the run's seed");
        assert_eq!(cfg.train.max_grad_norm, 1.0);
        assert_eq!(cfg.lora.to_peft("m").lora_alpha, 16.0);
        // Data paths from the file stay relative (data::load joins them to base_dir).
        assert_eq!(cfg.data.train.as_deref(), Some(Path::new("train.jsonl")));
    }

    const TASKS: &str = r#"
model = "m.gguf"
output_dir = "out"

[data]
split = [0.9, 0.1]
mixing_rates = "examples_proportional"
mixing_cap = 3000

[[tasks]]
name = "sum"
train = "d.jsonl"
validation = "dev.jsonl"
template = "Summarize: {dialogue}"
completion = " {summary}"
weight = 2.0

[[tasks]]
name = "qa"
train = "q.jsonl"
templates = ["Q: {q}", "Question: {q}"]
completion = " {a}"
"#;

    #[test]
    fn tasks_are_parsed_and_their_errors_name_file_line_task_and_key() {
        let c = parse(TASKS, &[]).unwrap();
        let tasks = &c.config.tasks;
        assert_eq!(tasks.len(), 2);
        assert_eq!(
            c.config.data.tasks, *tasks,
            "copied where the data loader reads them"
        );
        assert_eq!((tasks[0].name.as_str(), tasks[0].weight), ("sum", 2.0));
        assert_eq!(tasks[1].weight, 1.0, "weight defaults to 1");
        assert_eq!(tasks[1].templates.as_ref().map(Vec::len), Some(2));
        // Task paths stay relative, like the [data] ones (data::load joins them to base_dir).
        assert_eq!(tasks[0].validation.as_deref(), Some(Path::new("dev.jsonl")));
        // [[tasks]] without a [data] section: the defaults.
        let no_data = TASKS.replace(
            "[data]\nsplit = [0.9, 0.1]\nmixing_rates = \"examples_proportional\"\nmixing_cap = 3000\n",
            "",
        );
        assert!(!no_data.contains("[data]"));
        let c = parse(&no_data, &[]).unwrap();
        assert_eq!(c.config.data.tasks.len(), 2);
        // Neither [data] nor [[tasks]].
        let e = parse("model = \"m\"\noutput_dir = \"o\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing [data]") && !e.contains('\n'), "{e}");

        // An entry's error: the file, the line of the key in that entry, the task, the key.
        let e = parse(&TASKS.replace("name = \"qa\"", "name = \"sum\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cfg/run.toml: line 19: [[tasks]] #2 (\"sum\"): key `name`:")
                && e.contains("unique"),
            "{e}"
        );
        let e = parse(&TASKS.replace("weight = 2.0", "weight = -1.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cfg/run.toml: line 16: [[tasks]] #1 (\"sum\"): key `weight`:"),
            "{e}"
        );
        let e = parse(&TASKS.replace("weight = 2.0", "weight = nan"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `weight`") && e.contains("NaN"), "{e}");
        let e = parse(&TASKS.replace("name = \"qa\"", "name = \"\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 19") && e.contains("key `name`: is empty"),
            "{e}"
        );
        // A key the entry does not set: the line of the entry's header.
        assert_eq!(task_key_line(TASKS, 1, "weight"), Some(18));
        assert_eq!(task_key_line(TASKS, 1, "name"), Some(19));
        assert_eq!(task_key_line(TASKS, 2, "name"), None);
        // [data] keys that [[tasks]] replace or leave unused: the [data] key, by line.
        for (extra, key) in [
            ("train = \"t.jsonl\"\n", "data.train"),
            ("validation = \"v.jsonl\"\n", "data.validation"),
            ("test = \"t.jsonl\"\n", "data.test"),
            ("[[data.mixture]]\npath = \"m.jsonl\"\n", "data.mixture"),
        ] {
            let text = TASKS.replacen("\n[[tasks]]", &format!("{extra}\n[[tasks]]"), 1);
            let e = parse(&text, &[]).unwrap_err().to_string();
            assert!(e.contains(&format!("key `{key}`")), "{key}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let all_validated = TASKS.replace(
            "completion = \" {a}\"",
            "completion = \" {a}\"\nvalidation = \"qdev.jsonl\"",
        );
        let e = parse(&all_validated, &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("cfg/run.toml: line 6: key `data.split`") && e.contains("split nothing"),
            "{e}"
        );
        // Keys an entry does not have, and a missing name: serde's errors, by line.
        let e = parse(&TASKS.replace("weight = 2.0", "wieght = 2.0"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 16") && e.contains("unknown key `wieght`"),
            "{e}"
        );
        let e = parse(&TASKS.replace("name = \"qa\"\n", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing key `name`"), "{e}");
        // A task's validation is enough for early stopping.
        let c = parse(
            &format!("{no_data}\n[train]\nearly_stopping_patience = 2\n"),
            &[],
        );
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn a_number_where_a_name_belongs_says_so() {
        for o in ["method=5", "method=true"] {
            let e = parse(MINIMAL, &[o]).unwrap_err().to_string();
            assert!(
                e.contains("expected a name in quotes") && !e.contains("unit variant"),
                "{o}: {e}"
            );
        }
        let text = MINIMAL.replacen("model =", "method = 5\nmodel =", 1);
        let e = parse(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("expected a name in quotes") && e.contains("`method`"),
            "{e}"
        );
    }

    #[test]
    fn overrides_are_typed_and_relative_to_the_current_directory() {
        let c = parse(
            MINIMAL,
            &[
                "train.lr=1e-3",
                "train.max_steps = 7",
                "lora.targets=\"all-linear\"",
                "data.train=../x/y.jsonl",
                "train.betas=[0.8, 0.9]",
                "data.seed=5",
                "data.packing=true",
            ],
        )
        .unwrap();
        let cfg = &c.config;
        assert_eq!(cfg.train.lr, 1e-3);
        assert_eq!(cfg.train.max_steps, Some(7));
        assert_eq!(cfg.train.betas, [0.8, 0.9]);
        assert_eq!(cfg.lora.targets, Some(ModuleSpec::One("all-linear".into())));
        assert_eq!(cfg.data.seed, 5);
        assert!(cfg.data.packing, "packing is accepted for training");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            cfg.data.train.as_deref(),
            Some(&*normalize(&cwd.join("../x/y.jsonl")))
        );
        assert_eq!(normalize(Path::new("a/b/../../c/./d")), Path::new("c/d"));
        assert_eq!(normalize(Path::new("../a/..")), Path::new(".."));
        let e = parse(MINIMAL, &["model.x=1"]).unwrap_err().to_string();
        assert!(
            e.contains("--set `model.x=1`: `model` is not a table"),
            "{e}"
        );
        let e = parse(MINIMAL, &["train"]).unwrap_err().to_string();
        assert!(e.contains("expected key=value"), "{e}");
    }

    /// A missing key is blamed on the table that lacks it (serde's span starts before its
    /// header), and a value of the wrong shape says what the key takes.
    #[test]
    fn missing_keys_name_their_table_and_bad_shapes_what_they_take() {
        let text = format!(
            "method = \"prompt_tuning\"\n{MINIMAL}[train]\nlr = 1e-2\n\n[prompt_tuning]\nprompt_tuning_init = \"TEXT\"\n"
        );
        let e = parse(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("(in [prompt_tuning])") && e.contains("missing key `num_virtual_tokens`"),
            "{e}"
        );
        assert!(e.starts_with("cfg/run.toml: line 12,"), "{e}");
        let e = parse(&format!("{MINIMAL}[lora]\ntargets = 5\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.targets")
                && e.contains("a list of module names")
                && !e.contains("untagged"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_one_line_errors_naming_file_key_and_line() {
        let text = format!("{MINIMAL}[train]\nbatch_size = 2\nlr_sched = \"cosine\"\n");
        let e = parse(&text, &[]).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("cfg/run.toml: line 10"), "{e}");
        assert!(
            e.contains("unknown key `lr_sched`") && e.contains("[train]"),
            "{e}"
        );
        // Through --set: no line, but the section is named.
        let e = parse(MINIMAL, &["train.lr_sched=1"])
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("unknown key `lr_sched`") && e.contains("(in [train])"),
            "{e}"
        );
        let e = parse(&format!("{MINIMAL}colour = 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `colour`"), "{e}");
        let e = parse(&format!("{MINIMAL}[lora]\nrank = 4\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key `rank`") && e.contains("[lora]"),
            "{e}"
        );
    }

    #[test]
    fn malformed_missing_and_invalid_values() {
        let e = parse("model = \"x\"\noutput_dir = \n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cfg/run.toml: line 2") && !e.contains('\n'),
            "{e}"
        );
        let e = parse(&MINIMAL.replace("model = \"m.gguf\"\n", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing key `model`"), "{e}");
        let e = parse(&format!("{MINIMAL}[train]\nbatch_size = \"four\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 9") && e.contains("[train]"), "{e}");
        for (set, key) in [
            ("train.batch_size=0", "train.batch_size"),
            ("train.lr=-1", "train.lr"),
            ("data.mixture=[]", "data.mixture"),
            ("tasks=[]", "tasks"),
            ("train.betas=[0.9, 1.0]", "train.betas"),
            ("lora.dropout=1.5", "lora.dropout"),
            ("train.device=\"tpu\"", "train.device"),
            (
                "train.early_stopping_patience=2",
                "train.early_stopping_patience",
            ),
            ("method=\"adalora\"", "method"),
        ] {
            let e = parse(MINIMAL, &[set]).unwrap_err().to_string();
            assert!(e.contains(key.rsplit('.').next().unwrap()), "{set}: {e}");
            assert!(e.starts_with(&format!("--set `{set}`")), "{set}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // A huge or multi-line value or key: one short line that still names the key.
        let long = "x".repeat(5000);
        for set in [
            format!("train.epochs={long}"),
            format!("train.{long}=1"),
            format!("train.lr=\"a\n{long}\""),
            format!("train.epochs.{long}=1"),
            "train.lr=\"a\nb\"".to_string(),
        ] {
            let e = parse(MINIMAL, &[set.as_str()]).unwrap_err().to_string();
            assert!(!e.contains('\n') && !e.contains(&long[..100]), "{e}");
            assert!(e.starts_with("--set `train."), "{e}");
        }
    }

    #[test]
    fn optimizer_keys_and_their_errors() {
        use crate::train::optim::OptimizerKind;
        let c = parse(
            &format!(
                "{MINIMAL}[train]\noptimizer = \"adafactor\"\nweight_decay = 0.1\n[train.adafactor]\nbeta1 = 0.9\nrelative_step = true\n"
            ),
            &[],
        )
        .unwrap();
        let o = c.config.train.optimizer_config();
        assert_eq!(o.kind, OptimizerKind::Adafactor);
        assert_eq!(o.adafactor.beta1, Some(0.9));
        assert!(o.adafactor.relative_step && !o.adafactor.scale_parameter);
        assert_eq!(o.adafactor.weight_decay, 0.1);
        let c = parse(MINIMAL, &["train.optimizer=\"adamw_8bit\""]).unwrap();
        assert_eq!(c.config.train.optimizer, OptimizerKind::AdamW8bit);
        assert_eq!(
            c.config.train.optimizer_config().adamw_8bit.min_8bit_size,
            4096
        );
        for (set, want) in [
            ("train.optimizer=\"lion\"", "optimizer"),
            ("train.sgd.nesterov=true", "nesterov"),
            ("train.sgd.momentum=1.5", "momentum"),
            ("train.adafactor.warmup_init=true", "warmup_init"),
            ("train.adafactor.beta2=0.9", "beta2"),
        ] {
            let e = parse(MINIMAL, &[set]).unwrap_err().to_string();
            assert!(e.contains(want), "{set}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
