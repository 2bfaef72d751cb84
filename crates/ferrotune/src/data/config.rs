//! The `[data]` section of a training config, and [`load`], which turns it into examples.
//!
//! ```toml
//! [data]
//! train = "train.jsonl"             # or mixture = [{path, weight, template?, completion?}, ...]
//! validation = "dev.jsonl"          # optional, as is test; or split = [0.9, 0.1] (or 3 ratios)
//! template = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"  # or templates = [...]
//! completion = " {summary}"
//! # format = "jsonl" | "json" | "csv" | "tsv" | "parquet"     (default: from the extension)
//! # chat = true              render prompt/completion as user/assistant turns of the chat template
//! # messages_field = "messages"   without a template, rows are conversations in this field
//! # length_policy = "truncate_prompt_start" | "drop" | "error"
//! # max_seq_len = 1024, packing = false, seed = 0
//! # mixture_size = 10000, mixing = "interleave" | "sample"
//! # mixing_rates = "weights" | "examples_proportional" | "temperature"
//! #   mixing_cap = 3000 (FLAN's K), mixing_temperature = 2.0
//!
//! # Multi-task instruction tuning: top-level `[[tasks]]` of the train config instead of
//! # `train` / `mixture` ([`TaskConfig`], copied into [`DataConfig::tasks`]); `[data]` keeps the
//! # shared settings (mixing_rates, mixing_cap, mixing_temperature, mixture_size, split, ...).
//! #   [[tasks]]
//! #   name = "sum"                       # required, unique: the task's identity everywhere
//! #   train = "dialogsum.train.jsonl"    # validation = "dev.jsonl" (else its share of `split`)
//! #   template = "..."  (or templates = [...]), completion = "...", weight = 1.0
//!
//! # Other tasks (see [`super::tasks`]): the train config's `task` / `objective` pick how rows
//! # become examples ([`DataTask`]).
//! # sequence_classification: template = "{sentence}", label_field = "label",
//! #                          labels = ["negative", "positive"]   (optional)
//! # token_classification:    tokens_field = "tokens", label_field = "ner_tags", labels = [...]
//! # seq2seq_lm:              template = "...", completion = "...", max_target_len = 128
//! # objective = "clm" | "mlm" | "span_corruption": text = "{text}"
//! #   mlm_probability = 0.15, whole_word_mask = false
//! #   noise_density = 0.15, mean_noise_span_length = 3.0
//! ```
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Deserialize;

use super::objectives::Masking;
pub use super::read::Format;
pub use super::split::{Mixing, MixingRates};
use super::tasks::{self, DataTask};
use super::{
    apply_length_policy, mix, read_rows, split_rows, BatchConfig, Encoder, Example, LabelMap,
    LengthPolicy, LengthStats, Rows, Targets, TemplateSet,
};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

const SECTION: &str = "[data]";
/// The source an error about the `[[tasks]]` array as a whole names.
pub const TASKS: &str = "[[tasks]]";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub train: Option<PathBuf>,
    pub validation: Option<PathBuf>,
    pub test: Option<PathBuf>,
    /// Ratios (train, validation[, test]) to split `train` by, with a seeded shuffle.
    pub split: Option<Vec<f64>>,
    pub format: Option<Format>,
    pub template: Option<String>,
    /// Several prompt templates; each example gets one, picked with `seed` (FLAN style).
    pub templates: Option<Vec<String>>,
    pub completion: Option<String>,
    /// Render the prompt as a user turn and the completion as the assistant's reply through the
    /// model's chat template (for instruct models).
    #[serde(default)]
    pub chat: bool,
    /// Without templates, rows are chat conversations in this field (default `messages`).
    pub messages_field: Option<String>,
    #[serde(default)]
    pub length_policy: LengthPolicy,
    /// Longest example in tokens (default: what the caller passes, e.g. the model's context).
    pub max_seq_len: Option<usize>,
    #[serde(default)]
    pub packing: bool,
    #[serde(default)]
    pub seed: u64,
    #[serde(default, deserialize_with = "non_empty_list")]
    pub mixture: Vec<MixtureEntry>,
    /// Number of training examples a mixture makes (default: all of its datasets' examples).
    pub mixture_size: Option<usize>,
    #[serde(default)]
    pub mixing: Mixing,
    /// How the mixture's shares are set: the weights, examples-proportional (capped at
    /// `mixing_cap`) or temperature-scaled (`mixing_temperature`); each weight multiplies its
    /// dataset's share.
    #[serde(default)]
    pub mixing_rates: MixingRates,
    pub mixing_cap: Option<usize>,
    pub mixing_temperature: Option<f64>,
    /// Raw text for pre-training objectives (`clm`, `mlm`, `span_corruption`): a template such
    /// as `"{text}"`; documents are concatenated and cut into `max_seq_len` chunks.
    pub text: Option<String>,
    /// Classification: the field holding the label (default `label`; token classification:
    /// `labels`), an integer class id or a string.
    pub label_field: Option<String>,
    /// Classification: the class names, class `i` = `labels[i]` (default: integer labels as
    /// they are, string labels in sorted order).
    pub labels: Option<Vec<String>>,
    /// Token classification: the field holding the list of words (default `tokens`).
    pub tokens_field: Option<String>,
    /// Seq2seq: longest target in tokens, EOS included (default `max_seq_len`).
    pub max_target_len: Option<usize>,
    /// MLM: share of non-special tokens selected (default 0.15).
    pub mlm_probability: Option<f64>,
    /// MLM: select whole words (WordPiece `##` pieces join the word before them).
    pub whole_word_mask: Option<bool>,
    /// Span corruption: share of tokens removed (default 0.15).
    pub noise_density: Option<f64>,
    /// Span corruption: mean length of a removed span (default 3).
    pub mean_noise_span_length: Option<f64>,
    /// The tasks of a multi-task run: the train config's top-level `[[tasks]]` (not a `[data]`
    /// key; `train::config` copies them here so that [`load`] sees the whole data description).
    /// When set they replace `train` / `mixture`, and this section's mixing keys apply to them.
    #[serde(skip)]
    pub tasks: Vec<TaskConfig>,
}

/// A list key that, when present, must hold an entry: `mixture = []` (or `tasks = []`) left
/// out every dataset while the run went on with whatever else the section named.
pub(crate) fn non_empty_list<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let v = Vec::<T>::deserialize(d)?;
    if v.is_empty() {
        return Err(serde::de::Error::custom(
            "an empty list: give at least one entry, or leave the key out",
        ));
    }
    Ok(v)
}

/// One dataset of a mixture; unset templates come from the `[data]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureEntry {
    pub path: PathBuf,
    #[serde(default = "one")]
    pub weight: f64,
    pub format: Option<Format>,
    pub template: Option<String>,
    pub templates: Option<Vec<String>>,
    pub completion: Option<String>,
    pub chat: Option<bool>,
    pub messages_field: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// One task of a multi-task run: a top-level `[[tasks]]` entry of the train config. It is a
/// mixture entry with a name: the name is the task's identity in the batch plan's counts
/// (`summary.json` `task_mix`) and in validation (`val_loss_by_task`), so two tasks may read the
/// same file with different templates and stay apart. Unset templates come from `[data]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    /// The task's training rows.
    pub train: PathBuf,
    /// The task's validation rows; without it, the task's share of `[data] split` of `train`.
    pub validation: Option<PathBuf>,
    /// Multiplies the share `[data] mixing_rates` gives the task (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// The format of the task's files (default: from each file's extension, or `[data] format`).
    pub format: Option<Format>,
    pub template: Option<String>,
    /// Several prompt templates; each example gets one, picked with the seed (FLAN style).
    pub templates: Option<Vec<String>>,
    pub completion: Option<String>,
    pub chat: Option<bool>,
    pub messages_field: Option<String>,
}

/// What is wrong with the `[[tasks]]` of a config, found before any file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskProblem {
    /// The entry at fault (0-based), or `None` for a `[data]` key that conflicts with tasks.
    pub task: Option<usize>,
    /// The key (of the entry, or of `[data]`).
    pub key: &'static str,
    pub what: String,
}

/// How errors name task `i`: `[[tasks]] #2 ("qa")` (1-based, as a reader counts the entries).
pub fn task_label(tasks: &[TaskConfig], i: usize) -> String {
    match tasks.get(i) {
        Some(t) if !t.name.trim().is_empty() => format!("{TASKS} #{} ({:?})", i + 1, t.name),
        _ => format!("{TASKS} #{}", i + 1),
    }
}

/// What [`load`] did with one split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitStats {
    pub name: String,
    pub rows: usize,
    pub examples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub length: LengthStats,
}

impl SplitStats {
    fn count(&mut self, examples: &[Example]) {
        self.examples = examples.len();
        self.tokens = examples.iter().map(Example::len).sum();
        self.trained_tokens = examples.iter().map(Example::n_trained).sum();
    }
}

/// The examples of each split, ready for [`super::Batcher`].
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
    /// One entry per split that has data, in the order train, validation, test.
    pub stats: Vec<SplitStats>,
    pub max_seq_len: usize,
    /// What the examples' labels hold (set it in the [`BatchConfig`]: [`Prepared::configure`]).
    pub targets: Targets,
    /// Classification: the class names by id, to record with the trained model.
    pub labels: Option<LabelMap>,
    /// MLM / span corruption: the examples are raw chunks, masked as batches are built.
    pub masking: Option<Masking>,
}

impl Prepared {
    /// Batch settings for these examples: `bc` with their targets and masking.
    pub fn configure(&self, bc: BatchConfig) -> BatchConfig {
        BatchConfig {
            targets: self.targets,
            masking: self.masking.clone(),
            ..bc
        }
    }

    /// The validation examples of each named task (`[[tasks]]`), in the order the tasks first
    /// appear; empty when the examples carry no task names (single-dataset and mixture runs).
    pub fn validation_by_task(&self) -> Vec<(String, Vec<Example>)> {
        group_by_task(&self.validation)
    }

    /// With `[[tasks]]`: one line with each task's training examples (as mixed) and validation
    /// examples, e.g. `tasks (train / validation examples): sum 600 / 50, qa 400 / 25`.
    fn tasks_line(&self) -> Option<String> {
        let train = group_by_task(&self.train);
        if train.is_empty() {
            return None;
        }
        let val = self.validation_by_task();
        let parts: Vec<String> = train
            .iter()
            .map(|(name, exs)| {
                let v = val
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, e)| e.len());
                format!("{name} {} / {v}", exs.len())
            })
            .collect();
        Some(format!(
            "tasks (train / validation examples): {}",
            parts.join(", ")
        ))
    }

    /// One line per split, e.g. `train: 450 rows -> 450 examples, 101234 tokens (20811 trained);
    /// 3 prompts truncated, 0 completions truncated, 0 dropped`.
    pub fn summary(&self) -> String {
        self.stats
            .iter()
            .map(|s| {
                format!(
                    "{}: {} rows -> {} examples, {} tokens ({} trained); {} prompts truncated, {} completions truncated, {} dropped",
                    s.name,
                    s.rows,
                    s.examples,
                    s.tokens,
                    s.trained_tokens,
                    s.length.truncated_prompt,
                    s.length.truncated_completion,
                    s.length.dropped
                )
            })
            .chain(self.labels.iter().map(|l| {
                let names: Vec<String> = l
                    .names
                    .iter()
                    .enumerate()
                    .take(20)
                    .map(|(i, n)| format!("{i} = {n}"))
                    .collect();
                let more = if l.len() > 20 { ", ..." } else { "" };
                format!("classes: {}{more}", names.join(", "))
            }))
            .chain(self.tasks_line())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Examples grouped by their task name, tasks in the order they first appear; empty unless
/// every example has one (a list either comes from `[[tasks]]` or it does not).
fn group_by_task(examples: &[Example]) -> Vec<(String, Vec<Example>)> {
    let mut groups: Vec<(String, Vec<Example>)> = Vec::new();
    for ex in examples {
        let Some(name) = &ex.source.task else {
            return Vec::new();
        };
        match groups.iter_mut().find(|(n, _)| **n == **name) {
            Some((_, g)) => g.push(ex.clone()),
            None => groups.push((name.to_string(), vec![ex.clone()])),
        }
    }
    groups
}

/// The id padding is written with: the tokenizer's pad id, else its first eos id, else 0.
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.pad_id()
        .or_else(|| tok.eos_ids().first().copied())
        .unwrap_or(0)
}

impl DataConfig {
    /// The kind of examples this section makes when the run does not say (`text` set: causal
    /// LM pre-training; otherwise supervised causal LM).
    pub fn default_task(&self) -> DataTask {
        if self.text.is_some() {
            DataTask::Clm
        } else {
            DataTask::CausalSft
        }
    }

    /// Batch settings for training on this data: `packing` and `seed` from the config, padding
    /// with [`pad_id`]. `max_seq_len` should be [`Prepared::max_seq_len`].
    pub fn batch_config(
        &self,
        batch_size: usize,
        max_seq_len: usize,
        tok: &Tokenizer,
    ) -> BatchConfig {
        BatchConfig {
            packing: self.packing,
            seed: self.seed,
            ..BatchConfig::new(batch_size, max_seq_len, pad_id(tok))
        }
    }

    /// The encoder for a dataset, from its own template keys or else the section's.
    fn encoder(
        &self,
        template: &Option<String>,
        templates: &Option<Vec<String>>,
        completion: &Option<String>,
        chat: Option<bool>,
        messages_field: &Option<String>,
        what: &str,
    ) -> Result<Encoder> {
        // A mixture entry inherits the section's prompt templates unless it sets its own or
        // names a `messages_field` (a chat dataset among templated ones); the completion
        // template is inherited on its own.
        let own = template.is_some() || templates.is_some() || messages_field.is_some();
        let (template, templates) = if own {
            (template, templates)
        } else {
            (&self.template, &self.templates)
        };
        let own_completion = completion.is_some();
        let completion = completion.as_ref().or(self.completion.as_ref());
        let prompts: Vec<String> = match (template, templates) {
            (Some(_), Some(_)) => {
                return Err(Error::key(
                    what,
                    "templates",
                    "give either `template` or `templates`, not both",
                ))
            }
            (Some(t), None) => vec![t.clone()],
            (None, Some(ts)) if ts.is_empty() => {
                return Err(Error::key(what, "templates", "the list is empty"))
            }
            (None, Some(ts)) => ts.clone(),
            (None, None) => {
                if own_completion {
                    return Err(Error::key(
                        what,
                        "completion",
                        "needs a prompt `template` (or `templates`)",
                    ));
                }
                return Ok(Encoder::Chat {
                    field: messages_field
                        .clone()
                        .or_else(|| self.messages_field.clone())
                        .unwrap_or_else(|| "messages".into()),
                });
            }
        };
        let completion = completion.ok_or_else(|| {
            Error::key(
                what,
                "completion",
                "missing: a prompt template needs a completion template (e.g. \" {answer}\")",
            )
        })?;
        // A template that does not parse is named by its key (the message quotes it).
        let key = |i: usize| {
            if template.is_some() {
                "template".to_string()
            } else {
                format!("templates[{i}]")
            }
        };
        for (i, p) in prompts.iter().enumerate() {
            super::template::PromptTemplate::parse(p).map_err(|e| Error::key(what, key(i), e))?;
        }
        super::template::PromptTemplate::parse(completion)
            .map_err(|e| Error::key(what, "completion", e))?;
        Ok(Encoder::Pair {
            templates: TemplateSet::new(&prompts, completion, self.seed)?,
            chat: chat.unwrap_or(self.chat),
        })
    }

    /// The first problem with the `[[tasks]]` (none when there are no tasks): a `[data]` key
    /// that tasks replace (`train`, `mixture`, `validation`, `test`) or that they leave unused
    /// (`split` when every task has its own validation file), an empty, unprintable or repeated
    /// name, a weight that is not a positive finite number.
    pub fn task_problem(&self) -> Option<TaskProblem> {
        if self.tasks.is_empty() {
            return None;
        }
        let data = |key, what: &str| {
            Some(TaskProblem {
                task: None,
                key,
                what: what.to_string(),
            })
        };
        if self.train.is_some() {
            return data(
                "train",
                "not used with [[tasks]]: each task names its own `train` file",
            );
        }
        if !self.mixture.is_empty() {
            return data(
                "mixture",
                "give either [[data.mixture]] or [[tasks]], not both (a task is a named mixture entry)",
            );
        }
        if self.validation.is_some() {
            return data(
                "validation",
                "not used with [[tasks]]: give each task its own `validation` file (or set `split`)",
            );
        }
        if self.test.is_some() {
            return data(
                "test",
                "not used with [[tasks]] (split = [train, validation, test] ratios cut each task's file)",
            );
        }
        if self.split.is_some() && self.tasks.iter().all(|t| t.validation.is_some()) {
            return data(
                "split",
                "every task has its own `validation` file, so the ratios would split nothing",
            );
        }
        for (i, t) in self.tasks.iter().enumerate() {
            let bad = |key, what: String| {
                Some(TaskProblem {
                    task: Some(i),
                    key,
                    what,
                })
            };
            if t.name.trim().is_empty() {
                return bad(
                    "name",
                    "is empty: name the task (e.g. \"summarize\")".into(),
                );
            }
            // Names go into one-line errors, the progress line and JSON keys.
            if t.name.chars().any(char::is_control) {
                return bad("name", format!("{:?} has control characters", t.name));
            }
            if let Some(j) = self.tasks[..i].iter().position(|o| o.name == t.name) {
                return bad(
                    "name",
                    format!(
                        "{:?} is also the name of task #{}: task names must be unique",
                        t.name,
                        j + 1
                    ),
                );
            }
            // Written so that NaN fails.
            if !(t.weight > 0.0 && t.weight.is_finite()) {
                return bad(
                    "weight",
                    format!("must be a positive finite number, got {}", t.weight),
                );
            }
        }
        None
    }

    /// [`Self::task_problem`] as an error naming `[data]` and its key, or the task and its key.
    pub fn check_tasks(&self) -> Result<()> {
        match self.task_problem() {
            None => Ok(()),
            Some(TaskProblem {
                task: None,
                key,
                what,
            }) => Err(Error::key(SECTION, key, what)),
            Some(TaskProblem {
                task: Some(i),
                key,
                what,
            }) => Err(Error::key(task_label(&self.tasks, i), key, what)),
        }
    }

    fn main_encoder(&self) -> Result<Encoder> {
        self.encoder(
            &self.template,
            &self.templates,
            &self.completion,
            None,
            &None,
            SECTION,
        )
    }
}

/// Read, render, tokenize, length-check, split and mix what `cfg` describes, as causal LM
/// examples (supervised, or `clm` pre-training when `text` is set). Relative paths are
/// relative to `base_dir` (the config file's folder); `max_seq_len` is used when the config
/// sets none.
pub fn load(
    cfg: &DataConfig,
    base_dir: &Path,
    tok: &Tokenizer,
    max_seq_len: usize,
) -> Result<Prepared> {
    load_task(cfg, base_dir, tok, max_seq_len, cfg.default_task())
}

/// [`load`] for any kind of examples (the run's `task` and `objective`: [`DataTask::new`]).
pub fn load_task(
    cfg: &DataConfig,
    base_dir: &Path,
    tok: &Tokenizer,
    max_seq_len: usize,
    kind: DataTask,
) -> Result<Prepared> {
    let max_len = cfg.max_seq_len.unwrap_or(max_seq_len);
    if max_len < 2 {
        return Err(Error::key(SECTION, "max_seq_len", "must be at least 2"));
    }
    tasks::check_keys(cfg, kind)?;
    if !cfg.tasks.is_empty() && kind != DataTask::CausalSft {
        return Err(Error::key(
            TASKS,
            "tasks",
            format!(
                "multi-task runs are for causal LM instruction data (objective = \"sft\" on a decoder), not {} data",
                kind.name()
            ),
        ));
    }
    cfg.check_tasks()?;
    if kind != DataTask::CausalSft {
        let (train, validation, test) = split_files(cfg, base_dir)?;
        return tasks::load(cfg, tok, max_len, kind, train, validation, test);
    }
    let path = |p: &Path| base_dir.join(p);
    let read = |p: &Path, format: Option<Format>| read_rows(&path(p), format.or(cfg.format));
    let encode = |rows: &Rows, enc: &Encoder, stats: &mut SplitStats| -> Result<Vec<Example>> {
        stats.rows += rows.rows.len();
        // Tokenizing is most of the time (DialogSum train+dev, 13k dialogues: 15 s sequential,
        // 4.5 s in parallel on the 2-core dev machine), so
        // rows are encoded in parallel; results are then taken in file order so the first
        // error reported is the first in the file, and the length stats are counted in order.
        let encoded: Vec<Result<Example>> = rows
            .rows
            .par_iter()
            .map(|row| enc.encode(tok, row, rows.source(row)))
            .collect();
        let mut out = Vec::with_capacity(rows.rows.len());
        for ex in encoded {
            if let Some(ex) = apply_length_policy(
                ex?,
                max_len,
                cfg.length_policy,
                tok.bos_id(),
                &mut stats.length,
            )? {
                out.push(ex);
            }
        }
        Ok(out)
    };
    let named = |name: &str| SplitStats {
        name: name.into(),
        ..Default::default()
    };

    let mut prepared = Prepared {
        max_seq_len: max_len,
        ..Default::default()
    };
    let mut train_stats = named("train");
    let mut val_stats = named("validation");
    let mut test_stats = named("test");
    let mut val_rows = Vec::new();
    let mut test_rows = Vec::new();
    // Whether the validation / test splits exist (they may exist and be empty: every example
    // dropped by the length policy).
    let (mut has_val, mut has_test) = (false, false);

    match (&cfg.train, cfg.mixture.is_empty()) {
        _ if !cfg.tasks.is_empty() => {
            let mut datasets = Vec::new();
            let mut weights = Vec::new();
            for (i, task) in cfg.tasks.iter().enumerate() {
                let label = task_label(&cfg.tasks, i);
                let enc = cfg.encoder(
                    &task.template,
                    &task.templates,
                    &task.completion,
                    task.chat,
                    &task.messages_field,
                    &label,
                )?;
                let rows = read(&task.train, task.format)?;
                // Every task is split with the same seed, so two tasks that read the same file
                // get the same cut: no row is trained on by one task and validated on by the
                // other.
                let (train_rows, val, test) = match (&task.validation, &cfg.split) {
                    (Some(v), _) => (rows, Some(read(v, task.format)?), None),
                    (None, Some(ratios)) => {
                        let mut parts = split_rows(&rows, ratios, cfg.seed)?.into_iter();
                        let train = parts
                            .next()
                            .ok_or_else(|| Error::key(SECTION, "split", "gave no training part"))?;
                        (train, parts.next(), parts.next())
                    }
                    (None, None) => (rows, None, None),
                };
                let name: Arc<str> = Arc::from(task.name.as_str());
                let named = |mut exs: Vec<Example>| {
                    for e in &mut exs {
                        e.source.task = Some(name.clone());
                    }
                    exs
                };
                let exs = named(encode(&train_rows, &enc, &mut train_stats)?);
                if exs.is_empty() {
                    return Err(Error::file(
                        &*train_rows.file,
                        format!(
                            "task {:?}: every example was dropped by length_policy = \"drop\" (raise max_seq_len?)",
                            task.name
                        ),
                    ));
                }
                datasets.push((label, exs));
                weights.push(task.weight);
                if let Some(v) = val {
                    has_val = true;
                    let exs = named(encode(&v, &enc, &mut val_stats)?);
                    prepared.validation.extend(exs);
                }
                if let Some(t) = test {
                    has_test = true;
                    let exs = named(encode(&t, &enc, &mut test_stats)?);
                    prepared.test.extend(exs);
                }
            }
            let sizes: Vec<usize> = datasets.iter().map(|(_, e)| e.len()).collect();
            let rates = super::split::mixture_rates(
                &sizes,
                &weights,
                cfg.mixing_rates,
                cfg.mixing_cap,
                cfg.mixing_temperature,
            )?;
            prepared.train = mix(&datasets, &rates, cfg.mixture_size, cfg.mixing, cfg.seed)?;
        }
        (Some(_), false) => {
            return Err(Error::key(
                SECTION,
                "mixture",
                "give either `train` or `mixture` (add the train file to the mixture)",
            ))
        }
        (None, true) => {
            return Err(Error::key(
                SECTION,
                "train",
                "missing: set `train` (a file) or `mixture`",
            ))
        }
        (Some(train), true) => {
            no_mixing_keys(cfg)?;
            let enc = cfg.main_encoder()?;
            let rows = read(train, None)?;
            let train_rows = match &cfg.split {
                None => rows,
                Some(ratios) => {
                    if cfg.validation.is_some() || cfg.test.is_some() {
                        return Err(Error::key(
                            SECTION,
                            "split",
                            "give either `split` or `validation`/`test` files, not both",
                        ));
                    }
                    let mut parts = split_rows(&rows, ratios, cfg.seed)?.into_iter();
                    let train = parts
                        .next()
                        .ok_or_else(|| Error::key(SECTION, "split", "gave no training part"))?;
                    val_rows.extend(parts.next());
                    test_rows.extend(parts.next());
                    train
                }
            };
            prepared.train = encode(&train_rows, &enc, &mut train_stats)?;
            if prepared.train.is_empty() {
                return Err(Error::file(
                    &*train_rows.file,
                    "every example was dropped by length_policy = \"drop\" (raise max_seq_len?)",
                ));
            }
        }
        (None, false) => {
            if cfg.split.is_some() {
                return Err(Error::key(
                    SECTION,
                    "split",
                    "splitting a mixture is not supported: give `validation`/`test` files",
                ));
            }
            let mut datasets = Vec::new();
            let mut weights = Vec::new();
            for (i, m) in cfg.mixture.iter().enumerate() {
                let what = format!("{SECTION} mixture[{i}]");
                let enc = cfg.encoder(
                    &m.template,
                    &m.templates,
                    &m.completion,
                    m.chat,
                    &m.messages_field,
                    &what,
                )?;
                let rows = read(&m.path, m.format)?;
                let exs = encode(&rows, &enc, &mut train_stats)?;
                datasets.push((rows.file.display().to_string(), exs));
                weights.push(m.weight);
            }
            let sizes: Vec<usize> = datasets.iter().map(|(_, e)| e.len()).collect();
            let rates = super::split::mixture_rates(
                &sizes,
                &weights,
                cfg.mixing_rates,
                cfg.mixing_cap,
                cfg.mixing_temperature,
            )?;
            prepared.train = mix(&datasets, &rates, cfg.mixture_size, cfg.mixing, cfg.seed)?;
        }
    }
    let enc = || cfg.main_encoder();
    if let Some(v) = &cfg.validation {
        val_rows.push(read(v, None)?);
    }
    if let Some(t) = &cfg.test {
        test_rows.push(read(t, None)?);
    }
    for rows in &val_rows {
        prepared.validation = encode(rows, &enc()?, &mut val_stats)?;
    }
    for rows in &test_rows {
        prepared.test = encode(rows, &enc()?, &mut test_stats)?;
    }
    train_stats.count(&prepared.train);
    val_stats.count(&prepared.validation);
    test_stats.count(&prepared.test);
    prepared.stats.push(train_stats);
    if has_val || !val_rows.is_empty() {
        prepared.stats.push(val_stats);
    }
    if has_test || !test_rows.is_empty() {
        prepared.stats.push(test_stats);
    }
    Ok(prepared)
}

/// A key that only shapes a mixture, set beside a single `train` file, would be ignored: refuse
/// it by name.
fn no_mixing_keys(cfg: &DataConfig) -> Result<()> {
    let set = [
        ("mixture_size", cfg.mixture_size.is_some()),
        ("mixing_rates", cfg.mixing_rates != MixingRates::Weights),
        ("mixing_cap", cfg.mixing_cap.is_some()),
        ("mixing_temperature", cfg.mixing_temperature.is_some()),
    ];
    match set.iter().find(|(_, on)| *on) {
        Some((k, _)) => Err(Error::key(
            SECTION,
            *k,
            "only applies to a `mixture` (this config has one `train` file)",
        )),
        None => Ok(()),
    }
}

/// The rows of each split of a single-file config: `train` (cut by `split` when given), else
/// `validation` / `test` files.
fn split_files(cfg: &DataConfig, base_dir: &Path) -> Result<(Rows, Option<Rows>, Option<Rows>)> {
    if !cfg.mixture.is_empty() {
        return Err(Error::key(
            SECTION,
            "mixture",
            "mixtures are for causal LM supervised data; give a `train` file",
        ));
    }
    no_mixing_keys(cfg)?;
    let train = cfg
        .train
        .as_ref()
        .ok_or_else(|| Error::key(SECTION, "train", "missing: set `train` (a file)"))?;
    let read = |p: &Path| read_rows(&base_dir.join(p), cfg.format);
    let rows = read(train)?;
    match &cfg.split {
        Some(ratios) => {
            if cfg.validation.is_some() || cfg.test.is_some() {
                return Err(Error::key(
                    SECTION,
                    "split",
                    "give either `split` or `validation`/`test` files, not both",
                ));
            }
            let mut parts = split_rows(&rows, ratios, cfg.seed)?.into_iter();
            let train = parts
                .next()
                .ok_or_else(|| Error::key(SECTION, "split", "gave no training part"))?;
            Ok((train, parts.next(), parts.next()))
        }
        None => Ok((
            rows,
            cfg.validation.as_deref().map(read).transpose()?,
            cfg.test.as_deref().map(read).transpose()?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{smollm2, tiny_tokenizer, words, TempDir, TINY_CHAT};
    use crate::data::{preview, BatchConfig, Batcher, IGNORE};
    use serde_json::json;

    fn config(v: serde_json::Value) -> DataConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn unknown_keys_are_one_line_errors_naming_the_key() {
        let e = serde_json::from_value::<DataConfig>(json!({"train": "a.jsonl", "templte": "x"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `templte`"), "{e}");
        assert_eq!(e.lines().count(), 1);
        let e = serde_json::from_value::<DataConfig>(
            json!({"mixture": [{"path": "a.jsonl", "wieght": 2}]}),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `wieght`"), "{e}");
        let e = serde_json::from_value::<DataConfig>(json!({"length_policy": "cut"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `cut`"), "{e}");
    }

    #[test]
    fn pair_dataset_end_to_end_with_split_and_batches() {
        let tok = tiny_tokenizer(None);
        let d = TempDir::new("cfg-pair");
        let lines: Vec<String> = (0..20)
            .map(|i| json!({"q": format!("the cat {i}"), "a": format!("sat {i}")}).to_string())
            .collect();
        d.write("all.jsonl", &lines.join("\n"));
        let cfg = config(json!({
            "train": "all.jsonl", "split": [0.8, 0.2], "seed": 4,
            "template": "question : {q} answer :", "completion": "{a}"
        }));
        let p = load(&cfg, d.dir(), &tok, 64).unwrap();
        assert_eq!(
            (p.train.len(), p.validation.len(), p.test.len()),
            (16, 4, 0)
        );
        let again = load(&cfg, d.dir(), &tok, 64).unwrap();
        assert_eq!(p.validation, again.validation);
        for ex in p.train.iter().chain(&p.validation) {
            let n: usize = match ex.source.loc {
                crate::data::Loc::Line(n) => n - 1,
                other => panic!("{other}"),
            };
            let prompt = words(&tok, &format!("<s> question : the cat {n} answer :"));
            let mut ids = prompt.clone();
            let completion = words(&tok, &format!("sat {n} </s>"));
            ids.extend(&completion);
            assert_eq!(ex.input_ids, ids);
            let mut labels = vec![IGNORE; prompt.len()];
            labels.extend(completion.iter().map(|&i| i as i64));
            assert_eq!(ex.labels, labels);
        }
        assert_eq!(p.stats.len(), 2);
        assert_eq!(p.stats[0].rows, 16);
        assert_eq!(p.stats[0].trained_tokens, 16 * 3);
        assert!(
            p.summary().starts_with("train: 16 rows -> 16 examples"),
            "{}",
            p.summary()
        );
        let mut b = Batcher::new(
            p.train.clone(),
            BatchConfig::new(4, p.max_seq_len, pad_id(&tok)),
            candle_core::Device::Cpu,
        )
        .unwrap();
        let batch = b.next_batch().unwrap();
        assert_eq!(batch.input_ids.dims()[0], 4);
        assert_eq!(batch.n_loss_tokens, 4 * 3);
    }

    #[test]
    fn missing_fields_and_bad_keys_name_file_line_and_field() {
        let tok = tiny_tokenizer(None);
        let d = TempDir::new("cfg-err");
        d.write("t.jsonl", "{\"q\": \"a\", \"a\": \"b\"}\n{\"q\": \"c\"}\n");
        let cfg = config(json!({"train": "t.jsonl", "template": "{q}", "completion": "{a}"}));
        let e = load(&cfg, d.dir(), &tok, 64).unwrap_err().to_string();
        assert!(e.contains("t.jsonl: line 2") && e.contains("`a`"), "{e}");
        assert_eq!(e.lines().count(), 1);
        let cfg = config(json!({"train": "t.jsonl", "template": "{q}"}));
        let e = load(&cfg, d.dir(), &tok, 64).unwrap_err().to_string();
        assert!(e.contains("`completion`"), "{e}");
        let cfg = config(json!({"template": "{q}", "completion": "{a}"}));
        let e = load(&cfg, d.dir(), &tok, 64).unwrap_err().to_string();
        assert!(e.contains("`train`"), "{e}");
        let cfg = config(
            json!({"train": "t.jsonl", "split": [0.5, 0.5], "validation": "t.jsonl",
                                "template": "{q}", "completion": "{a}"}),
        );
        let e = load(&cfg, d.dir(), &tok, 64).unwrap_err().to_string();
        assert!(e.contains("`split`"), "{e}");
    }

    #[test]
    fn chat_csv_and_json_datasets_load() {
        let tok = tiny_tokenizer(Some(TINY_CHAT));
        let d = TempDir::new("cfg-chat");
        d.write(
            "c.json",
            &json!({"data": [{"messages": [
                {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}]})
            .to_string(),
        );
        let p = load(&config(json!({"train": "c.json"})), d.dir(), &tok, 64).unwrap();
        assert_eq!(
            p.train[0].input_ids,
            words(&tok, "<|user|> hello </s> <|assistant|> hi </s>")
        );
        assert_eq!(p.train[0].n_trained(), 2);
        // A prompt/completion CSV through the chat template (`chat = true`).
        d.write("p.csv", "q,a\nthe cat,sat\n");
        let cfg =
            config(json!({"train": "p.csv", "template": "{q}", "completion": "{a}", "chat": true}));
        let p = load(&cfg, d.dir(), &tok, 64).unwrap();
        assert_eq!(
            p.train[0].input_ids,
            words(&tok, "<|user|> the cat </s> <|assistant|> sat </s>")
        );
        assert_eq!(p.train[0].n_trained(), 2);
    }

    #[test]
    fn mixture_weights_and_per_entry_templates() {
        let tok = tiny_tokenizer(None);
        let d = TempDir::new("cfg-mix");
        d.write(
            "a.jsonl",
            &(0..4)
                .map(|i| json!({"x": i}).to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        d.write(
            "b.jsonl",
            &(0..4)
                .map(|i| json!({"y": i}).to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let cfg = config(json!({
            "template": "a {x}", "completion": "b",
            "mixture": [{"path": "a.jsonl", "weight": 1.0},
                        {"path": "b.jsonl", "weight": 3.0, "template": "c {y}"}],
            "mixture_size": 12
        }));
        let p = load(&cfg, d.dir(), &tok, 64).unwrap();
        assert_eq!(p.train.len(), 12);
        let (from_b, from_a): (Vec<&Example>, Vec<&Example>) = p
            .train
            .iter()
            .partition(|e| e.source.file.ends_with("b.jsonl"));
        assert_eq!(from_b.len(), 9);
        // Entry b has its own prompt template and inherits the section's completion.
        let n = |e: &Example| e.input_ids[2] - words(&tok, "0")[0];
        for e in from_b {
            assert_eq!(e.input_ids, words(&tok, &format!("<s> c {} b </s>", n(e))));
        }
        for e in from_a {
            assert_eq!(e.input_ids, words(&tok, &format!("<s> a {} b </s>", n(e))));
        }
        // Examples-proportional: a (4 rows) : b8 (8 rows) is 4 : 8, capped at 4 it is 4 : 4.
        d.write(
            "b8.jsonl",
            &(0..8)
                .map(|i| json!({"y": i}).to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        );
        for (cap, want_b) in [(None, 8), (Some(4), 6)] {
            let cfg = config(json!({
                "template": "a {x}", "completion": "b",
                "mixture": [{"path": "a.jsonl"}, {"path": "b8.jsonl", "template": "c {y}"}],
                "mixing_rates": "examples_proportional", "mixing_cap": cap, "mixture_size": 12
            }));
            let p = load(&cfg, d.dir(), &tok, 64).unwrap();
            let from_b = p
                .train
                .iter()
                .filter(|e| e.source.file.ends_with("b8.jsonl"));
            assert_eq!(from_b.count(), want_b, "cap {cap:?}");
        }
        // A mixing key beside one train file would be ignored: it is refused by name.
        for (k, v) in [
            ("mixing_temperature", json!(2.0)),
            ("mixing_cap", json!(3)),
            ("mixture_size", json!(3)),
        ] {
            let mut c = json!({"train": "a.jsonl", "template": "a {x}", "completion": "b"});
            c[k] = v;
            let e = load(&config(c), d.dir(), &tok, 64).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains("mixture"), "{e}");
        }
        // A chat dataset in a templated mixture, marked by its `messages_field`.
        let chat_tok = tiny_tokenizer(Some(TINY_CHAT));
        d.write(
            "c.jsonl",
            &json!({"turns": [{"role": "user", "content": "hello"},
                              {"role": "assistant", "content": "hi"}]})
            .to_string(),
        );
        let cfg = config(json!({
            "template": "a {x}", "completion": "b",
            "mixture": [{"path": "a.jsonl"}, {"path": "c.jsonl", "messages_field": "turns"}]
        }));
        let p = load(&cfg, d.dir(), &chat_tok, 64).unwrap();
        assert_eq!(p.train.len(), 5);
        let chat: Vec<&Example> = p
            .train
            .iter()
            .filter(|e| e.source.file.ends_with("c.jsonl"))
            .collect();
        assert_eq!(
            chat[0].input_ids,
            words(&chat_tok, "<|user|> hello </s> <|assistant|> hi </s>")
        );
    }

    #[test]
    fn length_policy_from_config() {
        let tok = tiny_tokenizer(None);
        let d = TempDir::new("cfg-len");
        d.write(
            "t.jsonl",
            "{\"q\": \"a b c d e\", \"a\": \"x\"}\n{\"q\": \"a\", \"a\": \"y\"}\n",
        );
        let base =
            json!({"train": "t.jsonl", "template": "{q}", "completion": "{a}", "max_seq_len": 5});
        let mut v = base.clone();
        v["length_policy"] = json!("drop");
        let p = load(&config(v), d.dir(), &tok, 64).unwrap();
        assert_eq!(p.train.len(), 1);
        assert_eq!(p.stats[0].length.dropped, 1);
        let p = load(&config(base.clone()), d.dir(), &tok, 64).unwrap();
        assert_eq!(p.train[0].input_ids, words(&tok, "<s> d e x </s>"));
        assert_eq!(p.stats[0].length.truncated_prompt, 1);
        let mut v = base;
        v["length_policy"] = json!("error");
        let e = load(&config(v), d.dir(), &tok, 64).unwrap_err().to_string();
        assert!(e.contains("t.jsonl: line 1: example is 8 tokens"), "{e}");
    }

    /// $FERROTUNE_DIALOGSUM, else data/dialogsum in $FERROTUNE_SHARED_DIR or in the `../shared`
    /// beside the repository (as on CI).
    fn dialogsum_dir() -> PathBuf {
        let dir = match (
            std::env::var_os("FERROTUNE_DIALOGSUM"),
            std::env::var_os("FERROTUNE_SHARED_DIR"),
        ) {
            (Some(d), _) => PathBuf::from(d),
            (None, Some(shared)) => PathBuf::from(shared).join("data/dialogsum"),
            (None, None) => PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/data/dialogsum"
            )),
        };
        assert!(
            dir.join("dialogsum.dev.jsonl").is_file(),
            "{}: no dialogsum.dev.jsonl (put ../shared beside the repository, or set \
             FERROTUNE_SHARED_DIR or FERROTUNE_DIALOGSUM)",
            dir.display()
        );
        dir
    }

    /// The brief's config on real data: DialogSum dev with SmolLM2's tokenizer. The trained
    /// tokens decode to exactly " " + summary + EOS, the untrained ones to the rendered prompt.
    #[test]
    fn dialogsum_with_smollm2() {
        let tok = smollm2();
        let dir = dialogsum_dir();
        let cfg = config(json!({
            "train": "dialogsum.dev.jsonl", "split": [0.9, 0.1], "seed": 1,
            "template": "Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
            "completion": " {summary}", "max_seq_len": 512
        }));
        let p = load(&cfg, &dir, tok, 2048).unwrap();
        assert_eq!((p.stats[0].rows, p.stats[1].rows), (450, 50));
        let rows = read_rows(&dir.join("dialogsum.dev.jsonl"), None).unwrap();
        let eos = tok.id_to_token(tok.eos_ids()[0]).unwrap();
        let mut checked = 0;
        for ex in p.train.iter().chain(&p.validation) {
            let row = rows.rows.iter().find(|r| r.loc == ex.source.loc).unwrap();
            let field = |k: &str| row.fields[k].as_str().unwrap().to_string();
            let start = ex.completion_start();
            assert!(ex.labels[..start].iter().all(|&l| l == IGNORE));
            assert!(ex.labels[start..]
                .iter()
                .zip(&ex.input_ids[start..])
                .all(|(&l, &i)| l == i as i64));
            let trained = tok.decode(&ex.input_ids[start..], false).unwrap();
            assert_eq!(
                trained,
                format!(" {}{eos}", field("summary")),
                "{}",
                ex.source
            );
            if ex.len() < 512 {
                let bos = if tok.add_bos() {
                    tok.id_to_token(tok.bos_id().unwrap()).unwrap()
                } else {
                    String::new()
                };
                let prompt = tok.decode(&ex.input_ids[..start], false).unwrap();
                assert_eq!(
                    prompt,
                    format!(
                        "{bos}Summarize the following conversation.\n\n{}\n\nSummary:",
                        field("dialogue")
                    )
                );
                checked += 1;
            }
        }
        assert!(checked > 400, "{checked}");
        assert!(p.stats[0].length.truncated_prompt + p.stats[1].length.truncated_prompt > 0);
        // Packing the real examples: every token lands in exactly one row, each example's
        // positions restart at 0, and the loss tokens are the trained ones.
        let mut b = Batcher::new(
            p.train.clone(),
            cfg.batch_config(8, p.max_seq_len, tok).with_packing(),
            candle_core::Device::Cpu,
        )
        .unwrap();
        let (mut tokens, mut loss, mut cells) = (0, 0, 0);
        for _ in 0..b.batches_per_epoch() {
            let batch = b.next_batch().unwrap();
            tokens += batch.n_tokens;
            loss += batch.n_loss_tokens;
            cells += batch.input_ids.elem_count();
            let pos: Vec<Vec<u32>> = batch.position_ids.to_vec2().unwrap();
            let seg: Vec<Vec<u32>> = batch.segment_ids.unwrap().to_vec2().unwrap();
            for (pr, sr) in pos.iter().zip(&seg) {
                for k in 1..pr.len() {
                    if sr[k] != 0 {
                        let same = sr[k] == sr[k - 1];
                        assert_eq!(pr[k], if same { pr[k - 1] + 1 } else { 0 });
                    }
                }
            }
        }
        assert_eq!(
            b.cursor(),
            crate::data::DataCursor {
                epoch: 0,
                index: b.batches_per_epoch()
            }
        );
        assert_eq!(tokens, p.stats[0].tokens);
        assert_eq!(loss, p.stats[0].trained_tokens);
        assert!(
            tokens as f64 / cells as f64 > 0.85,
            "packing fill {tokens}/{cells}"
        );
        let text = preview(&p.train, tok, 1);
        assert!(text.contains("Summary:[[ "), "{text}");

        // The test file has summary1..3, not summary: the error names the file, line and field.
        let cfg = config(
            json!({"train": "dialogsum.test.jsonl", "template": "{dialogue}", "completion": " {summary}"}),
        );
        let e = load(&cfg, &dir, tok, 512).unwrap_err().to_string();
        assert!(
            e.contains("dialogsum.test.jsonl: line 1") && e.contains("`summary`"),
            "{e}"
        );
    }
}
