//! Examples for every task and pre-training objective besides supervised causal LM (which is
//! [`super::config::load`]'s own path): seq2seq pairs, sequence and token classification rows,
//! and raw text chunked for `clm`, `mlm` and `span_corruption`.
//!
//! What each makes ([`Example`] with labels as its [`Targets`] say):
//! - seq2seq: the prompt template is the encoder input (with the model's special tokens, e.g.
//!   T5's closing `</s>`), the completion plus EOS the decoder targets; the prompt is not in
//!   the targets.
//! - sequence classification: the template renders the text (`[CLS] text [SEP]` for BERT), the
//!   label field gives one class id ([`LabelMap`]).
//! - token classification: a list of words and one label per word; words are split into pieces
//!   and, as in transformers' token-classification recipe, the first piece of each word carries
//!   the word's label and the other pieces and special tokens [`IGNORE`].
//! - `clm`: documents, each `[BOS] text EOS`, concatenated and cut into `max_seq_len` chunks,
//!   trained on every token.
//! - `mlm`: documents with the model's special tokens (`[CLS] text [SEP]`), concatenated and cut
//!   into `max_seq_len` chunks (transformers' `run_mlm.py`); masks are drawn per batch.
//! - `span_corruption`: documents with EOS, concatenated and cut into chunks that corrupt to
//!   exactly `max_seq_len` input tokens (`run_t5_mlm_flax.py`); spans are drawn per batch.
use rayon::prelude::*;
use serde_json::Value;

use super::config::{DataConfig, Prepared, SplitStats};
use super::objectives::{
    chunk_documents, expanded_lengths, sentinel_ids, Masking, MlmMasking, SpanCorruption,
};
use super::read::type_name;
use super::text::TextEncoder;
use super::{
    LabelMap, LengthPolicy, LengthStats, PromptTemplate, Row, Rows, Source, Targets, TemplateSet,
    IGNORE,
};
use crate::model::Task;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

const SECTION: &str = "[data]";

/// How a run's rows become examples: the train config's `task` and `objective` together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataTask {
    /// Prompt / completion or chat rows, trained on the completion (`causal_lm`, `sft`).
    CausalSft,
    /// Raw text, trained on every token (`objective = "clm"`).
    Clm,
    /// Prompt as encoder input, completion as decoder targets (`seq2seq_lm`, `sft`).
    Seq2Seq,
    /// A text and one class per row (`sequence_classification`).
    SequenceClassification,
    /// Words and one class per word (`token_classification`).
    TokenClassification,
    /// Raw text, masked-language modelling (`objective = "mlm"`).
    Mlm,
    /// Raw text, T5 span corruption (`objective = "span_corruption"`).
    SpanCorruption,
}

pub const OBJECTIVES: &[&str] = &["sft", "clm", "mlm", "span_corruption"];

impl DataTask {
    /// From the train config's `task` and `objective` strings (see [`DataTask::for_run`]).
    pub fn new(task: Option<&str>, objective: &str) -> Result<Self> {
        let task = match task {
            None => None,
            Some(t) => Some(Task::parse(t).ok_or_else(|| {
                let all: Vec<&str> = Task::ALL.iter().map(|t| t.as_str()).collect();
                Error::key(
                    "[train]",
                    "task",
                    format!("unknown task `{t}` (expected one of {})", all.join(", ")),
                )
            })?),
        };
        Self::for_run(task, objective)
    }

    /// From a run's task (`None`: not given) and objective (`sft`, `clm`, `mlm`,
    /// `span_corruption`). A pre-training objective decides on its own, but must fit the task
    /// when one is given: `clm` trains decoders (`causal_lm`), `span_corruption`
    /// encoder-decoders (`seq2seq_lm`), `mlm` encoders.
    pub fn for_run(task: Option<Task>, objective: &str) -> Result<Self> {
        let mismatch = |needs: &str| {
            Err(Error::key(
                "[train]",
                "objective",
                format!(
                    "objective = \"{objective}\" trains {needs}, not task = \"{}\"",
                    task.map_or("", Task::as_str)
                ),
            ))
        };
        match objective {
            "sft" => Ok(match task.unwrap_or(Task::CausalLm) {
                Task::CausalLm => DataTask::CausalSft,
                Task::Seq2SeqLm => DataTask::Seq2Seq,
                Task::SequenceClassification => DataTask::SequenceClassification,
                Task::TokenClassification => DataTask::TokenClassification,
            }),
            "clm" => match task {
                None | Some(Task::CausalLm) => Ok(DataTask::Clm),
                Some(_) => mismatch("decoders (task = \"causal_lm\")"),
            },
            "span_corruption" => match task {
                None | Some(Task::Seq2SeqLm) => Ok(DataTask::SpanCorruption),
                Some(_) => mismatch("encoder-decoders (task = \"seq2seq_lm\")"),
            },
            "mlm" => match task {
                Some(Task::CausalLm | Task::Seq2SeqLm) => mismatch("encoders"),
                _ => Ok(DataTask::Mlm),
            },
            other => Err(Error::key(
                "[train]",
                "objective",
                format!(
                    "unknown objective `{other}` (expected one of {})",
                    OBJECTIVES.join(", ")
                ),
            )),
        }
    }

    /// What the examples' labels hold.
    pub fn targets(self) -> Targets {
        match self {
            DataTask::CausalSft | DataTask::Clm => Targets::NextToken,
            DataTask::Seq2Seq | DataTask::SpanCorruption => Targets::Decoder,
            DataTask::SequenceClassification => Targets::Sequence,
            DataTask::TokenClassification | DataTask::Mlm => Targets::Token,
        }
    }

    /// Raw text chunked into fixed-length pieces (no rows-to-examples correspondence).
    pub fn is_pretraining(self) -> bool {
        matches!(
            self,
            DataTask::Clm | DataTask::Mlm | DataTask::SpanCorruption
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            DataTask::CausalSft => "causal LM",
            DataTask::Clm => "clm",
            DataTask::Seq2Seq => "seq2seq LM",
            DataTask::SequenceClassification => "sequence classification",
            DataTask::TokenClassification => "token classification",
            DataTask::Mlm => "mlm",
            DataTask::SpanCorruption => "span_corruption",
        }
    }
}

/// Keys of `[data]` that only some kinds of examples use: set for another kind, each is a
/// one-line error naming the key (a typo'd task would otherwise silently ignore them).
pub fn check_keys(cfg: &DataConfig, kind: DataTask) -> Result<()> {
    use DataTask::*;
    let set: &[(&str, bool, &[DataTask])] = &[
        ("text", cfg.text.is_some(), &[Clm, Mlm, SpanCorruption]),
        (
            "template",
            cfg.template.is_some() || cfg.templates.is_some(),
            &[CausalSft, Seq2Seq, SequenceClassification],
        ),
        (
            "completion",
            cfg.completion.is_some(),
            &[CausalSft, Seq2Seq],
        ),
        ("chat", cfg.chat, &[CausalSft]),
        ("messages_field", cfg.messages_field.is_some(), &[CausalSft]),
        (
            "label_field",
            cfg.label_field.is_some(),
            &[SequenceClassification, TokenClassification],
        ),
        (
            "labels",
            cfg.labels.is_some(),
            &[SequenceClassification, TokenClassification],
        ),
        (
            "tokens_field",
            cfg.tokens_field.is_some(),
            &[TokenClassification],
        ),
        ("max_target_len", cfg.max_target_len.is_some(), &[Seq2Seq]),
        ("mlm_probability", cfg.mlm_probability.is_some(), &[Mlm]),
        ("whole_word_mask", cfg.whole_word_mask.is_some(), &[Mlm]),
        (
            "noise_density",
            cfg.noise_density.is_some(),
            &[SpanCorruption],
        ),
        (
            "mean_noise_span_length",
            cfg.mean_noise_span_length.is_some(),
            &[SpanCorruption],
        ),
        ("packing", cfg.packing, &[CausalSft, Clm]),
    ];
    for (key, present, kinds) in set {
        if *present && !kinds.contains(&kind) {
            let hint = match *key {
                "text" => " (raw text is for objective = \"clm\", \"mlm\" or \"span_corruption\"; supervised data uses `template`)",
                "template" | "completion" if kind.is_pretraining() => {
                    " (pre-training objectives read raw text from `text = \"{field}\"`)"
                }
                "completion" => " (classification reads its label from `label_field`)",
                _ => "",
            };
            return Err(Error::key(
                SECTION,
                *key,
                format!("not used for {} data{hint}", kind.name()),
            ));
        }
    }
    if kind.is_pretraining() && cfg.text.is_none() {
        return Err(Error::key(
            SECTION,
            "text",
            format!(
                "missing: objective = \"{}\" reads raw text; set e.g. text = \"{{text}}\"",
                kind.name()
            ),
        ));
    }
    if kind == TokenClassification && (cfg.template.is_some() || cfg.templates.is_some()) {
        return Err(Error::key(
            SECTION,
            "template",
            "token classification reads words from `tokens_field`, not a template",
        ));
    }
    if let Some(0) = cfg.max_target_len {
        return Err(Error::key(SECTION, "max_target_len", "must be at least 1"));
    }
    Ok(())
}

/// Read the prompt templates of `cfg` (`template` or `templates`).
fn prompt_templates(cfg: &DataConfig, what: &str) -> Result<Vec<String>> {
    match (&cfg.template, &cfg.templates) {
        (Some(_), Some(_)) => Err(Error::key(
            SECTION,
            "templates",
            "give either `template` or `templates`, not both",
        )),
        (Some(t), None) => Ok(vec![t.clone()]),
        (None, Some(ts)) if ts.is_empty() => {
            Err(Error::key(SECTION, "templates", "the list is empty"))
        }
        (None, Some(ts)) => Ok(ts.clone()),
        (None, None) => Err(Error::key(
            SECTION,
            "template",
            format!("missing: {what} needs a `template` (e.g. \"{{sentence}}\")"),
        )),
    }
}

/// A field of a row that must be present (not null).
fn field<'a>(row: &'a Row, name: &str, src: &Source) -> Result<&'a Value> {
    match row.fields.get(name) {
        None | Some(Value::Null) => Err(Error::msg(format!("{src}: no field `{name}` in the row"))),
        Some(v) => Ok(v),
    }
}

/// A token-classification row: its words and their label values.
fn words_and_tags<'a>(
    row: &'a Row,
    tokens_field: &str,
    label_field: &str,
    src: &Source,
) -> Result<(Vec<&'a str>, &'a [Value])> {
    let bad = |f: &str, what: String| Error::msg(format!("{src}: field `{f}`: {what}"));
    let words = match field(row, tokens_field, src)? {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, w)| {
                w.as_str().ok_or_else(|| {
                    bad(
                        &format!("{tokens_field}[{i}]"),
                        format!("expected a string, found {}", type_name(w)),
                    )
                })
            })
            .collect::<Result<Vec<&str>>>()?,
        other => {
            return Err(bad(
                tokens_field,
                format!("expected a list of words, found {}", type_name(other)),
            ))
        }
    };
    let tags = match field(row, label_field, src)? {
        Value::Array(items) => items.as_slice(),
        other => {
            return Err(bad(
                label_field,
                format!("expected a list of labels, found {}", type_name(other)),
            ))
        }
    };
    if tags.len() != words.len() {
        return Err(bad(
            label_field,
            format!(
                "{} labels for {} words in `{tokens_field}`",
                tags.len(),
                words.len()
            ),
        ));
    }
    Ok((words, tags))
}

/// What a length policy does to an input too long for `max_len`: `Ok(Some(content))` fitted,
/// `Ok(None)` dropped. `keep_end`: cut the start (the prompt start, as for causal LM prompts)
/// rather than the end (classification, as transformers' `truncation=True`).
fn fit(
    mut content: Vec<u32>,
    room: usize,
    keep_end: bool,
    policy: LengthPolicy,
    src: &Source,
    what: &str,
    stats: &mut LengthStats,
) -> Result<Option<(Vec<u32>, bool)>> {
    if content.len() <= room {
        return Ok(Some((content, false)));
    }
    match policy {
        LengthPolicy::Drop => {
            stats.dropped += 1;
            Ok(None)
        }
        LengthPolicy::Error => Err(Error::msg(format!(
            "{src}: {what} is {} tokens, more than the {room} that fit (length_policy = \"error\")",
            content.len()
        ))),
        LengthPolicy::TruncatePromptStart => {
            if keep_end {
                content.drain(..content.len() - room);
            } else {
                content.truncate(room);
            }
            Ok(Some((content, true)))
        }
    }
}

/// Room for content once the special tokens are in, or an error naming max_seq_len.
fn room(max_len: usize, specials: usize, key: &str) -> Result<usize> {
    if max_len <= specials {
        return Err(Error::key(
            SECTION,
            key,
            format!(
                "{max_len} leaves no room for text after the model's {specials} special tokens"
            ),
        ));
    }
    Ok(max_len - specials)
}

/// Seq2seq: `prompt` is the encoder input (with the model's special tokens), `completion` + EOS
/// the targets. Too long inputs follow `policy` (the prompt start is cut), too long targets are
/// cut at the end keeping EOS (or dropped / an error).
#[allow(clippy::too_many_arguments)]
pub fn encode_seq2seq(
    enc: &TextEncoder,
    prompt: &str,
    completion: &str,
    source: Source,
    max_len: usize,
    max_target_len: usize,
    policy: LengthPolicy,
    stats: &mut LengthStats,
) -> Result<Option<super::Example>> {
    let eos = enc.eos_id().ok_or_else(|| {
        Error::msg("the tokenizer has no end-of-sequence token to end seq2seq targets with")
    })?;
    let (before, after) = enc.seq2seq_specials();
    let room_in = room(max_len, before.len() + after.len(), "max_seq_len")?;
    let room_out = room(max_target_len, 1, "max_target_len")?;
    let Some((content, cut_in)) = fit(
        enc.content(prompt)?,
        room_in,
        true,
        policy,
        &source,
        "the encoder input",
        stats,
    )?
    else {
        return Ok(None);
    };
    let Some((target, cut_out)) = fit(
        enc.content(completion)?,
        room_out,
        false,
        policy,
        &source,
        "the target",
        stats,
    )?
    else {
        return Ok(None);
    };
    match (cut_in, cut_out) {
        (false, false) => stats.fit += 1,
        (_, true) => stats.truncated_completion += 1,
        (true, false) => stats.truncated_prompt += 1,
    }
    let mut input_ids = Vec::with_capacity(content.len() + before.len() + after.len());
    input_ids.extend(before);
    input_ids.extend(&content);
    input_ids.extend(after);
    let mut labels: Vec<i64> = target.iter().map(|&i| i as i64).collect();
    labels.push(eos as i64);
    Ok(Some(super::Example {
        input_ids,
        labels,
        source,
    }))
}

/// Sequence classification: `[specials] text [specials]` and the class id.
pub fn encode_class(
    enc: &TextEncoder,
    text: &str,
    class: i64,
    source: Source,
    max_len: usize,
    policy: LengthPolicy,
    stats: &mut LengthStats,
) -> Result<Option<super::Example>> {
    let room = room(max_len, enc.n_specials(), "max_seq_len")?;
    let Some((content, cut)) = fit(
        enc.content(text)?,
        room,
        false,
        policy,
        &source,
        "the text",
        stats,
    )?
    else {
        return Ok(None);
    };
    if cut {
        stats.truncated_prompt += 1;
    } else {
        stats.fit += 1;
    }
    Ok(Some(super::Example {
        input_ids: enc.wrap(&content),
        labels: vec![class],
        source,
    }))
}

/// Token classification: the words' pieces with the model's special tokens; the first piece of
/// each word labelled with the word's class, other pieces and special tokens [`IGNORE`].
#[allow(clippy::too_many_arguments)]
pub fn encode_words(
    enc: &TextEncoder,
    words: &[&str],
    classes: &[i64],
    source: Source,
    max_len: usize,
    policy: LengthPolicy,
    stats: &mut LengthStats,
) -> Result<Option<super::Example>> {
    let room = room(max_len, enc.n_specials(), "max_seq_len")?;
    let (ids, word_of) = enc.words(words)?;
    let mut labels = Vec::with_capacity(ids.len());
    for (k, &w) in word_of.iter().enumerate() {
        let first = k == 0 || word_of[k - 1] != w;
        labels.push(if first { classes[w] } else { IGNORE });
    }
    let Some((ids, cut)) = fit(ids, room, false, policy, &source, "the words", stats)? else {
        return Ok(None);
    };
    labels.truncate(ids.len());
    if cut {
        stats.truncated_prompt += 1;
    } else {
        stats.fit += 1;
    }
    let mut all = vec![IGNORE; enc.prefix().len()];
    all.extend(labels);
    all.extend(std::iter::repeat_n(IGNORE, enc.suffix().len()));
    Ok(Some(super::Example {
        input_ids: enc.wrap(&ids),
        labels: all,
        source,
    }))
}

/// The label map of a classification run: `labels` from the config, else inferred from the
/// training rows.
fn label_map(
    cfg: &DataConfig,
    train: &Rows,
    kind: DataTask,
    label_field: &str,
) -> Result<LabelMap> {
    if let Some(names) = &cfg.labels {
        return LabelMap::from_list(names, SECTION);
    }
    let mut values: Vec<(&Value, Source)> = Vec::new();
    for row in &train.rows {
        let src = train.source(row);
        match kind {
            DataTask::TokenClassification => {
                let tokens_field = cfg.tokens_field.as_deref().unwrap_or("tokens");
                let (_, tags) = words_and_tags(row, tokens_field, label_field, &src)?;
                values.extend(tags.iter().map(|t| (t, src.clone())));
            }
            _ => values.push((field(row, label_field, &src)?, src)),
        }
    }
    LabelMap::infer(values.iter().map(|(v, s)| (*v, s)), label_field)
}

/// Examples of every split for `kind` (anything but [`DataTask::CausalSft`]).
pub(crate) fn load(
    cfg: &DataConfig,
    tok: &Tokenizer,
    max_len: usize,
    kind: DataTask,
    train: Rows,
    validation: Option<Rows>,
    test: Option<Rows>,
) -> Result<Prepared> {
    let mut prepared = Prepared {
        max_seq_len: max_len,
        targets: kind.targets(),
        ..Default::default()
    };
    let enc = TextEncoder::new(tok)?;
    let splits = [
        ("train", Some(&train)),
        ("validation", validation.as_ref()),
        ("test", test.as_ref()),
    ];
    if kind.is_pretraining() {
        let text = cfg.text.as_deref().ok_or_else(|| {
            Error::key(
                SECTION,
                "text",
                format!(
                    "missing: the {kind:?} objective reads raw text (e.g. text = \"{{text}}\")"
                ),
            )
        })?;
        let text = PromptTemplate::parse(text)?;
        let masking = masking(cfg, kind, &enc, max_len)?;
        let chunk_len = match &masking {
            Some(Masking::SpanCorruption(s)) => {
                expanded_lengths(max_len, s.noise_density, s.mean_noise_span_length).0
            }
            _ => max_len,
        };
        for (name, rows) in splits {
            let Some(rows) = rows else { continue };
            let docs: Vec<Vec<u32>> = rows
                .rows
                .par_iter()
                .map(|row| {
                    let src = rows.source(row);
                    let t = text.render(&row.fields, &src)?;
                    document(kind, tok, &enc, &t).map_err(|e| Error::msg(format!("{src}: {e}")))
                })
                .collect::<Result<_>>()?;
            let examples: Vec<super::Example> = chunk_documents(&docs, chunk_len, 2)
                .into_iter()
                .map(|(ids, d)| super::Example {
                    labels: match kind {
                        DataTask::Clm => ids.iter().map(|&i| i as i64).collect(),
                        _ => Vec::new(),
                    },
                    input_ids: ids,
                    source: rows.source(&rows.rows[d]),
                })
                .collect();
            if examples.is_empty() {
                return Err(Error::file(
                    &*rows.file,
                    format!(
                        "{name}: the text is too short to make one example of 2 tokens or more"
                    ),
                ));
            }
            let mut stats = SplitStats {
                name: name.into(),
                rows: rows.rows.len(),
                ..Default::default()
            };
            stats.examples = examples.len();
            stats.tokens = examples.iter().map(super::Example::len).sum();
            stats.trained_tokens = match &masking {
                Some(m) => examples
                    .iter()
                    .map(|e| m.expected_trained(&e.input_ids))
                    .sum::<f64>()
                    .round() as usize,
                None => examples.iter().map(super::Example::n_trained).sum(),
            };
            stats.length.fit = examples.len();
            prepared.stats.push(stats);
            match name {
                "train" => prepared.train = examples,
                "validation" => prepared.validation = examples,
                _ => prepared.test = examples,
            }
        }
        prepared.masking = masking;
        return Ok(prepared);
    }

    // Row by row.
    let max_target = cfg.max_target_len.unwrap_or(max_len);
    let label_field = cfg.label_field.clone().unwrap_or_else(|| match kind {
        DataTask::TokenClassification => "labels".into(),
        _ => "label".into(),
    });
    let tokens_field = cfg.tokens_field.clone().unwrap_or_else(|| "tokens".into());
    let labels = match kind {
        DataTask::SequenceClassification | DataTask::TokenClassification => {
            Some(label_map(cfg, &train, kind, &label_field)?)
        }
        _ => None,
    };
    let templates = match kind {
        DataTask::Seq2Seq => {
            let completion = cfg.completion.as_deref().ok_or_else(|| {
                Error::key(
                    SECTION,
                    "completion",
                    "missing: seq2seq data needs a completion template for the targets (e.g. \" {summary}\")",
                )
            })?;
            Some(TemplateSet::new(
                &prompt_templates(cfg, "seq2seq data")?,
                completion,
                cfg.seed,
            )?)
        }
        DataTask::SequenceClassification => Some(TemplateSet::new(
            &prompt_templates(cfg, "classification data")?,
            "",
            cfg.seed,
        )?),
        _ => None,
    };
    let encode_row = |row: &Row, src: Source| -> Result<(Option<super::Example>, LengthStats)> {
        let mut st = LengthStats::default();
        let policy = cfg.length_policy;
        let ex = match kind {
            DataTask::Seq2Seq => {
                let (prompt, completion) = set_up(&templates, "templates")?.render(row, &src)?;
                encode_seq2seq(
                    &enc,
                    &prompt,
                    &completion,
                    src,
                    max_len,
                    max_target,
                    policy,
                    &mut st,
                )?
            }
            DataTask::SequenceClassification => {
                let set = set_up(&templates, "templates")?;
                let text = set.prompts[set.pick(row)].render(&row.fields, &src)?;
                let class = set_up(&labels, "label list")?.id(
                    field(row, &label_field, &src)?,
                    &src,
                    &label_field,
                )?;
                encode_class(&enc, &text, class, src, max_len, policy, &mut st)?
            }
            DataTask::TokenClassification => {
                let (words, tags) = words_and_tags(row, &tokens_field, &label_field, &src)?;
                let map = set_up(&labels, "label list")?;
                let classes = tags
                    .iter()
                    .map(|t| map.id(t, &src, &label_field))
                    .collect::<Result<Vec<i64>>>()?;
                encode_words(&enc, &words, &classes, src, max_len, policy, &mut st)?
            }
            other => {
                return Err(Error::msg(format!(
                    "{src}: {other:?} data is not read row by row (pre-training and causal SFT data take other paths)"
                )))
            }
        };
        Ok((ex, st))
    };
    for (name, rows) in splits {
        let Some(rows) = rows else { continue };
        let encoded: Vec<Result<(Option<super::Example>, LengthStats)>> = rows
            .rows
            .par_iter()
            .map(|row| encode_row(row, rows.source(row)))
            .collect();
        let mut stats = SplitStats {
            name: name.into(),
            rows: rows.rows.len(),
            ..Default::default()
        };
        let mut examples = Vec::with_capacity(rows.rows.len());
        for r in encoded {
            let (ex, st) = r?;
            stats.length.add(&st);
            examples.extend(ex);
        }
        if name == "train" && examples.is_empty() {
            return Err(Error::file(
                &*rows.file,
                "every example was dropped by length_policy = \"drop\" (raise max_seq_len?)",
            ));
        }
        stats.examples = examples.len();
        stats.tokens = examples.iter().map(super::Example::len).sum();
        stats.trained_tokens = examples.iter().map(super::Example::n_trained).sum();
        prepared.stats.push(stats);
        match name {
            "train" => prepared.train = examples,
            "validation" => prepared.validation = examples,
            _ => prepared.test = examples,
        }
    }
    prepared.labels = labels;
    Ok(prepared)
}

/// One document's ids for a pre-training objective.
fn document(kind: DataTask, tok: &Tokenizer, enc: &TextEncoder, text: &str) -> Result<Vec<u32>> {
    match kind {
        DataTask::Clm => {
            // `[BOS] text EOS`, as the model's tokenizer adds BOS for prompts.
            let mut ids = tok.encode(text, true)?;
            ids.push(super::tokenize::eos_id(tok)?);
            Ok(ids)
        }
        DataTask::Mlm => Ok(enc.wrap(&enc.content(text)?)),
        DataTask::SpanCorruption => {
            let (before, after) = enc.seq2seq_specials();
            let mut ids = before.to_vec();
            ids.extend(enc.content(text)?);
            ids.extend(after);
            Ok(ids)
        }
        other => Err(Error::msg(format!(
            "{other:?} data is not raw text: only pre-training objectives make documents"
        ))),
    }
}

/// What `load` prepared for this task before reading rows (templates, the label list): an
/// error rather than a panic where a task reaches a path it did not prepare for.
fn set_up<'a, T>(x: &'a Option<T>, what: &str) -> Result<&'a T> {
    x.as_ref()
        .ok_or_else(|| Error::msg(format!("[data]: no {what} was prepared for this task")))
}

/// The masking of an objective, with its settings checked against the tokenizer.
fn masking(
    cfg: &DataConfig,
    kind: DataTask,
    enc: &TextEncoder,
    max_len: usize,
) -> Result<Option<Masking>> {
    match kind {
        DataTask::Mlm => {
            let mask_id = enc.mask_id().ok_or_else(|| {
                Error::msg(
                    "objective = \"mlm\": the tokenizer has no mask token ([MASK] or <mask>)",
                )
            })?;
            let continuation = if cfg.whole_word_mask.unwrap_or(false) {
                Some(enc.continuation_table().ok_or_else(|| {
                    Error::key(
                        SECTION,
                        "whole_word_mask",
                        "needs a WordPiece tokenizer (words are joined by their ## pieces)",
                    )
                })?)
            } else {
                None
            };
            let m = MlmMasking {
                probability: cfg.mlm_probability.unwrap_or(0.15),
                mask_replace: 0.8,
                random_replace: 0.1,
                mask_id,
                vocab_size: enc.vocab_size() as u32,
                special: (0..enc.vocab_size() as u32)
                    .map(|id| enc.is_special(id))
                    .collect(),
                continuation,
            };
            m.check()?;
            Ok(Some(Masking::Mlm(m)))
        }
        DataTask::SpanCorruption => {
            let sentinels = sentinel_ids(|t| enc.token_to_id(t));
            if sentinels.is_empty() {
                return Err(Error::msg(
                    "objective = \"span_corruption\" needs the sentinel tokens <extra_id_0>, <extra_id_1>, ... in the tokenizer (T5 tokenizers have 100)",
                ));
            }
            let eos_id = enc.eos_id().ok_or_else(|| {
                Error::msg(
                    "objective = \"span_corruption\": the tokenizer has no end-of-sequence token",
                )
            })?;
            let s = SpanCorruption {
                noise_density: cfg.noise_density.unwrap_or(0.15),
                mean_noise_span_length: cfg.mean_noise_span_length.unwrap_or(3.0),
                sentinels,
                eos_id,
            };
            s.check()?;
            let (chunk, _) = expanded_lengths(max_len, s.noise_density, s.mean_noise_span_length);
            let needed = s.max_spans(chunk);
            if needed > s.sentinels.len() {
                return Err(Error::key(
                    SECTION,
                    "max_seq_len",
                    format!(
                        "span corruption of {chunk}-token chunks makes {needed} spans, more than the tokenizer's {} sentinel tokens",
                        s.sentinels.len()
                    ),
                ));
            }
            Ok(Some(Masking::SpanCorruption(s)))
        }
        _ => Ok(None),
    }
}
