//! Compare a base model with its adapters on a data file: greedy generation for every row from
//! the prompt template, scored against the completion template's text (ROUGE, BLEU, exact
//! match), and the teacher-forced loss of the reference completion (perplexity).
//!
//! The base model runs first, on the allocation-light decoder when it supports the model; each
//! adapter is then attached alone, run, and detached again.
use super::evaluate;
use crate::data::{self, BatchConfig, Batcher, Encoder, Example, TemplateSet};
use crate::eval::metrics;
use crate::generate::{decoder_for, generate, Decoder, Engine, GenerationConfig};
use crate::model::{ArchitectureKind, LoadedModel};
use crate::peft::{self, format::load_adapter};
use crate::progress::{NoProgress, Progress};
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Rouge,
    Bleu,
    /// Exact match after normalisation (lower case, no punctuation, single spaces).
    Accuracy,
    /// Perplexity of the reference completion given the prompt.
    Perplexity,
}

impl Metric {
    /// `rouge,bleu,accuracy,perplexity`.
    pub fn parse_list(s: &str) -> Result<Vec<Metric>> {
        s.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| match m.to_ascii_lowercase().as_str() {
                "rouge" => Ok(Metric::Rouge),
                "bleu" => Ok(Metric::Bleu),
                "accuracy" | "exact_match" => Ok(Metric::Accuracy),
                "perplexity" | "ppl" => Ok(Metric::Perplexity),
                other => Err(Error::msg(format!(
                    "--metrics: unknown metric `{other}` (rouge, bleu, accuracy, perplexity)"
                ))),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub template: String,
    pub completion: String,
    /// Render the prompt as a user turn of the model's chat template.
    pub chat: bool,
    pub limit: Option<usize>,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub metrics: Vec<Metric>,
    /// Print one line per model to stderr as it finishes (rows, seconds).
    pub progress: bool,
}

impl CompareOptions {
    /// The greedy generation settings every row is decoded with.
    pub fn generation_config(&self) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            ..GenerationConfig::default()
        }
    }

    /// Range checks (errors name the field: `limit`, `max_new_tokens`; the CLI shows the flag).
    pub fn validate(&self) -> Result<()> {
        if self.limit == Some(0) {
            return Err(Error::key(
                "eval",
                "limit",
                "got 0, expected at least 1 row (leave it out to evaluate every row)",
            ));
        }
        if self.metrics.is_empty() {
            return Err(Error::key(
                "eval",
                "metrics",
                "name at least one of rouge, bleu, accuracy, perplexity",
            ));
        }
        self.generation_config().validate()
    }
}

/// One model's scores (a row of the comparison). Metrics not asked for are absent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompareRow {
    /// "base" or the adapter folder.
    pub name: String,
    pub n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge2: Option<f64>,
    #[serde(rename = "rougeL", skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    #[serde(rename = "rougeLsum", skip_serializing_if = "Option::is_none")]
    pub rouge_lsum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bleu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// The generations, in row order (not in the JSON line).
    #[serde(skip)]
    pub predictions: Vec<String>,
    /// The references, in row order (not in the JSON line).
    #[serde(skip)]
    pub references: Vec<Vec<String>>,
}

/// The rows of `data` as examples (prompt + reference completion), with the reference texts.
fn examples(
    lm: &LoadedModel,
    data: &Path,
    o: &CompareOptions,
) -> Result<(Vec<Example>, Vec<Vec<String>>)> {
    let rows = data::read_rows(data, None)?;
    let templates = TemplateSet::new(std::slice::from_ref(&o.template), &o.completion, 0)?;
    let enc = Encoder::Pair {
        templates: templates.clone(),
        chat: o.chat,
    };
    let n = o.limit.unwrap_or(usize::MAX).min(rows.rows.len());
    let kind = lm.model.kind();
    if o.chat && kind != ArchitectureKind::Decoder {
        return Err(Error::msg(format!(
            "--chat: {} is not a decoder; chat templates are for decoders",
            lm.model.describe()
        )));
    }
    let mut exs = Vec::with_capacity(n);
    let mut refs = Vec::with_capacity(n);
    for row in &rows.rows[..n] {
        let src = rows.source(row);
        let (prompt, completion) = templates.render(row, &src)?;
        exs.push(match kind {
            ArchitectureKind::Decoder => enc.encode(&lm.tokenizer, row, src)?,
            _ => data::encode_pair_for(kind, &lm.tokenizer, &prompt, &completion, src)?,
        });
        refs.push(vec![completion.trim().to_string()]);
    }
    if exs.is_empty() {
        return Err(Error::file(data, "no rows to evaluate"));
    }
    Ok((exs, refs))
}

fn generate_all(
    dec: &mut dyn Decoder,
    lm: &LoadedModel,
    exs: &[Example],
    o: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let cfg = o.generation_config();
    exs.iter()
        .map(|ex| {
            let prompt = data::prompt_ids(lm.model.kind(), ex);
            let out = generate(dec, &lm.tokenizer, prompt, &cfg, &mut |_| {})
                .map_err(|e| Error::msg(format!("{}: {e}", ex.source)))?;
            progress.advance(1);
            Ok(out.text.trim().to_string())
        })
        .collect()
}

fn score(
    name: String,
    lm: &LoadedModel,
    preds: Vec<String>,
    refs: &[Vec<String>],
    exs: &[Example],
    o: &CompareOptions,
) -> Result<CompareRow> {
    let mut row = CompareRow {
        name,
        n: preds.len(),
        ..Default::default()
    };
    for m in &o.metrics {
        match m {
            Metric::Rouge => {
                let r = metrics::corpus_rouge(&preds, refs);
                row.rouge1 = Some(r.rouge1);
                row.rouge2 = Some(r.rouge2);
                row.rouge_l = Some(r.rouge_l);
                row.rouge_lsum = Some(r.rouge_lsum);
            }
            Metric::Bleu => row.bleu = Some(metrics::corpus_bleu(&preds, refs)),
            Metric::Accuracy => row.accuracy = Some(metrics::accuracy(&preds, refs, true)),
            Metric::Perplexity => {
                let longest = exs.iter().map(Example::len).max().unwrap_or(1);
                let mut bc = BatchConfig::new(1, longest, data::pad_id(&lm.tokenizer));
                bc.shuffle = false;
                if lm.model.kind() == ArchitectureKind::EncoderDecoder {
                    bc.targets = data::Targets::Decoder;
                }
                let b = Batcher::new(exs.to_vec(), bc, lm.model.device().clone())?;
                let r = evaluate(&*lm.model, &b, 0)?;
                row.loss = Some(r.loss);
                row.perplexity = Some(r.perplexity);
            }
        }
    }
    row.predictions = preds;
    row.references = refs.to_vec();
    Ok(row)
}

/// Score the base model of `lm` and each adapter in `adapters` on `data` (see the module docs).
/// `lm` must have no adapters attached; it has none again when this returns.
pub fn compare(
    lm: &mut LoadedModel,
    adapters: &[PathBuf],
    data: &Path,
    o: &CompareOptions,
) -> Result<Vec<CompareRow>> {
    compare_with_progress(lm, adapters, data, o, &NoProgress)
}

/// [`compare`], reporting each row generated (rows x models) to `progress`.
pub fn compare_with_progress(
    lm: &mut LoadedModel,
    adapters: &[PathBuf],
    data: &Path,
    o: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Vec<CompareRow>> {
    o.validate()?;
    if !peft::adapter_names(&*lm.model).is_empty() {
        return Err(Error::msg(
            "compare: the base model already has adapters attached",
        ));
    }
    let (exs, refs) = examples(lm, data, o)?;
    let models = 1 + adapters.len() as u64;
    progress.start("eval", exs.len() as u64 * models, "rows");
    let result = compare_models(lm, adapters, &exs, &refs, o, progress);
    progress.finish();
    result
}

fn compare_models(
    lm: &mut LoadedModel,
    adapters: &[PathBuf],
    exs: &[Example],
    refs: &[Vec<String>],
    o: &CompareOptions,
    progress: &dyn Progress,
) -> Result<Vec<CompareRow>> {
    let mut out = Vec::new();
    let t0 = std::time::Instant::now();
    let base_preds = {
        let mut dec = decoder_for(&*lm.model, Engine::Auto)?;
        generate_all(&mut *dec, lm, exs, o, progress)?
    };
    let note = |name: &str, t0: std::time::Instant| {
        if o.progress {
            progress.println(&format!(
                "{name}: {} rows in {:.1} s",
                exs.len(),
                t0.elapsed().as_secs_f64()
            ));
        }
    };
    note("base", t0);
    out.push(score("base".into(), lm, base_preds, refs, exs, o)?);
    for (i, dir) in adapters.iter().enumerate() {
        let name = format!("compare{i}");
        let loaded = load_adapter(&mut *lm.model, dir, &name)?;
        let t0 = std::time::Instant::now();
        let result = (|| {
            let mut dec = lm.model.decoder()?;
            let preds = generate_all(&mut *dec, lm, exs, o, progress)?;
            note(&dir.display().to_string(), t0);
            score(dir.display().to_string(), lm, preds, refs, exs, o)
        })();
        // A soft prompt lives in the model's input, not in its linears.
        if matches!(loaded.config, peft::AdapterConfig::Prompt(_)) {
            lm.model.set_virtual_prompt(None)?;
        } else {
            peft::remove_adapter(&mut *lm.model, &name)?;
        }
        out.push(result?);
    }
    Ok(out)
}

/// The rows side by side: one line per metric, one column per model.
pub fn table(rows: &[CompareRow]) -> String {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |name: &str, get: &dyn Fn(&CompareRow) -> Option<String>| {
        if rows.iter().any(|r| get(r).is_some()) {
            lines.push((
                name.to_string(),
                rows.iter()
                    .map(|r| get(r).unwrap_or_else(|| "-".into()))
                    .collect(),
            ));
        }
    };
    let f4 = |x: Option<f64>| x.map(|v| format!("{v:.4}"));
    add("rouge1", &|r| f4(r.rouge1));
    add("rouge2", &|r| f4(r.rouge2));
    add("rougeL", &|r| f4(r.rouge_l));
    add("rougeLsum", &|r| f4(r.rouge_lsum));
    add("bleu", &|r| r.bleu.map(|v| format!("{v:.2}")));
    add("accuracy", &|r| f4(r.accuracy));
    add("loss", &|r| f4(r.loss));
    add("perplexity", &|r| r.perplexity.map(|v| format!("{v:.3}")));
    add("n", &|r| Some(r.n.to_string()));
    let header: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let w0 = lines.iter().map(|(n, _)| n.len()).max().unwrap_or(6).max(6);
    let widths: Vec<usize> = (0..rows.len())
        .map(|j| {
            lines
                .iter()
                .map(|(_, v)| v[j].len())
                .chain(std::iter::once(header[j].len()))
                .max()
                .unwrap_or(4)
        })
        .collect();
    let mut s = format!("{:w0$}", "metric");
    for (j, h) in header.iter().enumerate() {
        s.push_str(&format!("  {:>w$}", h, w = widths[j]));
    }
    s.push('\n');
    for (name, vals) in &lines {
        s.push_str(&format!("{name:w0$}"));
        for (j, v) in vals.iter().enumerate() {
            s.push_str(&format!("  {:>w$}", v, w = widths[j]));
        }
        s.push('\n');
    }
    s
}
