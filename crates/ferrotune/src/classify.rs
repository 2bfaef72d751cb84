//! Sequence classification of a data file's rows, scored against their gold labels
//! (`ferrotune classify`): accuracy and macro-F1 ([`crate::eval::metrics::classification`]).
//!
//! Any model whose loaded head classifies sequences (PEFT task type `SEQ_CLS`; today BERT /
//! RoBERTa saved as `*ForSequenceClassification`) runs through the [`Model`] interface:
//! `model.logits(batch)` with [`Targets::Sequence`] gives `(b, num_labels)` class logits. Rows
//! are encoded as training encodes them ([`encode_class`]: the text template rendered, the
//! model's special tokens around it, the end cut when it is too long, as transformers'
//! `truncation=True`), batched longest first with no gradients, and the prediction is the
//! arg-max class.
//!
//! Gold labels map to class ids through a [`LabelMap`]: the model's `id2label` (config.json),
//! or the names given in order (`--labels`). An integer label (a JSON number or a CSV/TSV cell
//! such as `1`) is the class id itself; a string is looked up by name. A label outside the map
//! is a one-line error naming the file, line and field.
use crate::data::tasks::encode_class;
use crate::data::{
    self, read_rows, BatchConfig, Batcher, Format, LabelMap, LengthPolicy, LengthStats,
    PromptTemplate, Targets, TextEncoder,
};
use crate::eval::metrics::classification::{class_scores, ClassScores};
use crate::model::{ArchitectureKind, Model, TaskType};
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::DType;
use serde_json::Value;
use std::path::Path;

/// Most rows per batch (a larger `--batch-size` is a typo).
pub const MAX_BATCH: usize = 4096;

/// Where `classify`'s options come from, for messages.
const WHAT: &str = "classify";

#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    /// The text of each row: a template with `{field}` placeholders (or Jinja), or a bare
    /// field name (`sentence` reads as `{sentence}`).
    pub text: String,
    /// The field holding each row's gold label.
    pub label_field: String,
    /// Class names in id order, when the model's `id2label` does not name the data's labels.
    pub labels: Option<Vec<String>>,
    pub batch_size: usize,
    /// Most tokens per row, special tokens included (default and limit: the model's).
    pub max_seq_len: Option<usize>,
    /// The data file's format (default: from its extension).
    pub format: Option<Format>,
    /// Score the first rows only.
    pub limit: Option<usize>,
}

impl Default for ClassifyOptions {
    fn default() -> Self {
        Self {
            text: "{text}".into(),
            label_field: "label".into(),
            labels: None,
            batch_size: 32,
            max_seq_len: None,
            format: None,
            limit: None,
        }
    }
}

impl ClassifyOptions {
    /// Check the values that do not depend on the model or the data; errors name the option
    /// (`Error::Key` with the option's name as the key).
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(Error::key(
                WHAT,
                "batch_size",
                format!("{}: expected 1 to {MAX_BATCH}", self.batch_size),
            ));
        }
        if self.label_field.is_empty() {
            return Err(Error::key(WHAT, "label_field", "expected a field name"));
        }
        if self.text.trim().is_empty() {
            return Err(Error::key(
                WHAT,
                "text",
                "expected a template such as \"{sentence}\" or a field name",
            ));
        }
        self.template()
            .map_err(|e| Error::key(WHAT, "text", crate::error::first_line(&e.to_string())))?;
        if let Some(n) = self.max_seq_len {
            if n < 2 {
                return Err(Error::key(
                    WHAT,
                    "max_seq_len",
                    format!("{n}: expected at least 2 tokens"),
                ));
            }
        }
        if self.limit == Some(0) {
            return Err(Error::key(WHAT, "limit", "0: expected at least 1 row"));
        }
        if let Some(names) = &self.labels {
            LabelMap::from_list(names, WHAT)?;
        }
        Ok(())
    }

    /// The text template: `text` itself, or `{text}` when it is a bare field name.
    pub fn template(&self) -> Result<PromptTemplate> {
        let t = self.text.as_str();
        if is_field_name(t) {
            PromptTemplate::parse(&format!("{{{t}}}"))
        } else {
            PromptTemplate::parse(t)
        }
    }
}

/// A name with no braces or spaces: read as a field, not as literal text.
fn is_field_name(t: &str) -> bool {
    !t.is_empty() && !t.contains(['{', '}']) && !t.chars().any(char::is_whitespace)
}

/// A data format by name (`jsonl`, `json`, `csv`, `tsv`, `parquet`).
pub fn parse_format(s: &str) -> Option<Format> {
    serde_json::from_value(Value::String(s.to_ascii_lowercase())).ok()
}

/// What [`classify`] found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ClassifyReport {
    pub accuracy: f64,
    /// Macro-F1 over the classes in gold ∪ predicted (scikit-learn's `average="macro"`).
    pub f1: f64,
    /// Rows scored.
    pub n: usize,
    /// Rows right.
    pub correct: usize,
    /// Class names by id.
    pub labels: Vec<String>,
    /// Rows whose text was cut to fit `max_seq_len`.
    pub truncated: usize,
    /// Gold and predicted class ids, in file order.
    #[serde(skip)]
    pub gold: Vec<usize>,
    #[serde(skip)]
    pub predicted: Vec<usize>,
}

impl ClassifyReport {
    pub fn scores(&self) -> ClassScores {
        ClassScores {
            accuracy: self.accuracy,
            f1: self.f1,
            n: self.n,
        }
    }
}

/// The head the base needs when an adapter carries the classifier (PEFT's `modules_to_save` of a
/// `SEQ_CLS` adapter trained on a bare encoder): a sequence-classification head with as many
/// classes as the adapter's classifier, named from the adapter's `labels.json` (written by
/// `train`), else `labels`, else `LABEL_0`, ... `None` when no adapter has a classifier (the
/// base's own head is used). The head's layers are placeholders the adapter's copy replaces.
pub fn head_for_adapters(
    adapters: &[std::path::PathBuf],
    labels: Option<&[String]>,
) -> Result<Option<crate::model::HeadSpec>> {
    use crate::peft::format::{KEY_PREFIX, WEIGHTS_FILE};
    for dir in adapters {
        let path = dir.join(WEIGHTS_FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            // The adapter loader reports a missing or unreadable file with its own message.
            continue;
        };
        let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) else {
            continue;
        };
        let tensors = meta.tensors();
        let rows = ["classifier.weight", "classifier.out_proj.weight"]
            .iter()
            .find_map(|n| tensors.get(&format!("{KEY_PREFIX}{n}")))
            .and_then(|info| info.shape.first().copied());
        let Some(n) = rows else { continue };
        let saved = dir.join(crate::train::LABELS_FILE);
        let names: Vec<String> = if saved.is_file() {
            let text = std::fs::read_to_string(&saved).map_err(|e| Error::file(&saved, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&saved, format!("not JSON: {e}")))?;
            let map = v
                .get("id2label")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::key(saved.display().to_string(), "id2label", "missing"))?;
            (0..n)
                .map(|i| {
                    map.get(&i.to_string())
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            Error::key(
                                saved.display().to_string(),
                                "id2label",
                                format!("no name for class {i} of the adapter's {n}"),
                            )
                        })
                })
                .collect::<Result<_>>()?
        } else if let Some(l) = labels.filter(|l| l.len() == n) {
            l.to_vec()
        } else {
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        };
        return Ok(Some(crate::model::HeadSpec {
            head: crate::model::HeadKind::SequenceClassification,
            labels: Some(names),
            init_seed: Some(0),
        }));
    }
    Ok(None)
}

/// The model must classify sequences: a bare encoder, an encoder with another head, a decoder
/// or an encoder-decoder is a one-line error saying what it is and what classify needs.
pub fn check_model(model: &dyn Model) -> Result<()> {
    if model.task_type() == TaskType::SeqCls {
        return Ok(());
    }
    let what = match model.kind() {
        ArchitectureKind::Encoder => "an encoder without a sequence-classification head",
        ArchitectureKind::Decoder => "a decoder (it predicts tokens, not classes)",
        ArchitectureKind::EncoderDecoder => "an encoder-decoder (it predicts tokens, not classes)",
    };
    Err(Error::msg(format!(
        "{} is {what}: classify needs a sequence-classification model (an HF folder saved as BertForSequenceClassification or RobertaForSequenceClassification, e.g. one trained with task = \"sequence_classification\")",
        model.describe()
    )))
}

/// An adapter for classify must be a sequence-classification one: `task_type` in
/// `dir/adapter_config.json` other than `SEQ_CLS` is a one-line error naming the file and key
/// (a missing or null one is accepted, as PEFT accepts it). Checked before the model loads.
pub fn check_adapter_task(dir: &Path) -> Result<()> {
    let path = dir.join(crate::peft::format::CONFIG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        // A missing config is reported by the adapter loader, with its own message.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::file(&path, e)),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("invalid JSON: {e}")))?;
    match v.get("task_type") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(t)) if t == TaskType::SeqCls.as_peft() => Ok(()),
        Some(other) => Err(Error::key(
            path.display().to_string(),
            "task_type",
            format!(
                "{other}: classify needs a sequence-classification adapter ({})",
                TaskType::SeqCls.as_peft()
            ),
        )),
    }
}

/// The model's class names by id, from its `config.json` (`id2label`).
pub fn model_labels(model: &dyn Model) -> Result<Vec<String>> {
    let cfg = model.hf_config()?;
    let map = cfg
        .get("id2label")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::msg(format!(
                "{}: its config has no id2label, so the number of classes is unknown",
                model.describe()
            ))
        })?;
    let mut names = vec![None; map.len()];
    for (k, v) in map {
        let slot = k
            .parse::<usize>()
            .ok()
            .and_then(|i| names.get_mut(i))
            .ok_or_else(|| {
                Error::msg(format!(
                    "{}: id2label has key {k:?}, not a class id below {}",
                    model.describe(),
                    map.len()
                ))
            })?;
        *slot = v.as_str().map(str::to_string);
    }
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            n.ok_or_else(|| {
                Error::msg(format!(
                    "{}: id2label has no name for class {i}",
                    model.describe()
                ))
            })
        })
        .collect()
}

/// The label map gold labels go through: `opts.labels` (which must name as many classes as
/// the model has) or the model's `id2label`.
fn label_map(model: &dyn Model, opts: &ClassifyOptions) -> Result<(LabelMap, bool)> {
    let model_names = model_labels(model)?;
    match &opts.labels {
        Some(names) => {
            let map = LabelMap::from_list(names, WHAT)?;
            if map.len() != model_names.len() {
                return Err(Error::msg(format!(
                    "--labels names {} classes but the model's classifier has {} ({})",
                    map.len(),
                    model_names.len(),
                    preview(&model_names)
                )));
            }
            Ok((map, false))
        }
        None => Ok((
            LabelMap {
                names: model_names,
                from_integers: false,
            },
            true,
        )),
    }
}

fn preview(names: &[String]) -> String {
    let mut s: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    if names.len() > 10 {
        s.push("...");
    }
    s.join(", ")
}

/// The gold value of `field` in a row, or a one-line error naming the file and line.
fn gold_value<'a>(row: &'a data::Row, field: &str, src: &data::Source) -> Result<&'a Value> {
    match row.fields.get(field) {
        Some(v) if !v.is_null() => Ok(v),
        Some(_) => Err(Error::msg(format!(
            "{src}: label field `{field}` is null (every row needs a label to score against)"
        ))),
        None => {
            let mut names: Vec<&str> = row.fields.keys().map(String::as_str).collect();
            names.truncate(8);
            Err(Error::msg(format!(
                "{src}: no label field `{field}` (the row has: {})",
                if names.is_empty() {
                    "no fields".to_string()
                } else {
                    names.join(", ")
                }
            )))
        }
    }
}

/// Classify every row of `data` (JSONL, JSON, CSV, TSV, Parquet) with `model` and score the
/// predictions against the rows' gold labels. `progress` counts rows.
pub fn classify(
    model: &dyn Model,
    tok: &Tokenizer,
    data: &Path,
    opts: &ClassifyOptions,
    progress: &dyn Progress,
) -> Result<ClassifyReport> {
    opts.validate()?;
    check_model(model)?;
    let (labels, from_model) = label_map(model, opts)?;
    let template = opts.template()?;
    let limit = model.context_length().unwrap_or(usize::MAX);
    let max_len = match opts.max_seq_len {
        Some(n) if n > limit => {
            return Err(Error::msg(format!(
                "--max-seq-len {n} is more than the model's {limit} positions"
            )))
        }
        Some(n) => n,
        None => limit,
    };
    let rows = read_rows(data, opts.format)?;
    let n = opts.limit.unwrap_or(usize::MAX).min(rows.rows.len());
    let enc = TextEncoder::new(tok)?;
    let mut stats = LengthStats::default();
    let mut examples = Vec::with_capacity(n);
    for row in &rows.rows[..n] {
        let src = rows.source(row);
        let text = template.render(&row.fields, &src)?;
        let class = labels
            .id(
                gold_value(row, &opts.label_field, &src)?,
                &src,
                &opts.label_field,
            )
            .map_err(|e| {
                if from_model {
                    Error::msg(format!(
                        "{e} (the model's id2label; give the class names in id order with --labels)"
                    ))
                } else {
                    e
                }
            })?;
        let ex = encode_class(
            &enc,
            &text,
            class,
            src,
            max_len,
            LengthPolicy::TruncatePromptStart,
            &mut stats,
        )?
        .expect("truncation never drops a row");
        examples.push(ex);
    }
    let gold: Vec<usize> = examples.iter().map(|e| e.labels[0] as usize).collect();

    // Longest first: similar lengths share a batch (less padding); results go back by index.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut predicted = vec![0usize; examples.len()];
    let pad = data::pad_id(tok);
    let classes = labels.len();
    progress.start("classifying", examples.len() as u64, "rows");
    for chunk in order.chunks(opts.batch_size) {
        let exs: Vec<_> = chunk.iter().map(|&i| examples[i].clone()).collect();
        let bc = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(chunk.len(), max_len, pad).with_targets(Targets::Sequence)
        };
        let rows_of: Vec<Vec<usize>> = (0..chunk.len()).map(|r| vec![r]).collect();
        let batch = Batcher::new(exs, bc, model.device().clone())?.build(&rows_of)?;
        let logits = match model.logits(&batch) {
            Ok(l) => l,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        let dims = logits.dims().to_vec();
        if dims != [chunk.len(), classes] {
            progress.finish();
            return Err(Error::msg(format!(
                "{}: the classifier gave logits of shape {dims:?}, expected [{}, {classes}] ({classes} classes in id2label)",
                model.describe(),
                chunk.len()
            )));
        }
        let best: Vec<u32> = logits.to_dtype(DType::F32)?.argmax(1)?.to_vec1()?;
        for (&i, b) in chunk.iter().zip(best) {
            predicted[i] = b as usize;
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    let s = class_scores(&gold, &predicted);
    Ok(ClassifyReport {
        accuracy: s.accuracy,
        f1: s.f1,
        n: s.n,
        correct: gold.iter().zip(&predicted).filter(|(g, p)| g == p).count(),
        labels: labels.names,
        truncated: stats.truncated_prompt,
        gold,
        predicted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_a_template_or_a_field_name() {
        let opts = |t: &str| ClassifyOptions {
            text: t.into(),
            ..Default::default()
        };
        let row: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"sentence": "a b", "x": "c"}"#).unwrap();
        let src = data::Source {
            file: std::sync::Arc::from(Path::new("f.jsonl")),
            loc: data::Loc::Line(3),
            task: None,
        };
        let render = |t: &str| opts(t).template().unwrap().render(&row, &src).unwrap();
        assert_eq!(render("sentence"), "a b");
        assert_eq!(render("{sentence}"), "a b");
        assert_eq!(render("Review: {sentence} / {x}"), "Review: a b / c");
        let e = opts("missing").template().unwrap().render(&row, &src);
        assert!(e.unwrap_err().to_string().contains("f.jsonl: line 3"));
    }

    #[test]
    fn options_are_checked() {
        let bad = |o: ClassifyOptions, want: &str| {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        bad(
            ClassifyOptions {
                batch_size: 0,
                ..Default::default()
            },
            "key `batch_size`: 0: expected 1 to",
        );
        bad(
            ClassifyOptions {
                text: " ".into(),
                ..Default::default()
            },
            "key `text`",
        );
        bad(
            ClassifyOptions {
                labels: Some(vec!["a".into(), "a".into()]),
                ..Default::default()
            },
            "key `labels`: `a` appears twice",
        );
        bad(
            ClassifyOptions {
                max_seq_len: Some(1),
                ..Default::default()
            },
            "key `max_seq_len`",
        );
        assert!(ClassifyOptions::default().validate().is_ok());
        assert_eq!(parse_format("TSV"), Some(Format::Tsv));
        assert_eq!(parse_format("xml"), None);
    }

    #[test]
    fn adapter_task_type_must_be_seq_cls() {
        let d = std::env::temp_dir().join(format!("ferrotune-classify-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let write = |v: Value| {
            std::fs::write(d.join("adapter_config.json"), v.to_string()).unwrap();
        };
        write(serde_json::json!({"peft_type": "LORA", "task_type": "SEQ_CLS"}));
        check_adapter_task(&d).unwrap();
        write(serde_json::json!({"peft_type": "LORA"}));
        check_adapter_task(&d).unwrap();
        write(serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM"}));
        let e = check_adapter_task(&d).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json: key `task_type`: \"CAUSAL_LM\": classify needs a sequence-classification adapter (SEQ_CLS)"),
            "{e}"
        );
    }
}
