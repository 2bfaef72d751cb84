//! Perplexity, through the model interface (any family that predicts tokens):
//! - of raw text ([`file_perplexity`], decoders): mean negative log-likelihood of each token
//!   given the ones before it, with a sliding window for texts longer than the context (the
//!   convention of transformers' perplexity guide: windows of `window` tokens every `stride`
//!   tokens; each token is scored exactly once, with as much left context as its window gives
//!   it);
//! - of completions given prompts ([`completion_perplexity`], decoders and encoder-decoders):
//!   mean NLL of the completion tokens (EOS included) given the prompt, as the model is trained.
use crate::data::{self, BatchConfig, Batcher, Example, TemplateSet, IGNORE};
use crate::model::{ArchitectureKind, Model};
use crate::progress::{NoProgress, Progress};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::Path;

/// Sum of NLL (nats) and the number of scored tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    pub total: f64,
    pub tokens: usize,
}

impl Nll {
    pub fn add(&mut self, o: Nll) {
        self.total += o.total;
        self.tokens += o.tokens;
    }
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.total / self.tokens as f64
        }
    }
    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
}

/// Checks sliding-window settings: a window needs at least 2 tokens (one to predict from, one
/// to score) and windows must advance. Errors name the field (`window`, `stride`).
pub fn check_window(window: usize, stride: usize) -> Result<()> {
    if window < 2 {
        return Err(Error::key(
            "perplexity",
            "window",
            format!("got {window}, expected at least 2 tokens (one to predict from, one to score)"),
        ));
    }
    if stride == 0 {
        return Err(Error::key(
            "perplexity",
            "stride",
            "got 0, expected at least 1 token (windows must advance)",
        ));
    }
    Ok(())
}

/// NLL of `ids[1..]` under the model (a decoder). `window`/`stride` cap the context
/// (usize::MAX: whole text, limited to the model's context length; a stride larger than the
/// window is the window). A window under 2 tokens or a stride of 0 is an error (see
/// [`check_window`]).
pub fn sequence_nll(model: &dyn Model, ids: &[u32], window: usize, stride: usize) -> Result<Nll> {
    sequence_nll_counted(model, ids, window, stride, &mut |_| {})
}

/// Text is scored left to right: only a decoder predicts each token from the ones before it.
fn check_decoder(model: &dyn Model) -> Result<()> {
    if model.kind() != ArchitectureKind::Decoder {
        return Err(Error::msg(format!(
            "{} is not a decoder: perplexity of raw text needs one; score completions given prompts instead (--data with --template and --completion)",
            model.describe()
        )));
    }
    Ok(())
}

/// The summed NLL of `ex`'s trained labels (one example, one batch: no padding) and how many.
fn example_nll(model: &dyn Model, ex: Example, targets: data::Targets) -> Result<Nll> {
    let len = ex.len();
    let bc = BatchConfig {
        shuffle: false,
        ..BatchConfig::new(1, len.max(1), 0).with_targets(targets)
    };
    let batch = Batcher::new(vec![ex], bc, model.device().clone())?.build(&[vec![0]])?;
    let (sum, n) = model.loss_sum(&batch, false)?;
    Ok(Nll {
        total: sum.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
        tokens: n,
    })
}

/// [`sequence_nll`], calling `scored(n)` as each window scores its `n` tokens.
fn sequence_nll_counted(
    model: &dyn Model,
    ids: &[u32],
    window: usize,
    stride: usize,
    scored: &mut dyn FnMut(usize),
) -> Result<Nll> {
    check_window(window, stride)?;
    check_decoder(model)?;
    let ctx = model.context_length().unwrap_or(usize::MAX);
    let window = window.min(ctx).max(2);
    let stride = stride.min(window);
    let mut out = Nll::default();
    if ids.len() < 2 {
        return Ok(out);
    }
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = begin.saturating_add(window).min(ids.len());
        let first_target = prev_end.max(begin + 1);
        if first_target < end {
            // Next-token labels: only the targets of this window are scored.
            let input_ids = ids[begin..end].to_vec();
            let labels = (begin..end)
                .map(|i| {
                    if i >= first_target {
                        i64::from(ids[i])
                    } else {
                        IGNORE
                    }
                })
                .collect();
            let ex = Example {
                input_ids,
                labels,
                source: data::Source {
                    file: std::sync::Arc::from(Path::new("text")),
                    loc: data::Loc::Line(1),
                    task: None,
                },
            };
            let nll = example_nll(model, ex, data::Targets::NextToken)?;
            out.add(nll);
            scored(nll.tokens);
        }
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

/// Mean NLL of each row's completion given its prompt (`template` and `completion` render a
/// row of `data`, as in training): the completion tokens and EOS are scored, as the model is
/// trained on them (a decoder reads the prompt before them, an encoder-decoder encodes it).
/// `limit`: the first rows only.
pub fn completion_perplexity(
    model: &dyn Model,
    tok: &Tokenizer,
    data: &Path,
    template: &str,
    completion: &str,
    limit: Option<usize>,
    progress: &dyn Progress,
) -> Result<Nll> {
    let kind = model.kind();
    let targets = match kind {
        ArchitectureKind::Decoder => data::Targets::NextToken,
        ArchitectureKind::EncoderDecoder => data::Targets::Decoder,
        ArchitectureKind::Encoder => {
            return Err(Error::msg(format!(
            "{} is an encoder: it does not predict completions, so it has no completion perplexity",
            model.describe()
        )))
        }
    };
    let rows = data::read_rows(data, None)?;
    let templates = TemplateSet::new(&[template.to_string()], completion, 0)?;
    let n = limit.unwrap_or(usize::MAX).min(rows.rows.len());
    if n == 0 {
        return Err(Error::file(data, "no rows to score"));
    }
    let mut exs = Vec::with_capacity(n);
    for row in &rows.rows[..n] {
        let src = rows.source(row);
        let (prompt, completion) = templates.render(row, &src)?;
        let ex = data::encode_pair_for(kind, tok, &prompt, &completion, src)?;
        if let Some(ctx) = model.context_length() {
            if ex.len() > ctx {
                return Err(Error::msg(format!(
                    "{}: {} tokens, more than the model's context window of {ctx}",
                    ex.source,
                    ex.len()
                )));
            }
        }
        exs.push(ex);
    }
    progress.start("perplexity", exs.len() as u64, "rows");
    let mut total = Nll::default();
    for ex in exs {
        match example_nll(model, ex, targets) {
            Ok(nll) => total.add(nll),
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
        progress.advance(1);
    }
    progress.finish();
    Ok(total)
}

/// Texts to score from a file: a `.jsonl` file gives one text per line (field `text`, or the
/// only string field), anything else is one text.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    // 1 GiB of text is about 250M tokens: far past what one run scores
    let content = crate::fsutil::read_text_limited(path, 1 << 30)?;
    let is_jsonl = path.extension().map(|e| e == "jsonl").unwrap_or(false);
    if !is_jsonl {
        if content.trim().is_empty() {
            return Err(Error::file(path, "file is empty"));
        }
        return Ok(vec![content]);
    }
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        let text = match v.get("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(Error::file(
                    path,
                    format!("line {}: field `text` is not a string", i + 1),
                ))
            }
            None => {
                return Err(Error::file(
                    path,
                    format!("line {}: missing field `text`", i + 1),
                ))
            }
        };
        texts.push(text);
    }
    if texts.is_empty() {
        return Err(Error::file(path, "no lines to score"));
    }
    Ok(texts)
}

/// Perplexity of a model over a file (see [`read_texts`]); each text is scored independently.
pub fn file_perplexity(
    model: &dyn Model,
    tok: &Tokenizer,
    path: &Path,
    window: usize,
    stride: usize,
) -> Result<Nll> {
    file_perplexity_with_progress(model, tok, path, window, stride, &NoProgress)
}

/// [`file_perplexity`], reporting the tokens scored to `progress`.
pub fn file_perplexity_with_progress(
    model: &dyn Model,
    tok: &Tokenizer,
    path: &Path,
    window: usize,
    stride: usize,
    progress: &dyn Progress,
) -> Result<Nll> {
    check_window(window, stride)?;
    check_decoder(model)?;
    let texts = read_texts(path)?
        .iter()
        .map(|text| tok.encode(text, true))
        .collect::<Result<Vec<_>>>()?;
    let to_score: usize = texts.iter().map(|ids| ids.len().saturating_sub(1)).sum();
    if to_score == 0 {
        return Err(Error::file(
            path,
            "no tokens to score (every text is shorter than two tokens)",
        ));
    }
    progress.start("perplexity", to_score as u64, "tokens");
    let mut total = Nll::default();
    for ids in &texts {
        let nll = sequence_nll_counted(model, ids, window, stride, &mut |n| {
            progress.advance(n as u64)
        });
        match nll {
            Ok(nll) => total.add(nll),
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
    }
    progress.finish();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{config_from_hf_dir, Llama, LoadOptions, SafetensorsSource};
    use crate::progress::Recorder;

    fn tiny_model() -> Llama {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &candle_core::Device::Cpu)
            .unwrap();
        Llama::load(&src, &cfg).unwrap()
    }

    fn ids(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| (i * 37 + 11) % 200).collect()
    }

    #[test]
    fn window_under_two_or_stride_zero_is_an_error_naming_it() {
        let m = tiny_model();
        let e = sequence_nll(&m, &ids(40), 0, 4).unwrap_err().to_string();
        assert!(e.contains("`window`") && e.contains("got 0"), "{e}");
        let e = sequence_nll(&m, &ids(40), 1, 1).unwrap_err().to_string();
        assert!(e.contains("`window`") && e.contains("got 1"), "{e}");
        // A stride of 0 once became 1: one forward pass per token over the whole window.
        let e = sequence_nll(&m, &ids(40), 16, 0).unwrap_err().to_string();
        assert!(e.contains("`stride`") && e.contains("got 0"), "{e}");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn oversized_window_and_stride_are_clamped_to_the_context_and_window() {
        let m = tiny_model();
        let ctx = m.cfg.max_position_embeddings;
        let xs = ids(ctx + 40);
        let at_context = sequence_nll(&m, &xs, ctx, ctx).unwrap();
        assert!(at_context.tokens > ctx, "{at_context:?}");
        assert_eq!(
            sequence_nll(&m, &xs, usize::MAX, usize::MAX).unwrap(),
            at_context
        );
        assert_eq!(sequence_nll(&m, &xs, ctx, 10 * ctx).unwrap(), at_context);
    }

    #[test]
    fn file_perplexity_reports_every_scored_token() {
        let m = tiny_model();
        let tok = crate::data::testutil::tiny_tokenizer(None);
        let d = crate::data::testutil::TempDir::new("ppl-progress");
        let text = "the cat sat on the mat ".repeat(12);
        d.write("t.txt", &text);
        let rec = Recorder::default();
        let nll = file_perplexity_with_progress(&m, &tok, &d.path("t.txt"), 16, 8, &rec).unwrap();
        let events = rec.0.borrow();
        assert_eq!(
            events[0],
            ("start perplexity tokens".into(), nll.tokens as u64)
        );
        assert_eq!(events.last().unwrap().0, "finish");
        assert_eq!(rec.advanced(), nll.tokens as u64);
        // Several windows: the bar moves more than once.
        assert!(events.iter().filter(|e| e.0 == "advance").count() > 3);
        assert_eq!(
            nll,
            file_perplexity(&m, &tok, &d.path("t.txt"), 16, 8).unwrap()
        );
    }
}
