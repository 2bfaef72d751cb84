//! Beam search for any model that gives next-token logits per beam (encoder-decoders such as
//! T5, and decoders alike): the model implements [`BeamDecoder`], [`beam_search`] does the rest.
//!
//! It is transformers' `generate(num_beams=N)` (the vectorized beam search of transformers >=
//! 4.50, `GenerationMixin._beam_search`) step for step, for one prompt, so that the same
//! logits give the same token ids:
//! - each step keeps the `K = max(2, 1 + #eos) · N` best continuations over all beams by
//!   accumulated log-probability (float32, like transformers);
//! - continuations that end (an EOS token, or the token budget) compete for the `N` finished
//!   slots with the score `sum_logprobs / generated_len ^ length_penalty`, but only if they are
//!   among the first `N` of the `K`; the `N` best others run on;
//! - `early_stopping` decides when to stop (see [`EarlyStopping`]); transformers' default,
//!   [`EarlyStopping::Heuristic`], stops once the best running beam, scored at the current
//!   length, cannot beat the worst finished hypothesis.
//!
//! Scores that transformers masks with `-1e9` are masked with the same float32 value, so ties and
//! orderings come out the same.
use crate::generate::{GenerationOutput, StopReason, MAX_NEW_TOKENS_LIMIT};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::time::Instant;

/// transformers' masking value for scores that must not win.
const MASK: f32 = -1.0e9;

/// The most beams accepted: far more than anyone uses; each beam holds its own KV cache.
pub const MAX_BEAMS: usize = 256;

/// When beam search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `early_stopping=False`, transformers' default (T5 too): stop once the best running
    /// beam, scored at the current length, cannot beat the worst of `num_beams` finished ones.
    Heuristic,
    /// `early_stopping=True`: stop as soon as `num_beams` hypotheses are finished.
    Eager,
    /// `early_stopping="never"`: with a positive length penalty, a running beam is scored at the
    /// maximum length before giving up on it (the canonical beam search).
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeamConfig {
    /// Beams kept at each step (at least 1).
    pub num_beams: usize,
    /// Tokens to generate at most (EOS included).
    pub max_new_tokens: usize,
    /// Exponent of the generated length that divides a finished hypothesis' log-probability
    /// (1.0: the mean log-probability per token; 0.0: the plain sum).
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    /// Tokens that end a hypothesis. Empty: only the token budget does.
    pub eos_ids: Vec<u32>,
}

impl Default for BeamConfig {
    fn default() -> Self {
        Self {
            num_beams: 4,
            max_new_tokens: 256,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            eos_ids: Vec::new(),
        }
    }
}

impl BeamConfig {
    /// Range checks; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::key("generation config", key, what));
        if self.num_beams == 0 || self.num_beams > MAX_BEAMS {
            return bad(
                "num_beams",
                format!(
                    "got {}, expected 1 to {MAX_BEAMS} (1 decodes greedily)",
                    self.num_beams
                ),
            );
        }
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return bad(
                "max_new_tokens",
                format!(
                    "got {}, expected at most {MAX_NEW_TOKENS_LIMIT}",
                    self.max_new_tokens
                ),
            );
        }
        if !self.length_penalty.is_finite() {
            return bad(
                "length_penalty",
                format!("got {}, expected a finite number", self.length_penalty),
            );
        }
        Ok(())
    }
}

/// A model driven by beam search. It keeps one state (KV cache) per live beam.
pub trait BeamDecoder {
    /// Start `num_beams` identical beams from the prompt; return the next-token logits of each
    /// (`num_beams` rows of vocabulary size).
    fn start(&mut self, num_beams: usize) -> Result<Vec<Vec<f32>>>;
    /// Move to the next step: new beam `i` continues old beam `parents[i]` with `tokens[i]`.
    /// Return the next-token logits of each new beam.
    fn advance(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
}

/// A finished hypothesis.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens, the end-of-sequence token included when one ended it.
    pub tokens: Vec<u32>,
    /// Length-penalized log-probability (what beams are ranked by).
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BeamOutput {
    /// The best hypothesis (what transformers' `generate` returns).
    pub best: Hypothesis,
    /// Every finished hypothesis kept at the end, best first (at most `num_beams`).
    pub hypotheses: Vec<Hypothesis>,
}

/// Log-softmax of one row in float64, rounded to float32.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Indices of the `k` largest of `scores`, best first; ties go to the lower index.
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(idx.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// `x / n^length_penalty` as transformers computes it: the divisor in float64 (a Python
/// float), rounded to float32 for the division (torch's scalar operand of a float32 tensor).
fn penalized(x: f32, n: usize, length_penalty: f64) -> f32 {
    x / (n as f64).powf(length_penalty) as f32
}

struct Slot {
    tokens: Vec<u32>,
    score: f32,
    finished: bool,
}

/// Run beam search on `dec` (which already holds the prompt). With `max_new_tokens == 0` the
/// model is not run and the result is empty.
pub fn beam_search(dec: &mut dyn BeamDecoder, cfg: &BeamConfig) -> Result<BeamOutput> {
    cfg.validate()?;
    let n = cfg.num_beams;
    if cfg.max_new_tokens == 0 {
        let empty = Hypothesis {
            tokens: Vec::new(),
            score: 0.0,
        };
        return Ok(BeamOutput {
            best: empty.clone(),
            hypotheses: vec![empty],
        });
    }
    let k = (1 + cfg.eos_ids.len()).max(2) * n;
    let lp = cfg.length_penalty;
    // Running beams: only the first one is live at the start, so the first step does not pick
    // the same continuation from N identical beams.
    let mut running: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut running_scores: Vec<f32> = (0..n).map(|i| if i == 0 { 0.0 } else { MASK }).collect();
    let mut finished: Vec<Slot> = (0..n)
        .map(|_| Slot {
            tokens: Vec::new(),
            score: MASK,
            finished: false,
        })
        .collect();
    let mut improvable = true;
    let mut logits = dec.start(n)?;
    let mut generated = 0usize;
    loop {
        if logits.len() != n {
            return Err(Error::msg(format!(
                "beam search: the model returned logits for {} beams, expected {n}",
                logits.len()
            )));
        }
        let vocab = logits[0].len();
        if vocab == 0 || logits.iter().any(|l| l.len() != vocab) {
            return Err(Error::msg(
                "beam search: the model returned rows of different (or zero) vocabulary sizes",
            ));
        }
        // Accumulated log-probabilities of every (beam, token), flattened beam-major.
        let mut acc = Vec::with_capacity(n * vocab);
        for (row, &s) in logits.iter().zip(&running_scores) {
            acc.extend(log_softmax(row).into_iter().map(|x| x + s));
        }
        let cand = top_k(&acc, k);
        let parent = |j: usize| cand[j] / vocab;
        let token = |j: usize| (cand[j] % vocab) as u32;
        let score = |j: usize| acc[cand[j]];
        let last_step = generated + 1 >= cfg.max_new_tokens;
        let hits: Vec<bool> = (0..cand.len())
            .map(|j| last_step || cfg.eos_ids.contains(&token(j)))
            .collect();
        let seq = |j: usize| {
            let mut t = running[parent(j)].clone();
            t.push(token(j));
            t
        };

        // The best N continuations that did not end run on.
        let run_scores: Vec<f32> = (0..cand.len())
            .map(|j| score(j) + if hits[j] { MASK } else { 0.0 })
            .collect();
        let next = top_k(&run_scores, n);

        // Continuations that ended among the first N compete for the finished slots.
        let all_finished = finished.iter().all(|s| s.finished);
        let mut merged: Vec<Slot> = std::mem::take(&mut finished);
        for (j, &hit) in hits.iter().enumerate() {
            let just_finished = hit && j < n;
            let mut s = penalized(score(j), generated + 1, lp);
            if cfg.early_stopping == EarlyStopping::Eager && all_finished {
                s += MASK;
            }
            if !improvable {
                s += MASK;
            }
            if !just_finished {
                s += MASK;
            }
            merged.push(Slot {
                tokens: if just_finished { seq(j) } else { Vec::new() },
                score: s,
                finished: just_finished,
            });
        }
        let merged_scores: Vec<f32> = merged.iter().map(|s| s.score).collect();
        let keep = top_k(&merged_scores, n);
        let mut merged: Vec<Option<Slot>> = merged.into_iter().map(Some).collect();
        finished = keep
            .iter()
            .map(|&i| merged[i].take().expect("top_k indices are distinct"))
            .collect();

        let parents: Vec<usize> = next.iter().map(|&j| parent(j)).collect();
        let tokens: Vec<u32> = next.iter().map(|&j| token(j)).collect();
        running = next.iter().map(|&j| seq(j)).collect();
        running_scores = next.iter().map(|&j| run_scores[j]).collect();
        generated += 1;

        // Can a running beam still beat the worst finished hypothesis?
        let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
            cfg.max_new_tokens
        } else {
            generated
        };
        let best_possible = penalized(running_scores[0], best_len, lp);
        let worst = finished
            .iter()
            .map(|s| s.score)
            .fold(f32::INFINITY, f32::min);
        improvable &= finished
            .iter()
            .any(|s| best_possible > if s.finished { worst } else { MASK });
        let all_done =
            cfg.early_stopping == EarlyStopping::Eager && finished.iter().all(|s| s.finished);
        if !improvable || all_done || hits.iter().all(|&h| h) {
            break;
        }
        logits = dec.advance(&parents, &tokens)?;
    }
    let hypotheses: Vec<Hypothesis> = finished
        .into_iter()
        .filter(|s| s.finished)
        .map(|s| Hypothesis {
            tokens: s.tokens,
            score: s.score,
        })
        .collect();
    let best = hypotheses.first().cloned().ok_or_else(|| {
        Error::msg("beam search ended without a finished hypothesis (every score was -inf)")
    })?;
    Ok(BeamOutput { best, hypotheses })
}

/// Times the model's `start` (the prompt) apart from its steps.
struct Timed<'a> {
    inner: &'a mut dyn BeamDecoder,
    start_s: f64,
}

impl BeamDecoder for Timed<'_> {
    fn start(&mut self, num_beams: usize) -> Result<Vec<Vec<f32>>> {
        let t = Instant::now();
        let out = self.inner.start(num_beams);
        self.start_s = t.elapsed().as_secs_f64();
        out
    }
    fn advance(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.inner.advance(parents, tokens)
    }
}

/// Beam search, then the best hypothesis as text, reported like
/// [`crate::generate::generate`]'s output (not streamed: the best beam is known only at the
/// end). The EOS that ended it is not part of `token_ids`; `stop` strings cut the text at the
/// first one found. `prompt_tokens` is what the model was given, for the report.
pub fn generate(
    dec: &mut dyn BeamDecoder,
    tok: &Tokenizer,
    prompt_tokens: usize,
    cfg: &BeamConfig,
    stop: &[String],
) -> Result<GenerationOutput> {
    let mut timed = Timed {
        inner: dec,
        start_s: 0.0,
    };
    let t0 = Instant::now();
    let out = beam_search(&mut timed, cfg)?;
    let decode_s = (t0.elapsed().as_secs_f64() - timed.start_s).max(1e-9);
    let mut tokens = out.best.tokens;
    let mut stop_reason = StopReason::MaxTokens;
    if tokens.last().is_some_and(|t| cfg.eos_ids.contains(t)) {
        tokens.pop();
        stop_reason = StopReason::Eos;
    }
    let mut text = tok.decode(&tokens, true)?;
    if let Some(pos) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(pos);
        stop_reason = StopReason::StopString;
    }
    // The first token comes from the prompt's logits; the rest each cost one step.
    let steps = tokens.len().saturating_sub(1) + usize::from(stop_reason == StopReason::Eos);
    Ok(GenerationOutput {
        text,
        generated_tokens: tokens.len(),
        token_ids: tokens,
        prompt_tokens,
        prompt_tokens_per_s: prompt_tokens as f64 / timed.start_s.max(1e-9),
        decode_tokens_per_s: if steps == 0 {
            0.0
        } else {
            steps as f64 / decode_s
        },
        stop_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy model whose next-token distribution depends only on the beam's last token, with
    /// a fixed table: lets tests reason about what beam search must return.
    struct Table {
        /// logits[last token] -> next-token logits; the start uses row `start`.
        rows: Vec<Vec<f32>>,
        start: usize,
        beams: Vec<u32>,
        calls: usize,
    }

    impl BeamDecoder for Table {
        fn start(&mut self, n: usize) -> Result<Vec<Vec<f32>>> {
            self.beams = vec![self.start as u32; n];
            Ok(vec![self.rows[self.start].clone(); n])
        }
        fn advance(&mut self, parents: &[usize], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            self.calls += 1;
            assert!(parents.iter().all(|&p| p < self.beams.len()));
            self.beams = tokens.to_vec();
            Ok(tokens
                .iter()
                .map(|&t| self.rows[t as usize].clone())
                .collect())
        }
    }

    fn ln(p: f32) -> f32 {
        p.ln()
    }

    #[test]
    fn beam_search_finds_what_greedy_misses() {
        // Tokens: 0 = EOS, 1, 2, 3 (start). Greedy takes 1 (p .6) then is stuck with a flat
        // distribution; 2 (p .4) leads to EOS with p .99: the better sequence overall.
        let rows = vec![
            vec![0.0, 0.0, 0.0, 0.0],
            vec![ln(0.25), ln(0.25), ln(0.25), ln(0.25)],
            vec![ln(0.99), ln(0.005), ln(0.0025), ln(0.0025)],
            vec![ln(1e-6), ln(0.6), ln(0.4), ln(1e-6)],
        ];
        let mut t = Table {
            rows,
            start: 3,
            beams: vec![],
            calls: 0,
        };
        let cfg = BeamConfig {
            num_beams: 2,
            max_new_tokens: 5,
            eos_ids: vec![0],
            ..Default::default()
        };
        let out = beam_search(&mut t, &cfg).unwrap();
        assert_eq!(out.best.tokens, vec![2, 0]);
        let want = (0.4f32.ln() + 0.99f32.ln()) / 2.0;
        assert!((out.best.score - want).abs() < 1e-5, "{}", out.best.score);
    }

    #[test]
    fn without_eos_it_runs_to_the_budget() {
        let rows = vec![vec![0.0, 1.0, 2.0]; 3];
        let mut t = Table {
            rows,
            start: 0,
            beams: vec![],
            calls: 0,
        };
        let cfg = BeamConfig {
            num_beams: 3,
            max_new_tokens: 4,
            eos_ids: vec![],
            ..Default::default()
        };
        let out = beam_search(&mut t, &cfg).unwrap();
        assert_eq!(out.best.tokens, vec![2, 2, 2, 2]);
        assert_eq!(out.hypotheses.len(), 3);
        assert_eq!(t.calls, 3, "one start and max_new_tokens - 1 advances");
    }

    #[test]
    fn zero_budget_runs_nothing_and_bad_settings_are_refused() {
        struct Never;
        impl BeamDecoder for Never {
            fn start(&mut self, _: usize) -> Result<Vec<Vec<f32>>> {
                unreachable!()
            }
            fn advance(&mut self, _: &[usize], _: &[u32]) -> Result<Vec<Vec<f32>>> {
                unreachable!()
            }
        }
        let cfg = BeamConfig {
            max_new_tokens: 0,
            ..Default::default()
        };
        assert!(beam_search(&mut Never, &cfg)
            .unwrap()
            .best
            .tokens
            .is_empty());
        for (cfg, key) in [
            (
                BeamConfig {
                    num_beams: 0,
                    ..Default::default()
                },
                "num_beams",
            ),
            (
                BeamConfig {
                    length_penalty: f64::NAN,
                    ..Default::default()
                },
                "length_penalty",
            ),
        ] {
            let e = beam_search(&mut Never, &cfg).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
    }
}
