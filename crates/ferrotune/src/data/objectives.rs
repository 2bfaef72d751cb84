//! Pre-training objectives on raw text: causal LM chunks, masked-LM masking (BERT) and span
//! corruption (T5).
//!
//! Documents are tokenized, concatenated and cut into chunks (as transformers' `run_clm.py`,
//! `run_mlm.py` and `run_t5_mlm_flax.py` `group_texts` do). Masks are drawn when a batch is built,
//! from a seed made of the run's seed, the epoch and the chunk's index: every epoch sees fresh
//! masks, the same (seed, epoch) always gives the same masks whatever the batch composition, and a
//! run resumed from a checkpoint's data cursor sees the masks it would have seen.
use rand::{Rng, SeedableRng};

use super::template::splitmix64;
use super::{Example, Targets, IGNORE};
use crate::{Error, Result};

/// A pre-training objective whose masks are drawn per batch ([`super::BatchConfig::masking`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Masking {
    Mlm(MlmMasking),
    SpanCorruption(SpanCorruption),
}

impl Masking {
    pub fn name(&self) -> &'static str {
        match self {
            Masking::Mlm(_) => "mlm",
            Masking::SpanCorruption(_) => "span_corruption",
        }
    }

    /// The targets the masked examples have: per-token labels (MLM) or decoder targets.
    pub fn targets(&self) -> Targets {
        match self {
            Masking::Mlm(_) => Targets::Token,
            Masking::SpanCorruption(_) => Targets::Decoder,
        }
    }

    /// The model input length of a chunk of `raw` tokens once masked (span corruption replaces
    /// each noise span by one sentinel and appends EOS).
    pub fn input_len(&self, raw: usize) -> usize {
        match self {
            Masking::Mlm(_) => raw,
            Masking::SpanCorruption(s) => {
                if raw < 2 {
                    return raw + 1;
                }
                let (noise, spans) = noise_counts(raw, s.noise_density, s.mean_noise_span_length);
                raw - noise + spans + 1
            }
        }
    }

    /// Loss positions a chunk of `raw` tokens gives: expected (MLM) or exact (span corruption:
    /// noise tokens, one sentinel per span, EOS).
    pub fn expected_trained(&self, raw: &[u32]) -> f64 {
        match self {
            Masking::Mlm(m) => {
                m.probability * raw.iter().filter(|&&id| !m.special(id)).count() as f64
            }
            Masking::SpanCorruption(s) => {
                if raw.len() < 2 {
                    return 0.0;
                }
                let (noise, spans) =
                    noise_counts(raw.len(), s.noise_density, s.mean_noise_span_length);
                (noise + spans + 1) as f64
            }
        }
    }

    /// The training example chunk `ex` (example `index` of its list) becomes in `epoch`.
    pub fn apply(&self, ex: &Example, seed: u64, epoch: usize, index: usize) -> Result<Example> {
        let mut rng = chunk_rng(seed, epoch, index);
        let (input_ids, labels) = match self {
            Masking::Mlm(m) => m.apply(&ex.input_ids, &mut rng),
            Masking::SpanCorruption(s) => {
                let (inputs, targets) = s
                    .apply(&ex.input_ids, &mut rng)
                    .map_err(|e| Error::msg(format!("{}: {e}", ex.source)))?;
                (inputs, targets.into_iter().map(i64::from).collect())
            }
        };
        Ok(Example {
            input_ids,
            labels,
            source: ex.source.clone(),
        })
    }
}

/// The random generator for one chunk in one epoch.
pub fn chunk_rng(seed: u64, epoch: usize, index: usize) -> rand::rngs::StdRng {
    let s = splitmix64(splitmix64(splitmix64(seed) ^ epoch as u64) ^ index as u64);
    rand::rngs::StdRng::seed_from_u64(s)
}

/// Cut the concatenation of `docs` into chunks of `len` tokens (the last one may be shorter;
/// it is kept when it has at least `min_last` tokens). Returns each chunk with the index of the
/// document it starts in.
pub fn chunk_documents(docs: &[Vec<u32>], len: usize, min_last: usize) -> Vec<(Vec<u32>, usize)> {
    assert!(len > 0);
    let mut out = Vec::new();
    let mut cur: Vec<u32> = Vec::with_capacity(len);
    let mut start_doc = 0;
    for (d, doc) in docs.iter().enumerate() {
        let mut rest = &doc[..];
        while !rest.is_empty() {
            if cur.is_empty() {
                start_doc = d;
            }
            let take = (len - cur.len()).min(rest.len());
            cur.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if cur.len() == len {
                out.push((
                    std::mem::replace(&mut cur, Vec::with_capacity(len)),
                    start_doc,
                ));
            }
        }
    }
    if !cur.is_empty() && cur.len() >= min_last {
        out.push((cur, start_doc));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Masked language modelling

/// BERT's masking: each non-special token is selected with probability `probability`; a
/// selected token becomes `[MASK]` with probability `mask_replace`, a random id with
/// probability `random_replace`, and stays itself otherwise. Labels are the original ids on
/// selected tokens and [`IGNORE`] elsewhere (transformers' `DataCollatorForLanguageModeling`).
///
/// With `whole_words`, words are selected (each with probability `probability`, as
/// transformers does) and every piece of a selected word is selected with it; the
/// mask / random / keep choice is also made per word, so a word's pieces are replaced together
/// and no piece of a masked word is left visible.
#[derive(Debug, Clone, PartialEq)]
pub struct MlmMasking {
    pub probability: f64,
    pub mask_replace: f64,
    pub random_replace: f64,
    pub mask_id: u32,
    /// Random replacements are drawn from `0..vocab_size` (transformers' `len(tokenizer)`).
    pub vocab_size: u32,
    /// `special[id]`: never selected.
    pub special: Vec<bool>,
    /// Per id, whether the piece continues the previous word (WordPiece `##`), for
    /// whole-word masking.
    pub continuation: Option<Vec<bool>>,
}

impl MlmMasking {
    /// Validate the probabilities (one-line errors naming the `[data]` key).
    pub fn check(&self) -> Result<()> {
        let p = self.probability;
        if !(p > 0.0 && p < 1.0) {
            return Err(Error::key(
                "[data]",
                "mlm_probability",
                format!("must be between 0 and 1 (exclusive), got {p}"),
            ));
        }
        let (m, r) = (self.mask_replace, self.random_replace);
        if !(0.0..=1.0).contains(&m) || !(0.0..=1.0).contains(&r) || m + r > 1.0 + 1e-12 {
            return Err(Error::msg(format!(
                "MLM replacement probabilities must be in [0, 1] and add up to at most 1, got mask {m} and random {r}"
            )));
        }
        if self.vocab_size == 0 {
            return Err(Error::msg("MLM masking needs a non-empty vocabulary"));
        }
        Ok(())
    }

    fn special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Mask one sequence: `(inputs, labels)`.
    pub fn apply(&self, ids: &[u32], rng: &mut impl Rng) -> (Vec<u32>, Vec<i64>) {
        let mut inputs = ids.to_vec();
        let mut labels = vec![IGNORE; ids.len()];
        // Units of masking: single tokens, or whole words (a start and its continuations).
        let units: Vec<std::ops::Range<usize>> = match &self.continuation {
            None => (0..ids.len())
                .filter(|&i| !self.special(ids[i]))
                .map(|i| i..i + 1)
                .collect(),
            Some(cont) => {
                let mut units: Vec<std::ops::Range<usize>> = Vec::new();
                for (i, &id) in ids.iter().enumerate() {
                    if self.special(id) {
                        continue;
                    }
                    let continues = cont.get(id as usize).copied().unwrap_or(false);
                    match units.last_mut() {
                        Some(u) if continues && u.end == i => u.end = i + 1,
                        _ => units.push(i..i + 1),
                    }
                }
                units
            }
        };
        let keep_share = 1.0 - self.mask_replace;
        // transformers scales the random share to what is left after [MASK].
        let random_given_not_mask = if keep_share > 0.0 {
            self.random_replace / keep_share
        } else {
            0.0
        };
        for unit in units {
            if !rng.random_bool(self.probability) {
                continue;
            }
            let how = if rng.random_bool(self.mask_replace) {
                0
            } else if rng.random_bool(random_given_not_mask.min(1.0)) {
                1
            } else {
                2
            };
            for i in unit {
                labels[i] = ids[i] as i64;
                match how {
                    0 => inputs[i] = self.mask_id,
                    1 => inputs[i] = rng.random_range(0..self.vocab_size),
                    _ => {}
                }
            }
        }
        (inputs, labels)
    }
}

// ---------------------------------------------------------------------------------------------
// T5 span corruption

/// The T5 paper's span corruption (`random_spans_noise_mask` in T5's and transformers'
/// `run_t5_mlm_flax.py`): about `noise_density` of the tokens, in spans of mean length
/// `mean_noise_span_length`, are removed from the input; each removed span is replaced in the
/// input by one sentinel (`<extra_id_0>`, `<extra_id_1>`, ... in order), and the target is each
/// span preceded by its sentinel. Both end with EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanCorruption {
    pub noise_density: f64,
    pub mean_noise_span_length: f64,
    /// `sentinels[j]` is the id of `<extra_id_j>`.
    pub sentinels: Vec<u32>,
    pub eos_id: u32,
}

/// Noise and span counts of a sequence of `length` tokens (`length >= 2`), exactly as
/// `random_spans_noise_mask` computes them: `(noise tokens, noise spans)`.
pub fn noise_counts(
    length: usize,
    noise_density: f64,
    mean_noise_span_length: f64,
) -> (usize, usize) {
    // np.round rounds half to even; so does f64::round_ties_even. The non-noise count in the
    // span formula is taken before the noise count is clamped, as there.
    let unclamped = ((length as f64 * noise_density).round_ties_even() as usize).min(length);
    let nonnoise_before_clamp = length - unclamped;
    let num_noise = unclamped.max(1).min(length - 1);
    let spans = (num_noise.min(nonnoise_before_clamp) as f64 / mean_noise_span_length)
        .round_ties_even() as usize;
    (num_noise, spans.max(1))
}

/// transformers' `compute_input_and_target_lengths`: the number of raw tokens to cut chunks to
/// so that the corrupted input (non-noise tokens, one sentinel per span, EOS) is
/// `inputs_length` long, and the resulting target length.
pub fn expanded_lengths(
    inputs_length: usize,
    noise_density: f64,
    mean_noise_span_length: f64,
) -> (usize, usize) {
    let lengths = |tokens: usize| {
        let noise = (tokens as f64 * noise_density).round_ties_even() as usize;
        let nonnoise = tokens - noise;
        let spans = (noise as f64 / mean_noise_span_length).round_ties_even() as usize;
        (nonnoise + spans + 1, noise + spans + 1)
    };
    let mut tokens = inputs_length;
    while lengths(tokens + 1).0 <= inputs_length {
        tokens += 1;
    }
    let (_, mut targets) = lengths(tokens);
    // transformers' "minor hack" to keep targets no longer than inputs at density 0.5.
    if noise_density == 0.5 && targets > inputs_length {
        tokens -= 1;
        targets -= 1;
    }
    (tokens, targets)
}

/// A random split of `items` into `segments` non-empty parts, as `_random_segmentation`:
/// `segments - 1` cut points chosen uniformly among the `items - 1` gaps.
fn random_segmentation(items: usize, segments: usize, rng: &mut impl Rng) -> Vec<usize> {
    debug_assert!(segments >= 1 && segments <= items);
    let mut cut = vec![false; items - 1];
    cut[..segments - 1].fill(true);
    // np.random.shuffle: a uniform permutation (Fisher-Yates).
    for i in (1..cut.len()).rev() {
        cut.swap(i, rng.random_range(0..=i));
    }
    let mut lengths = Vec::with_capacity(segments);
    let mut run = 1;
    for c in cut {
        if c {
            lengths.push(run);
            run = 1;
        } else {
            run += 1;
        }
    }
    lengths.push(run);
    lengths
}

/// `random_spans_noise_mask(length)`: `true` on noise tokens. Spans alternate non-noise,
/// noise, ..., starting with non-noise and ending with noise.
pub fn random_spans_noise_mask(
    length: usize,
    noise_density: f64,
    mean_noise_span_length: f64,
    rng: &mut impl Rng,
) -> Vec<bool> {
    assert!(length >= 2, "span corruption needs at least 2 tokens");
    let (num_noise, spans) = noise_counts(length, noise_density, mean_noise_span_length);
    let num_nonnoise = length - num_noise;
    let noise_lengths = random_segmentation(num_noise, spans, rng);
    let nonnoise_lengths = random_segmentation(num_nonnoise, spans, rng);
    let mut mask = Vec::with_capacity(length);
    for (&keep, &noise) in nonnoise_lengths.iter().zip(&noise_lengths) {
        mask.extend(std::iter::repeat_n(false, keep));
        mask.extend(std::iter::repeat_n(true, noise));
    }
    mask
}

impl SpanCorruption {
    /// Validate the settings (one-line errors naming the `[data]` key).
    pub fn check(&self) -> Result<()> {
        let d = self.noise_density;
        if !(d > 0.0 && d < 1.0) {
            return Err(Error::key(
                "[data]",
                "noise_density",
                format!("must be between 0 and 1 (exclusive), got {d}"),
            ));
        }
        let m = self.mean_noise_span_length;
        if !(m.is_finite() && m >= 1.0) {
            return Err(Error::key(
                "[data]",
                "mean_noise_span_length",
                format!("must be a number ≥ 1, got {m}"),
            ));
        }
        Ok(())
    }

    /// Most spans a sequence of `length` tokens gets (the sentinels it needs).
    pub fn max_spans(&self, length: usize) -> usize {
        if length < 2 {
            return 0;
        }
        noise_counts(length, self.noise_density, self.mean_noise_span_length).1
    }

    /// Corrupt one sequence: `(inputs, targets)`, both ending with EOS.
    pub fn apply(&self, ids: &[u32], rng: &mut impl Rng) -> Result<(Vec<u32>, Vec<u32>)> {
        if ids.len() < 2 {
            return Err(Error::msg(format!(
                "span corruption needs at least 2 tokens, got {}",
                ids.len()
            )));
        }
        let spans = self.max_spans(ids.len());
        if spans > self.sentinels.len() {
            return Err(Error::msg(format!(
                "span corruption of {} tokens makes {spans} spans, but the tokenizer has {} sentinel tokens (<extra_id_N>); lower max_seq_len",
                ids.len(),
                self.sentinels.len()
            )));
        }
        let mask = random_spans_noise_mask(
            ids.len(),
            self.noise_density,
            self.mean_noise_span_length,
            rng,
        );
        Ok(corrupt_with_mask(ids, &mask, &self.sentinels, self.eos_id))
    }
}

/// Inputs and targets from a noise mask (transformers' `create_sentinel_ids` +
/// `filter_input_ids`): inputs keep non-noise tokens with `sentinels[j]` in place of noise span
/// `j`; targets are each noise span preceded by its sentinel; both end with `eos`.
pub fn corrupt_with_mask(
    ids: &[u32],
    noise: &[bool],
    sentinels: &[u32],
    eos: u32,
) -> (Vec<u32>, Vec<u32>) {
    let mut inputs = Vec::with_capacity(ids.len());
    let mut targets = Vec::new();
    let mut span = 0;
    for (i, (&id, &is_noise)) in ids.iter().zip(noise).enumerate() {
        let starts_span = is_noise && (i == 0 || !noise[i - 1]);
        if is_noise {
            if starts_span {
                inputs.push(sentinels[span]);
                targets.push(sentinels[span]);
                span += 1;
            }
            targets.push(id);
        } else {
            inputs.push(id);
        }
    }
    inputs.push(eos);
    targets.push(eos);
    (inputs, targets)
}

/// The ids of `<extra_id_0>`, `<extra_id_1>`, ... in a vocabulary (`lookup` maps token text to
/// an id), as many as are present in a row from 0.
pub fn sentinel_ids(lookup: impl Fn(&str) -> Option<u32>) -> Vec<u32> {
    (0..)
        .map_while(|j| lookup(&format!("<extra_id_{j}>")))
        .collect()
}

/// Sentinels counted down from the top of a vocabulary of `vocab_size` ids (`vocab_size - 1 -
/// j`), as transformers' `create_sentinel_ids` computes them from `len(tokenizer)`; for T5 these
/// are exactly the `<extra_id_j>` tokens.
pub fn top_of_vocab_sentinels(vocab_size: usize, count: usize) -> Vec<u32> {
    (0..count.min(vocab_size))
        .map(|j| (vocab_size - 1 - j) as u32)
        .collect()
}
