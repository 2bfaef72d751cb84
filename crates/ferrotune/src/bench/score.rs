//! The model side of a benchmark: log-likelihoods of continuations and greedy generations,
//! tokenized as lm-eval's HF backend tokenizes them.
//!
//! Scoring shares work between requests: requests are sorted by their tokens, so a question's
//! choices (one context, several continuations) and every question of a few-shot task (the same
//! examples in front) follow each other, and each request rewinds the KV cache only to where it
//! departs from the one before — one prefill of the shared prefix, then only the new tokens.
use crate::engine::FastDecoder;
use crate::generate::{decoder_for, generate, Decoder, Engine, GenerationConfig};
use crate::model::Model;
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One log-likelihood request in tokens: the continuation scored given the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// Its answer: the summed log-probability and whether greedy decoding reproduces it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    pub ll: f64,
    pub is_greedy: bool,
}

/// lm-eval's `tok_encode`: the tokenizer's defaults (special tokens added as the tokenizer adds
/// them), except for text that already starts with the BOS string.
pub fn tok_encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let starts_with_bos = tok
        .bos_token()
        .is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tok.encode(text, !starts_with_bos)
}

/// The token used as context when a request has none (lm-eval's `prefix_token_id`: BOS, else EOS).
pub fn prefix_token(tok: &Tokenizer) -> Result<u32> {
    tok.bos_id()
        .or_else(|| tok.eos_ids().first().copied())
        .ok_or_else(|| {
            Error::msg("the tokenizer has neither a BOS nor an EOS token to start an empty context")
        })
}

/// lm-eval's `loglikelihood` + `_encode_pair` for a decoder: trailing spaces of the context move
/// to the continuation; the continuation's tokens are those of `context + continuation` after the
/// context's own token count. An empty context becomes the prefix token. An encoder-decoder
/// encodes the two separately.
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
    seq2seq: bool,
) -> Result<TokenRequest> {
    if context.is_empty() {
        let cont = tok.encode(continuation, false)?;
        let p = prefix_token(tok)?;
        return Ok(match cont.first() {
            Some(&first) if first == p => TokenRequest {
                context: vec![first],
                continuation: cont[1..].to_vec(),
            },
            _ => TokenRequest {
                context: vec![p],
                continuation: cont,
            },
        });
    }
    let trimmed = context.trim_end();
    let (ctx, cont) = if trimmed.len() < context.len() {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    if seq2seq {
        return Ok(TokenRequest {
            context: tok_encode(tok, &ctx)?,
            continuation: tok.encode(&cont, false)?,
        });
    }
    let whole = tok_encode(tok, &format!("{ctx}{cont}"))?;
    let context = tok_encode(tok, &ctx)?;
    let continuation = whole.get(context.len()..).unwrap_or_default().to_vec();
    Ok(TokenRequest {
        context,
        continuation,
    })
}

/// lm-eval's `get_rolling_token_windows` (context_len 1) + `make_disjoint_window`: the token
/// requests whose log-likelihoods sum to the whole text's.
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<TokenRequest> {
    let mut out = Vec::new();
    if tokens.is_empty() || max_len == 0 {
        return out;
    }
    let first = max_len.min(tokens.len());
    let mut push = |input: Vec<u32>, pred: Vec<u32>| {
        // make_disjoint_window: the context is the input without the predicted part.
        let keep = input.len() + 1 - pred.len().min(input.len() + 1);
        out.push(TokenRequest {
            context: input[..keep].to_vec(),
            continuation: pred,
        });
    };
    let mut input = vec![prefix];
    input.extend_from_slice(&tokens[..first - 1]);
    push(input, tokens[..first].to_vec());
    let mut predicted = first;
    while predicted < tokens.len() {
        let n = (tokens.len() - predicted).min(max_len);
        let end = predicted + n;
        let start = end.saturating_sub(max_len + 1);
        push(
            tokens[start..end - 1].to_vec(),
            tokens[end - n..end].to_vec(),
        );
        predicted += n;
    }
    out
}

/// Log-softmax score of `targets` under `rows` (one row of `vocab` logits per target), in f64.
fn score_rows(rows: &[f32], vocab: usize, targets: &[u32]) -> Result<Loglikelihood> {
    let mut ll = 0f64;
    let mut greedy = true;
    for (row, &t) in rows.chunks_exact(vocab).zip(targets) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row
            .iter()
            .map(|&x| (f64::from(x) - f64::from(max)).exp())
            .sum();
        let lse = f64::from(max) + sum.ln();
        let x = *row.get(t as usize).ok_or_else(|| {
            Error::msg(format!(
                "token {t} is outside the model's vocabulary of {vocab}"
            ))
        })?;
        ll += f64::from(x) - lse;
        let argmax = crate::generate::argmax(row);
        greedy &= argmax == t;
    }
    Ok(Loglikelihood {
        ll,
        is_greedy: greedy,
    })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Log-likelihoods of `reqs` under `model` (a decoder: context and continuation cut from the
/// left to `max_len + 1` tokens as lm-eval does; an encoder-decoder: context encoded).
pub fn loglikelihoods(
    model: &dyn Model,
    reqs: &[TokenRequest],
    max_len: usize,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Loglikelihood>> {
    let mut out = vec![
        Loglikelihood {
            ll: 0.0,
            is_greedy: true
        };
        reqs.len()
    ];
    // Sorted by their tokens: shared prefixes are neighbours.
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (&reqs[a], &reqs[b]);
        ra.context
            .iter()
            .chain(&ra.continuation)
            .cmp(rb.context.iter().chain(&rb.continuation))
    });
    progress.start("scoring", reqs.len() as u64, "requests");
    let result = if model.virtual_prompt().is_none() {
        FastDecoder::new(model).map(|fast| {
            score_fast(
                fast,
                reqs,
                &order,
                max_len,
                batch.max(1),
                &mut out,
                progress,
            )
        })
    } else {
        None
    };
    let result = match result {
        Some(r) => r,
        None => score_with_decoder(model, reqs, &order, max_len, &mut out, progress),
    };
    progress.finish();
    result.map(|_| out)
}

/// The input a decoder reads for a request, and how many of its last positions are scored.
fn causal_input(r: &TokenRequest, max_len: usize) -> Result<(Vec<u32>, usize)> {
    let m = r.continuation.len();
    if m > max_len {
        return Err(Error::msg(format!(
            "a continuation of {m} tokens is longer than the model's {max_len}-token context"
        )));
    }
    if r.context.is_empty() {
        return Err(Error::msg(
            "a request's context encodes to no tokens (a context of only whitespace?): nothing to condition on",
        ));
    }
    let mut full: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
    if full.len() > max_len + 1 {
        full.drain(..full.len() - (max_len + 1));
    }
    full.pop();
    Ok((full, m))
}

/// Most tokens one batched forward runs (bounds the activations: about 3 MB per token for a
/// 135M model, 0.5 GB at this size, less for larger hidden sizes per token budget share).
const BATCH_TOKENS: usize = 2048;
/// Most rows of logits one batch returns (each row is a vocabulary of f32).
const BATCH_ROWS: usize = 512;

fn score_fast(
    mut dec: FastDecoder,
    reqs: &[TokenRequest],
    order: &[usize],
    max_len: usize,
    batch: usize,
    out: &mut [Loglikelihood],
    progress: &dyn Progress,
) -> Result<()> {
    let vocab = dec.vocab_size();
    // One sequence per distinct input: a question's one-token choices all read the logits of
    // its context's last position (lm-eval's one-token-continuation cache), so they share one.
    struct Seq {
        input: Vec<u32>,
        /// First position whose logits a request of this input needs.
        from: usize,
        /// (request, its first scored position).
        reqs: Vec<(usize, usize)>,
    }
    let mut seqs: Vec<Seq> = Vec::new();
    let mut by_input: std::collections::HashMap<Vec<u32>, usize> = Default::default();
    for &i in order {
        let r = &reqs[i];
        if r.continuation.is_empty() {
            progress.advance(1);
            continue;
        }
        let (input, m) = causal_input(r, max_len)?;
        let first = input.len() - m;
        match by_input.get(&input) {
            Some(&s) => {
                seqs[s].from = seqs[s].from.min(first);
                seqs[s].reqs.push((i, first));
            }
            None => {
                by_input.insert(input.clone(), seqs.len());
                seqs.push(Seq {
                    input,
                    from: first,
                    reqs: vec![(i, first)],
                });
            }
        }
    }
    drop(by_input);
    // Sorted order makes neighbours share prefixes; batches take neighbours, run their common
    // prefix once into the cache (kept for the next batch when it shares it: few-shot
    // examples), then every sequence's own tokens in one pass.
    let mut cached: Vec<u32> = Vec::new();
    let mut start = 0;
    while start < seqs.len() {
        let mut end = start + 1;
        let (mut tokens, mut rows) = (
            seqs[start].input.len(),
            seqs[start].input.len() - seqs[start].from,
        );
        while end < seqs.len() && end - start < batch {
            let s = &seqs[end];
            let (t, r) = (s.input.len(), s.input.len() - s.from);
            if tokens + t > BATCH_TOKENS || rows + r > BATCH_ROWS {
                break;
            }
            tokens += t;
            rows += r;
            end += 1;
        }
        let group = &seqs[start..end];
        // The prefix every sequence of the batch shares, cut before any scored position.
        let shared = common_prefix(&group[0].input, &group[group.len() - 1].input)
            .min(group.iter().map(|s| s.from).min().unwrap_or(0));
        let keep = common_prefix(&cached, &group[0].input)
            .min(dec.cached())
            .min(shared);
        if shared > keep {
            dec.extend(keep, &group[0].input[keep..shared], shared - keep)?;
        }
        let parts: Vec<(&[u32], usize)> = group
            .iter()
            .map(|s| (&s.input[shared..], s.from - shared))
            .collect();
        let logits = dec.score_batch(shared, &parts)?;
        let want_rows: usize = group.iter().map(|s| s.input.len() - s.from).sum();
        if logits.len() != want_rows * vocab {
            return Err(Error::msg(format!(
                "engine: {} logits for {want_rows} scored positions of {vocab}",
                logits.len()
            )));
        }
        cached = if group.len() == 1 {
            group[0].input.clone()
        } else {
            group[0].input[..shared].to_vec()
        };
        let mut at = 0;
        for s in group {
            let n = s.input.len() - s.from;
            let rows = &logits[at * vocab..(at + n) * vocab];
            for &(i, first) in &s.reqs {
                let skip = first - s.from;
                out[i] = score_rows(&rows[skip * vocab..], vocab, &reqs[i].continuation)?;
                progress.advance(1);
            }
            at += n;
        }
        start = end;
    }
    Ok(())
}

/// Any model, through its own decoder (adapters, soft prompts, encoder-decoders, GPUs): one
/// prefill of the context per request, then a step per continuation token.
fn score_with_decoder(
    model: &dyn Model,
    reqs: &[TokenRequest],
    order: &[usize],
    max_len: usize,
    out: &mut [Loglikelihood],
    progress: &dyn Progress,
) -> Result<()> {
    let mut dec = decoder_for(model, Engine::Model)?;
    let causal = dec.prompt_in_context();
    for &i in order {
        let r = &reqs[i];
        if r.continuation.is_empty() {
            progress.advance(1);
            continue;
        }
        let (prompt, targets): (Vec<u32>, &[u32]) = if causal {
            let (input, m) = causal_input(r, max_len)?;
            let first = input.len() - m;
            (input[..=first].to_vec(), &r.continuation)
        } else {
            (r.context.clone(), &r.continuation)
        };
        let mut rows = dec.prefill(&prompt)?;
        let vocab = rows.len();
        for &t in &targets[..targets.len() - 1] {
            rows.extend(dec.step(t)?);
        }
        out[i] = score_rows(&rows, vocab, targets)?;
        progress.advance(1);
    }
    Ok(())
}

/// A `generate_until` request after tokenization.
pub struct GenRequest {
    pub context: Vec<u32>,
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// Generate for each request, cut at the first stop string (lm-eval's
/// `postprocess_generated_text`); EOS stops as in lm-eval (its text is one of the stops).
pub fn generations(
    model: &dyn Model,
    tok: &Tokenizer,
    reqs: &[GenRequest],
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let mut dec: Box<dyn Decoder + '_> = decoder_for(model, Engine::Auto)?;
    let ctx = dec.context_length();
    let causal = dec.prompt_in_context();
    progress.start("generating", reqs.len() as u64, "requests");
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        // lm-eval keeps the last (max_length - max_gen_toks) context tokens of a decoder.
        let mut ids = r.context.clone();
        if causal {
            let room = ctx.saturating_sub(r.max_gen_toks).max(1);
            if ids.len() > room {
                ids.drain(..ids.len() - room);
            }
        }
        let cfg = GenerationConfig {
            max_new_tokens: r.max_gen_toks,
            temperature: r.temperature,
            top_k: r.top_k,
            top_p: r.top_p,
            seed: r.seed,
            stop: r.until.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..GenerationConfig::default()
        };
        let g = match generate(dec.as_mut(), tok, &ids, &cfg, &mut |_| {}) {
            Ok(g) => g,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        let mut text = tok.decode(&g.token_ids, true)?;
        for stop in &r.until {
            if !stop.is_empty() {
                if let Some(at) = text.find(stop.as_str()) {
                    text.truncate(at);
                }
            }
        }
        out.push(text);
        progress.advance(1);
    }
    progress.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{config_from_hf_dir, Llama, LoadOptions, SafetensorsSource};
    use candle_core::Device;

    fn tiny() -> Llama {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        Llama::load(&src, &cfg).unwrap()
    }

    /// Questions with shared contexts (one- and many-token choices), a shared few-shot-like
    /// prefix, a duplicate request, an empty continuation and a context cut to the model's
    /// length: every batch size scores each request as the model's own decoder does, one
    /// request at a time.
    #[test]
    fn batched_scoring_matches_one_request_at_a_time() {
        let m = tiny();
        let shots: Vec<u32> = (0..20u32).map(|i| (i * 7 + 3) % 200 + 10).collect();
        let mut reqs = Vec::new();
        for q in 0..9u32 {
            let mut context: Vec<u32> = if q % 3 == 0 {
                Vec::new()
            } else {
                shots.clone()
            };
            context.extend((0..(4 + q % 4)).map(|i| (q * 31 + i * 13) % 200 + 10));
            for c in 0..3u32 {
                let len = if q % 2 == 0 { 1 } else { 1 + (c as usize) };
                reqs.push(TokenRequest {
                    context: context.clone(),
                    continuation: (0..len as u32)
                        .map(|i| (c * 41 + i * 5 + q) % 200 + 10)
                        .collect(),
                });
            }
        }
        reqs.push(reqs[4].clone());
        reqs.push(TokenRequest {
            context: shots.clone(),
            continuation: Vec::new(),
        });
        let max_len = 24; // cuts the longest contexts from the left, as lm-eval does
        let mut order: Vec<usize> = (0..reqs.len()).collect();
        order.reverse();
        let mut want = vec![
            Loglikelihood {
                ll: 0.0,
                is_greedy: true
            };
            reqs.len()
        ];
        score_with_decoder(
            &m,
            &reqs,
            &order,
            max_len,
            &mut want,
            &crate::progress::NoProgress,
        )
        .unwrap();
        for batch in [1, 2, 5, 64] {
            let got =
                loglikelihoods(&m, &reqs, max_len, batch, &crate::progress::NoProgress).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g.ll - w.ll).abs() < 1e-4,
                    "batch {batch}, request {i}: {} vs {}",
                    g.ll,
                    w.ll
                );
                assert_eq!(g.is_greedy, w.is_greedy, "batch {batch}, request {i}");
            }
        }
        assert_eq!(want[reqs.len() - 1].ll, 0.0);
        assert!(want[..reqs.len() - 1].iter().all(|l| l.ll < 0.0));
    }
}
