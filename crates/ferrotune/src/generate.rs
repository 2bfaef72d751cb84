//! Text generation: KV-cache decoding, greedy or sampled (temperature, top-k, top-p, seed),
//! repetition penalty, stop on EOS or stop strings, streaming text as it is produced.
use crate::model::{KvCache, Llama, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// HF-style: logits of tokens already present are divided (if > 0) or multiplied (if < 0) by it.
    pub repetition_penalty: f32,
    pub stop: Vec<String>,
    /// Stop at the tokenizer's end-of-sequence tokens.
    pub stop_on_eos: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
            repetition_penalty: 1.0,
            stop: Vec::new(),
            stop_on_eos: true,
        }
    }
}

/// The largest generation budget accepted: beyond the context window of any model, so a larger
/// value can only be a typo (generation stops at the context length anyway).
pub const MAX_NEW_TOKENS_LIMIT: usize = 1 << 24;

impl GenerationConfig {
    /// Range checks: NaN, negative or zero values where they mean nothing are errors that name
    /// the field (`generation config: key `top_p`: ...`; the CLI shows it as its flag).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: String| Err(Error::key("generation config", key, what));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!(
                    "got {}, expected a number >= 0 (0 decodes greedily)",
                    self.temperature
                ),
            );
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("got {p}, expected a number in (0, 1]"));
            }
        }
        if self.top_k == Some(0) {
            return bad(
                "top_k",
                "got 0, expected at least 1 (leave it out to keep every token)".into(),
            );
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0) {
            return bad(
                "repetition_penalty",
                format!("got {rp}, expected a number > 0 (1 = no penalty)"),
            );
        }
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return bad(
                "max_new_tokens",
                format!(
                    "got {}, expected at most {MAX_NEW_TOKENS_LIMIT} (longer than any context window)",
                    self.max_new_tokens
                ),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    /// The context window is full.
    Length,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::StopString => "stop_string",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Length => "context_length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub stop_reason: StopReason,
}

/// A model that can be driven one token at a time. Every family that generates gives one
/// ([`Model::decoder`]); faster inference-only engines can too, and `generate` works with any
/// of them.
pub trait Decoder {
    /// Feed the prompt; return the logits of the first token to generate (a decoder: of the
    /// prompt's last position; an encoder-decoder encodes the prompt and runs its decoder start
    /// token).
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// Feed one more token; return its logits.
    fn step(&mut self, id: u32) -> Result<Vec<f32>>;
    /// The most positions the generated tokens may reach (with the prompt, where
    /// [`Self::prompt_in_context`]).
    fn context_length(&self) -> usize;
    /// Whether the prompt occupies the context the generated tokens extend (decoders), or is
    /// read by an encoder (encoder-decoders: the context budget and the repetition-penalty
    /// history then start with the first generated token).
    fn prompt_in_context(&self) -> bool {
        true
    }
}

/// Which decoder runs generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// The fast CPU engine where it supports the model (LLaMA family, CPU, no adapters), else
    /// the model's own decoder.
    #[default]
    Auto,
    /// Always the model's own (differentiable) decoder.
    Model,
}

/// The decoder `engine` picks for `model`; an encoder is a one-line error.
pub fn decoder_for<'a>(model: &'a dyn Model, engine: Engine) -> Result<Box<dyn Decoder + 'a>> {
    // The fast engine knows nothing of soft prompts.
    if engine == Engine::Auto && model.virtual_prompt().is_none() {
        if let Some(fast) = crate::engine::FastDecoder::new(model) {
            // the decode panels now, with the model's loading, not inside the prompt's time
            fast.prepare_decode();
            return Ok(Box::new(fast));
        }
    }
    model.decoder()
}

/// The differentiable model with a KV cache.
pub struct LlamaDecoder<'a> {
    model: &'a Llama,
    cache: KvCache,
}

impl<'a> LlamaDecoder<'a> {
    pub fn new(model: &'a Llama) -> Self {
        Self {
            model,
            cache: model.new_cache(),
        }
    }
    fn run(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        llama_logits(self.model, ids, &mut self.cache)
    }
}

/// Feed `ids` after the positions in `cache` and return the last position's logits: one step
/// of [`LlamaDecoder`], with a cache the caller owns (the serving backend keeps one per
/// sequence), so both compute exactly the same values.
pub fn llama_logits(model: &Llama, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let t = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let logits = model.forward_last(&t, Some(cache))?;
    Ok(logits
        .squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

impl Decoder for LlamaDecoder<'_> {
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.cache.clear();
        self.run(ids)
    }
    fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        self.run(&[id])
    }
    fn context_length(&self) -> usize {
        self.model.cfg.max_position_embeddings
    }
}

/// Picks the next token from logits.
pub struct Sampler {
    cfg: GenerationConfig,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(cfg: &GenerationConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(cfg.seed),
        }
    }

    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = self.cfg.repetition_penalty;
        if p != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in history {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p } else { *l * p };
                    }
                }
            }
        }
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        // Scaled from the largest logit down, and never by 0: a tiny temperature (below f32's
        // range) then tends to greedy instead of turning every logit into inf - inf = NaN.
        let t = (self.cfg.temperature as f32).max(f32::MIN_POSITIVE);
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l - top) / t))
            .collect();
        // Sort descending once; top-k and top-p then cut prefixes.
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = self.cfg.top_k.filter(|&k| k > 0) {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = self.cfg.top_p.filter(|&p| p < 1.0) {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc as f64 >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, &pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the first largest value (NaNs never win; a leading NaN gives 0, as the plain
/// loop `if x > xs[best]` does). Two passes that vectorise, where the plain loop's dependency
/// on the running best took ~50 µs per 49k-token row (a greedy batched step samples every row
/// on one thread): the largest value of each chunk of 256 in 16 independent lanes, then the
/// first position of the best value inside the first chunk that reached it.
pub fn argmax(xs: &[f32]) -> u32 {
    const LANES: usize = 16;
    const CHUNK: usize = 256;
    let Some(&first) = xs.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let (mut best, mut at) = (first, 0);
    for (ci, c) in xs.chunks(CHUNK).enumerate() {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut vs = c.chunks_exact(LANES);
        for v in &mut vs {
            for (l, &x) in lanes.iter_mut().zip(v) {
                *l = if x > *l { x } else { *l };
            }
        }
        let m = lanes
            .iter()
            .chain(vs.remainder())
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        if m > best {
            (best, at) = (m, ci);
        }
    }
    let start = at * CHUNK;
    (start + xs[start..].iter().position(|&x| x == best).unwrap_or(0)) as u32
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: that much
/// text must be held back while streaming, since the next token may complete the stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// Generate from `prompt_ids`. `on_text` receives the text as it becomes final (streaming).
pub fn generate(
    dec: &mut dyn Decoder,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    cfg: &GenerationConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationOutput> {
    cfg.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::msg("the prompt is empty (0 tokens)"));
    }
    let ctx = dec.context_length();
    let prompt_in_context = dec.prompt_in_context();
    if prompt_in_context && prompt_ids.len() >= ctx {
        return Err(Error::ContextOverflow {
            tokens: prompt_ids.len(),
            context: ctx,
            hint: String::new(),
        });
    }
    let mut sampler = Sampler::new(cfg);
    let t0 = Instant::now();
    let mut logits = dec.prefill(prompt_ids)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut history: Vec<u32> = if prompt_in_context {
        prompt_ids.to_vec()
    } else {
        Vec::new()
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut emitted = 0usize; // bytes of `text` already streamed
    let mut text = String::new();
    let mut stop_reason = StopReason::MaxTokens;
    while generated.len() < cfg.max_new_tokens {
        let next = sampler.sample(&mut logits, &history);
        if cfg.stop_on_eos && tok.eos_ids().contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        generated.push(next);
        history.push(next);
        text = tok.decode(&generated, true)?;
        if let Some(pos) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(pos);
            stop_reason = StopReason::StopString;
            break;
        }
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) and possible stop-string starts.
        let mut safe = text.len() - held_back(&text, &cfg.stop);
        if text[..safe].ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        if safe > emitted && text.is_char_boundary(safe) {
            on_text(&text[emitted..safe]);
            emitted = safe;
        }
        if generated.len() >= cfg.max_new_tokens {
            break;
        }
        if history.len() >= ctx {
            stop_reason = StopReason::Length;
            break;
        }
        logits = dec.step(next)?;
    }
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    // The first generated token comes from the prefill logits; the rest each cost one step.
    let steps = generated.len().saturating_sub(1)
        + usize::from(stop_reason == StopReason::Eos && !generated.is_empty());
    Ok(GenerationOutput {
        text,
        token_ids: generated.clone(),
        prompt_tokens: prompt_ids.len(),
        generated_tokens: generated.len(),
        prompt_tokens_per_s: prompt_ids.len() as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: if steps == 0 {
            0.0
        } else {
            steps as f64 / decode_s.max(1e-9)
        },
        stop_reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(t: f64, k: Option<usize>, p: Option<f64>) -> GenerationConfig {
        GenerationConfig {
            temperature: t,
            top_k: k,
            top_p: p,
            ..Default::default()
        }
    }

    /// The chunked argmax equals the plain first-largest loop: ties inside and across chunks,
    /// NaNs (leading, inside, everywhere), infinities, signed zeros, lengths around the chunk
    /// and lane sizes.
    #[test]
    fn argmax_is_the_first_largest_value() {
        fn plain(xs: &[f32]) -> u32 {
            let mut best = 0;
            for (i, &x) in xs.iter().enumerate() {
                if x > xs[best] {
                    best = i;
                }
            }
            best as u32
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 3.0];
        for len in [1usize, 2, 15, 16, 17, 255, 256, 257, 700, 49152] {
            for case in 0..40 {
                let mut xs: Vec<f32> = (0..len)
                    // few distinct values: ties everywhere
                    .map(|_| (rng.random_range(0..6) as f32) - 3.0)
                    .collect();
                for _ in 0..case % 5 {
                    let i = rng.random_range(0..len);
                    xs[i] = specials[rng.random_range(0..specials.len())];
                }
                if case % 7 == 0 {
                    xs[0] = f32::NAN;
                }
                if case % 11 == 0 {
                    xs.iter_mut().for_each(|x| *x = f32::NAN);
                }
                assert_eq!(argmax(&xs), plain(&xs), "len {len} case {case}");
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(&cfg(0.0, None, None));
        let mut l = vec![0.1, 2.0, -1.0, 1.9];
        assert_eq!(s.sample(&mut l, &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(&cfg(5.0, Some(1), None));
        for _ in 0..20 {
            let mut l = vec![0.1, 2.0, -1.0, 1.9];
            assert_eq!(s.sample(&mut l, &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // p(0)=~0.88 after softmax: top_p 0.5 keeps only token 0.
        let mut s = Sampler::new(&cfg(1.0, None, Some(0.5)));
        for _ in 0..50 {
            let mut l = vec![3.0, 1.0, 0.0, -1.0];
            assert_eq!(s.sample(&mut l, &[]), 0);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let c = cfg(1.0, None, None);
        let draw = |seed| {
            let mut s = Sampler::new(&GenerationConfig { seed, ..c.clone() });
            (0..2000)
                .map(|_| s.sample(&mut [0.0f32, (3.0f32).ln()], &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7), "same seed, same tokens");
        assert_ne!(a, draw(8));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!(
            (ones - 0.75).abs() < 0.04,
            "P(token 1) should be 0.75, got {ones}"
        );
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(&GenerationConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        let mut l = vec![1.0, 1.5, 0.0];
        assert_eq!(s.sample(&mut l, &[1]), 0);
        assert_eq!(l[1], 0.75);
    }

    #[test]
    fn a_tiny_temperature_is_greedy_not_nan() {
        // 1e-300 is 0 as f32: the logits once became inf - inf = NaN and the sampler returned
        // the least likely token.
        for t in [1e-300, 1e-40] {
            let mut s = Sampler::new(&cfg(t, None, None));
            let mut l = vec![0.1, 2.0, -1.0, 1.9, 0.0];
            assert_eq!(s.sample(&mut l, &[]), 1, "temperature {t}");
        }
    }

    #[test]
    fn out_of_range_settings_are_errors_naming_the_field() {
        let bad = [
            (cfg(f64::NAN, None, None), "temperature"),
            (cfg(-0.5, None, None), "temperature"),
            (cfg(f64::INFINITY, None, None), "temperature"),
            (cfg(1.0, None, Some(f64::NAN)), "top_p"),
            (cfg(1.0, None, Some(0.0)), "top_p"),
            (cfg(1.0, None, Some(1.5)), "top_p"),
            (cfg(1.0, None, Some(-0.1)), "top_p"),
            (cfg(1.0, Some(0), None), "top_k"),
            (
                GenerationConfig {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationConfig {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationConfig {
                    repetition_penalty: -1.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationConfig {
                    max_new_tokens: usize::MAX,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
        ];
        for (c, key) in bad {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{c:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let fine = [
            cfg(0.0, None, None),
            cfg(0.7, Some(1), Some(1.0)),
            cfg(1e-300, None, Some(1e-9)),
            GenerationConfig {
                repetition_penalty: 1.3,
                max_new_tokens: MAX_NEW_TOKENS_LIMIT,
                ..Default::default()
            },
        ];
        for c in fine {
            c.validate().unwrap();
        }
    }

    /// A decoder that must never be called: `generate` checks its settings first.
    struct Unreachable;
    impl Decoder for Unreachable {
        fn prefill(&mut self, _: &[u32]) -> Result<Vec<f32>> {
            unreachable!("prefill with invalid settings")
        }
        fn step(&mut self, _: u32) -> Result<Vec<f32>> {
            unreachable!("step with invalid settings")
        }
        fn context_length(&self) -> usize {
            64
        }
    }

    #[test]
    fn generate_refuses_invalid_settings_before_decoding() {
        let tok = crate::data::testutil::tiny_tokenizer(None);
        let e = generate(
            &mut Unreachable,
            &tok,
            &[1, 2],
            &cfg(f64::NAN, None, None),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`temperature`"), "{e}");
    }

    #[test]
    fn stop_prefix_is_held_back() {
        let stops = vec!["\nUser:".to_string()];
        assert_eq!(held_back("Hello\nUs", &stops), 3);
        assert_eq!(held_back("Hello", &stops), 0);
    }
}
