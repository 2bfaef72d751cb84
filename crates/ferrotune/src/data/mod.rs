//! Instruction data for fine-tuning: read rows, render prompts, tokenize with loss masks, split,
//! mix, batch.
//!
//! The pipeline, one module per step:
//! - [`read`]: JSONL / JSON / CSV / Parquet files to rows (`serde_json::Map`), each with its
//!   file and line (or row) so every later error can name them.
//! - [`template`]: `{field}` templates (via [`crate::icl::Template`]) or Jinja templates, several
//!   per task with one picked per example by a seeded RNG (FLAN style).
//! - [`tokenize`]: prompt/completion pairs and chat conversations to [`Example`]s. Text is
//!   rendered in pieces whose spans are known while rendering (never found again by searching),
//!   each piece is tokenized on its own, and labels are `-100` on untrained pieces.
//! - [`length`]: what to do with examples longer than `max_seq_len`.
//! - [`split`]: train/validation/test from files or from seeded ratios; weighted mixtures.
//! - [`batch`]: length-grouped or packed batches as tensors, with a resumable cursor.
//! - [`preview`]: examples as text with the trained span marked.
//! - [`config`]: the `[data]` section of a training config and [`config::load`], which runs
//!   all of the above.
//! - [`tasks`]: the other tasks and objectives ([`DataTask`]): seq2seq pairs, sequence and token
//!   classification ([`labels`] maps label values to class ids), raw text for `clm`, `mlm` and
//!   `span_corruption` ([`objectives`]); [`text`] tokenizes encoder inputs with the model's own
//!   special tokens.
//!
//! Labels follow the Hugging Face convention: `labels[i]` is aligned with `input_ids[i]` (not
//! shifted); the loss compares the logits at position `i - 1` with `labels[i]`.
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub mod batch;
pub mod config;
pub mod labels;
pub mod length;
pub mod objectives;
pub mod preview;
pub mod read;
pub mod split;
pub mod tasks;
pub mod template;
pub mod text;
pub mod tokenize;

#[cfg(test)]
mod multitask_tests;
#[cfg(test)]
mod objectives_tests;
#[cfg(test)]
mod tasks_tests;
#[cfg(test)]
pub(crate) mod testutil;

pub use batch::{Batch, BatchConfig, Batcher, DataCursor, Targets};
pub use config::{
    load, load_task, pad_id, DataConfig, Format, Mixing, MixingRates, MixtureEntry, Prepared,
    SplitStats, TaskConfig,
};
pub use labels::LabelMap;
pub use length::{apply_length_policy, LengthPolicy, LengthStats};
pub use objectives::{Masking, MlmMasking, SpanCorruption};
pub use preview::{preview, preview_targets, preview_with, PreviewStyle};
pub use read::{read_rows, Loc, Row, Rows};
pub use split::{mix, split_rows};
pub use tasks::DataTask;
pub use template::{PromptTemplate, TemplateSet};
pub use text::TextEncoder;
pub use tokenize::{
    encode_chat, encode_pair, encode_pair_for, encode_seq2seq_pair, parse_messages, prompt_ids,
    Encoder, Example,
};

/// The label of a token that is not trained on (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// Where an example came from: the file and its line (JSONL, CSV) or row (JSON, Parquet), and
/// the `[[tasks]]` entry it was made for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub file: Arc<Path>,
    pub loc: Loc,
    /// The name of the task (a `[[tasks]]` entry) the example belongs to; `None` outside
    /// multi-task runs. Two tasks may read the same file (with different templates): the name,
    /// not the file, tells them apart in the batch plan's counts and in validation.
    pub task: Option<Arc<str>>,
}

impl Source {
    /// What a run's counts group the example under: its task's name, else its file.
    pub fn mix_key(&self) -> String {
        match &self.task {
            Some(t) => t.to_string(),
            None => self.file.display().to_string(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.loc)?;
        match &self.task {
            Some(t) => write!(f, " (task {t:?})"),
            None => Ok(()),
        }
    }
}
