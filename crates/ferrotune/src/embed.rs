//! Sentence embeddings of a data file's rows with a BERT-family encoder, as
//! sentence-transformers' `encode` computes them: tokenize (truncated to the model's
//! `max_seq_length`), run the encoder on batches padded to their longest row, pool over the
//! non-padding tokens, optionally L2-normalise. Rows are batched by length (less padding, the
//! same numbers) and come back in file order.
use crate::data::{read_rows, Format};
use crate::model::bert::{LoadedBert, Pooling};
use crate::model::BertInput;
use crate::progress::{NoProgress, Progress};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Most rows per batch (a larger `--batch-size` is a typo).
pub const MAX_BATCH: usize = 4096;

#[derive(Debug, Clone)]
pub struct EmbedOptions {
    /// The field holding the text in each row.
    pub field: String,
    /// `None`: the pooling the model folder's sentence-transformers config names (mean without one).
    pub pooling: Option<Pooling>,
    /// `None`: normalise when the folder's `modules.json` has a `Normalize` module.
    pub normalize: Option<bool>,
    pub batch_size: usize,
    /// Most tokens per row; `None`: `max_seq_length` of the folder, else the model's limit.
    pub max_length: Option<usize>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            field: "text".into(),
            pooling: None,
            normalize: None,
            batch_size: 32,
            max_length: None,
        }
    }
}

impl EmbedOptions {
    /// Check the values that do not depend on the model; errors name the option.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(Error::key(
                "embed",
                "batch_size",
                format!("{}: expected 1 to {MAX_BATCH}", self.batch_size),
            ));
        }
        if self.field.is_empty() {
            return Err(Error::key("embed", "field", "expected a field name"));
        }
        Ok(())
    }
}

/// The text of field `field` of every row of a JSONL / JSON / CSV / TSV / Parquet file; a row
/// without it, or with a value that is not a string, is a one-line error naming the file and line.
pub fn read_texts(path: &Path, field: &str, format: Option<Format>) -> Result<Vec<String>> {
    let rows = read_rows(path, format)?;
    rows.rows
        .iter()
        .map(|row| match row.fields.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Error::msg(format!(
                "{}: {}: field `{field}` is {}, expected a string",
                path.display(),
                row.loc,
                kind(other)
            ))),
            None => {
                let mut names: Vec<&str> = row.fields.keys().map(String::as_str).collect();
                names.truncate(8);
                Err(Error::msg(format!(
                    "{}: {}: no field `{field}` (the row has: {})",
                    path.display(),
                    row.loc,
                    if names.is_empty() {
                        "no fields".to_string()
                    } else {
                        names.join(", ")
                    }
                )))
            }
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One embedding per text, in order.
pub fn embed_texts(
    lm: &LoadedBert,
    texts: &[String],
    opts: &EmbedOptions,
) -> Result<Vec<Vec<f32>>> {
    embed_texts_with_progress(lm, texts, opts, &NoProgress)
}

/// [`embed_texts`], reporting rows done to `progress`.
pub fn embed_texts_with_progress(
    lm: &LoadedBert,
    texts: &[String],
    opts: &EmbedOptions,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f32>>> {
    opts.validate()?;
    let encoder = lm.input_encoder(opts.max_length)?;
    let pooling = opts.pooling.unwrap_or(lm.sentence.pooling);
    let normalize = opts.normalize.unwrap_or(lm.sentence.normalize);
    let rows = texts
        .iter()
        .map(|t| encoder.encode(t, None))
        .collect::<Result<Vec<_>>>()?;
    // Longest first, like sentence-transformers: similar lengths share a batch.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].ids.len()));
    let mut out = vec![Vec::new(); rows.len()];
    progress.start("embedding", rows.len() as u64, "rows");
    let pad = lm.model.cfg.pad_token_id;
    for chunk in order.chunks(opts.batch_size) {
        let batch: Vec<_> = chunk.iter().map(|&i| rows[i].clone()).collect();
        let input = BertInput::from_rows(&batch, pad, lm.model.device())?;
        let emb: Vec<Vec<f32>> = lm.model.embed(&input, pooling, normalize)?.to_vec2()?;
        for (&i, e) in chunk.iter().zip(emb) {
            out[i] = e;
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferrotune-embed-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn texts_come_from_the_field_and_bad_rows_name_their_line() {
        let p = file(
            "ok.jsonl",
            "{\"text\": \"a\"}\n{\"text\": \"b c\", \"x\": 1}\n",
        );
        assert_eq!(read_texts(&p, "text", None).unwrap(), ["a", "b c"]);
        let p = file(
            "missing.jsonl",
            "{\"text\": \"a\"}\n{\"sentence\": \"b\"}\n",
        );
        let e = read_texts(&p, "text", None).unwrap_err().to_string();
        assert!(
            e.ends_with("missing.jsonl: line 2: no field `text` (the row has: sentence)"),
            "{e}"
        );
        let p = file("number.jsonl", "{\"text\": 3}\n");
        let e = read_texts(&p, "text", None).unwrap_err().to_string();
        assert!(
            e.contains("line 1: field `text` is a number, expected a string"),
            "{e}"
        );
        let p = file("rows.tsv", "text\tlabel\nhello\t1\n");
        assert_eq!(read_texts(&p, "text", None).unwrap(), ["hello"]);
    }

    #[test]
    fn options_are_checked() {
        let bad = EmbedOptions {
            batch_size: 0,
            ..Default::default()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(
            e.contains("batch_size") && e.contains("expected 1 to"),
            "{e}"
        );
    }
}
