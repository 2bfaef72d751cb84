//! Perplexity: mean negative log-likelihood of each token given the ones before it, with a
//! sliding window for texts longer than the context (the convention of transformers' perplexity
//! guide: windows of `window` tokens every `stride` tokens; each token is scored exactly once,
//! with as much left context as its window gives it).
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::{Tensor, D};
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

/// NLL of `ids[1..]` under the model. `window`/`stride` cap the context (usize::MAX: whole text,
/// limited to the model's context length).
pub fn sequence_nll(model: &Llama, ids: &[u32], window: usize, stride: usize) -> Result<Nll> {
    let ctx = model.cfg.max_position_embeddings;
    let window = window.min(ctx).max(2);
    let stride = stride.min(window).max(1);
    let mut out = Nll::default();
    if ids.len() < 2 {
        return Ok(out);
    }
    let mut prev_end = 0usize;
    let mut begin = 0usize;
    loop {
        let end = (begin + window).min(ids.len());
        let first_target = prev_end.max(begin + 1);
        if first_target < end {
            let input = Tensor::new(&ids[begin..end - 1], model.device())?.unsqueeze(0)?;
            let hidden = model.forward_hidden(&input, None, false)?;
            // Only positions that predict a scored target go through the LM head.
            let from = first_target - 1 - begin;
            let n = end - first_target;
            let h = hidden.narrow(1, from, n)?;
            let logits = model.lm_head.forward(&h)?.squeeze(0)?;
            let targets = Tensor::new(&ids[first_target..end], model.device())?;
            let logp = log_softmax_rows(&logits)?;
            let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
            let v: Vec<f32> = picked.to_vec1()?;
            out.total += v.iter().map(|&x| -(x as f64)).sum::<f64>();
            out.tokens += n;
        }
        prev_end = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    Ok(out)
}

fn log_softmax_rows(logits: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Texts to score from a file: a `.jsonl` file gives one text per line (field `text`, or the
/// only string field), anything else is one text.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
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
    model: &Llama,
    tok: &Tokenizer,
    path: &Path,
    window: usize,
    stride: usize,
) -> Result<Nll> {
    let mut total = Nll::default();
    for text in read_texts(path)? {
        let ids = tok.encode(&text, true)?;
        total.add(sequence_nll(model, &ids, window, stride)?);
    }
    if total.tokens == 0 {
        return Err(Error::file(
            path,
            "no tokens to score (every text is shorter than two tokens)",
        ));
    }
    Ok(total)
}
