//! What the scheduler drives: a model that runs many sequences, each in its own slot (KV cache)
//! with its own adapter, and steps them together.
use crate::model::t5::T5Cache;
use crate::model::{KvCache, Llama, Model, SoftPrompt, T5};
use crate::nn::LinearAdapter;
use crate::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// A slot: one sequence's state (KV cache, adapter) inside a backend.
pub type SlotId = usize;

/// A prompt chunk of a mixed step ([`BatchBackend::step_mixed`]): `ids` fed to `slot` after the
/// tokens it holds; `last` marks the prompt's last chunk, whose last position's logits are
/// wanted.
#[derive(Debug, Clone, Copy)]
pub struct PromptChunk<'a> {
    pub slot: SlotId,
    pub ids: &'a [u32],
    pub last: bool,
}

/// What a mixed step returns: per prompt chunk its logits (`Some` for a last chunk) or its
/// error, and per decode row its logits or its error, each in the order given.
pub type MixedResults = (Vec<Result<Option<Vec<f32>>>>, Vec<Result<Vec<f32>>>);

/// A model that runs many sequences at once (continuous batching). Slots are opened for a
/// sequence, fed its prompt (in chunks), then stepped one token at a time together with the
/// other open slots, and closed when the sequence ends. Runs on the scheduler's thread only.
pub trait BatchBackend: Send {
    /// Length of a row of logits.
    fn vocab_size(&self) -> usize;
    /// The most positions a sequence may reach (prompt included where
    /// [`Self::prompt_in_context`]).
    fn context_length(&self) -> usize;
    /// Decoders: the prompt occupies the context. Encoder-decoders: the prompt is read by the
    /// encoder, and the context counts generated tokens only.
    fn prompt_in_context(&self) -> bool {
        true
    }
    /// Whether [`Self::prefill`] accepts a prompt in several chunks (decoders); an
    /// encoder-decoder reads its whole prompt at once.
    fn chunked_prefill(&self) -> bool {
        true
    }
    /// Open a slot for a sequence run with `adapter` (`None`: the base). Errors name an
    /// unknown adapter.
    fn open(&mut self, adapter: Option<&str>) -> Result<SlotId>;
    /// [`Self::open`] for a sequence whose prompt is `prompt`, returning how many of its first
    /// tokens the slot already holds (prefix caching: a start shared with an earlier sequence,
    /// such as a chat template's system prompt or few-shot examples), computed exactly as
    /// prefilling them would; the caller feeds the prompt from there. At most all but the last
    /// token. The default reuses nothing.
    fn open_with_prompt(
        &mut self,
        adapter: Option<&str>,
        prompt: &[u32],
    ) -> Result<(SlotId, usize)> {
        let _ = prompt;
        Ok((self.open(adapter)?, 0))
    }
    /// Feed prompt tokens to `slot`, after those fed before. With `last`, return the logits
    /// of the prompt's last position (the first generated token's distribution).
    fn prefill(&mut self, slot: SlotId, ids: &[u32], last: bool) -> Result<Option<Vec<f32>>>;
    /// One token for each `(slot, token)`, in one batched forward; returns one row of logits
    /// per entry, in order. Every slot must have finished its prefill.
    fn step(&mut self, batch: &[(SlotId, u32)]) -> Result<Vec<Vec<f32>>>;
    /// [`Self::step`] with one result per row, so that an error in one sequence fails that
    /// sequence only (the scheduler calls this). The default runs `step` and gives its error
    /// to every row of the batch.
    fn step_rows(&mut self, batch: &[(SlotId, u32)]) -> Vec<Result<Vec<f32>>> {
        match self.step(batch) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(e) => {
                let m = e.to_string();
                batch.iter().map(|_| Err(Error::msg(m.clone()))).collect()
            }
        }
    }
    /// Whether [`Self::step_mixed`] runs prompt chunks and decode rows in one pass (each
    /// weight read once for both). The scheduler then gives each iteration's prompt chunks and
    /// decode rows to one call; otherwise it prefills, then steps, as two calls.
    fn mixed_steps(&self) -> bool {
        false
    }
    /// Prompt chunks (each slot once, with its prefill arithmetic) and one token for each
    /// `(slot, token)` of `decode` (as [`Self::step_rows`]), in one call; no slot may appear
    /// twice. An error in one chunk or row fails that one only where the backend can tell.
    /// The default runs [`Self::prefill`] per chunk, then [`Self::step_rows`].
    fn step_mixed(&mut self, chunks: &[PromptChunk<'_>], decode: &[(SlotId, u32)]) -> MixedResults {
        separately(self, chunks, decode)
    }
    /// Free the slot (its KV cache may be reused).
    fn close(&mut self, slot: SlotId);
    /// Attach the PEFT adapter folder `dir` as `name` (no slot may be using `name`).
    fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<()>;
    /// Detach adapter `name`; refused while an open slot uses it.
    fn unload_adapter(&mut self, name: &str) -> Result<()>;
    /// Names of the attached adapters.
    fn adapters(&self) -> Vec<String>;
}

/// [`BatchBackend::step_mixed`] as two passes: [`BatchBackend::prefill`] per chunk, then
/// [`BatchBackend::step_rows`]. A slot named a second time (by a chunk or a row) gets an error
/// for that entry and the others run, as in the one-pass engines: run one after the other, a
/// second chunk of the same slot would otherwise extend its prompt.
pub fn separately<B: BatchBackend + ?Sized>(
    b: &mut B,
    chunks: &[PromptChunk<'_>],
    decode: &[(SlotId, u32)],
) -> MixedResults {
    let twice = |slot: SlotId| Error::msg(format!("slot {slot} appears twice in one step"));
    let mut seen = std::collections::HashSet::new();
    let mut pre = Vec::with_capacity(chunks.len());
    for c in chunks {
        pre.push(if seen.insert(c.slot) {
            b.prefill(c.slot, c.ids, c.last)
        } else {
            Err(twice(c.slot))
        });
    }
    let runs: Vec<bool> = decode.iter().map(|&(s, _)| seen.insert(s)).collect();
    let run: Vec<(SlotId, u32)> = decode
        .iter()
        .zip(&runs)
        .filter_map(|(&r, &ok)| ok.then_some(r))
        .collect();
    let mut got = if run.is_empty() {
        Vec::new()
    } else {
        b.step_rows(&run)
    }
    .into_iter();
    let rows = decode
        .iter()
        .zip(&runs)
        .map(|(&(s, _), &ok)| {
            if ok {
                got.next()
                    .unwrap_or_else(|| Err(Error::msg(format!("slot {s}: no result for its row"))))
            } else {
                Err(twice(s))
            }
        })
        .collect();
    (pre, rows)
}

// ------------------------------------------------------------------------------------------
// ModelBackend: the model's own forward, any generating family, any PEFT method.

/// Which forward a [`ModelBackend`] runs (the families that generate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama,
    T5,
}

/// One sequence's decoding state; it owns its cache, so it outlives no borrow of the model.
enum DecodeState {
    Llama(KvCache),
    /// `None` until the prompt is encoded.
    T5(Option<T5Cache>),
}

struct Slot {
    adapter: Option<String>,
    state: DecodeState,
    /// Prompt chunks held back until the last one (whole-prompt prefill: T5 always, LLaMA
    /// unless chunked prefill is on).
    pending: Vec<u32>,
    /// The prompt's last position has been run: the slot may step.
    primed: bool,
}

/// An adapter's pieces while it is not mounted on the model.
enum Parts {
    /// The per-layer adapters of a method that wraps linears (LoRA, DoRA, IA3, bottleneck,
    /// `modules_to_save` copies), by index into `model.linears_mut()`. Empty while mounted
    /// (they are then inside the model's layers).
    Linear(Vec<(usize, Box<dyn LinearAdapter>)>),
    /// A soft prompt (prompt tuning, P-tuning, prefix tuning), read by the first forward of a
    /// fresh cache.
    Prompt(Arc<dyn SoftPrompt>),
}

struct Attached {
    name: String,
    parts: Parts,
}

/// [`BatchBackend`] over a loaded model's own (differentiable) forward: every family that
/// generates (LLaMA-family decoders, T5 encoder-decoders) and every PEFT method `load_adapter`
/// reads.
///
/// Exactness over speed: each sequence runs alone, with exactly the calls of the model's own
/// decoder ([`crate::generate::LlamaDecoder`], [`crate::model::t5::T5Decoder`]): the whole
/// prompt in one forward, then one `m = 1` forward per token, on a cache of its own. So greedy
/// output equals `ferrotune generate --engine model` token for token (batching rows into one
/// matmul would change the rounding of each row). Adapters are kept *off* the model and mounted
/// one at a time — their per-layer pieces moved into the layers (no tensor is copied) before a
/// sequence of theirs runs — so the model computes exactly what it computes with that adapter
/// as its only one, whatever else is loaded; [`crate::peft::set_row_adapters`]' mixed batches
/// would skip IA3's input scaling, DoRA's norm and the fused LoRA path. A `step` groups its
/// rows by adapter, so each adapter is mounted at most once per step.
pub struct ModelBackend {
    model: Box<dyn Model>,
    family: Family,
    vocab: usize,
    context: usize,
    chunked: bool,
    slots: Vec<Option<Slot>>,
    adapters: Vec<Attached>,
    /// The adapter whose pieces are inside the model now.
    mounted: Option<String>,
}

impl ModelBackend {
    /// A backend over `model`, which must generate and carry no adapter yet (load adapters
    /// through [`BatchBackend::load_adapter`] so that each request can pick one).
    pub fn new(model: Box<dyn Model>) -> Result<Self> {
        let family = if model.downcast_ref::<Llama>().is_some() {
            Family::Llama
        } else if model.downcast_ref::<T5>().is_some() {
            Family::T5
        } else if model.kind() == crate::model::ArchitectureKind::Encoder {
            return Err(crate::model::family::cannot_generate(&*model));
        } else {
            return Err(Error::msg(format!(
                "the serving backend runs LLaMA-family decoders and T5 encoder-decoders; {} is neither",
                model.describe()
            )));
        };
        let attached = crate::peft::adapter_names(&*model);
        if !attached.is_empty() || model.virtual_prompt().is_some() {
            return Err(Error::msg(format!(
                "the model already has adapters attached ({}); load adapters through the server so that each request can pick one",
                if attached.is_empty() {
                    "a soft prompt".to_string()
                } else {
                    attached.join(", ")
                }
            )));
        }
        // A row of logits is as long as the output layer (padded vocabularies included).
        let vocab = model
            .output_layer()
            .and_then(|name| {
                model
                    .linears()
                    .into_iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.out_features())
            })
            .unwrap_or_else(|| model.dims().vocab_size);
        let context = match family {
            Family::Llama => model.context_length().unwrap_or(usize::MAX),
            // Relative positions: no hard limit, as `T5Decoder::context_length` says.
            Family::T5 => usize::MAX,
        };
        Ok(Self {
            model,
            family,
            vocab,
            context,
            chunked: false,
            slots: Vec::new(),
            adapters: Vec::new(),
            mounted: None,
        })
    }

    /// Feed LLaMA prompts in the scheduler's chunks (a long prompt no longer stalls the other
    /// sequences) instead of whole. Off by default: a prompt run in several forwards is not
    /// rounded exactly as one forward rounds it, so outputs could differ from
    /// `ferrotune generate` in rare near-ties. T5 reads its prompt whole either way.
    pub fn with_chunked_prefill(mut self, on: bool) -> Self {
        self.chunked = on && self.family == Family::Llama;
        self
    }

    /// The model served.
    pub fn model(&self) -> &dyn Model {
        &*self.model
    }

    fn slot_mut(&mut self, slot: SlotId) -> Result<&mut Slot> {
        self.slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::msg(format!("slot {slot} is not open")))
    }

    fn attached(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a.name == name)
    }

    fn no_such_adapter(&self, name: &str) -> Error {
        let names: Vec<String> = self.adapters.iter().map(|a| a.name.clone()).collect();
        Error::msg(format!(
            "no adapter named `{name}` is loaded (loaded: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    }

    /// Take the mounted adapter's pieces back out of the model.
    fn unmount(&mut self) {
        let Some(name) = self.mounted.take() else {
            return;
        };
        let Some(i) = self.attached(&name) else {
            return;
        };
        match &mut self.adapters[i].parts {
            Parts::Linear(parts) => {
                for (j, lin) in self.model.linears_mut().into_iter().enumerate() {
                    while let Some(a) = lin.remove_adapter(&name) {
                        parts.push((j, a));
                    }
                }
            }
            Parts::Prompt(_) => {
                let _ = self.model.set_virtual_prompt(None);
            }
        }
    }

    /// Make `want` the model's only adapter (`None`: the bare base).
    fn mount(&mut self, want: Option<&str>) -> Result<()> {
        if self.mounted.as_deref() == want {
            return Ok(());
        }
        self.unmount();
        let Some(name) = want else {
            return Ok(());
        };
        let i = self
            .attached(name)
            .ok_or_else(|| self.no_such_adapter(name))?;
        match &mut self.adapters[i].parts {
            Parts::Linear(parts) => {
                let mut lins = self.model.linears_mut();
                for (j, a) in parts.drain(..) {
                    lins[j].add_adapter(name, a);
                }
            }
            Parts::Prompt(p) => self.model.set_virtual_prompt(Some(Arc::clone(p)))?,
        }
        self.mounted = Some(name.to_string());
        Ok(())
    }

    /// Run `ids` on slot `slot` (its adapter already mounted); `want_logits`: return the last
    /// position's logits (the prompt's last chunk, a step).
    fn run(&mut self, slot: SlotId, ids: &[u32], want_logits: bool) -> Result<Option<Vec<f32>>> {
        let model = &self.model;
        let family = self.family;
        let s = self
            .slots
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::msg(format!("slot {slot} is not open")))?;
        match (&mut s.state, family) {
            (DecodeState::Llama(cache), Family::Llama) => {
                let llama = model
                    .downcast_ref::<Llama>()
                    .ok_or_else(|| Error::msg("the model is not a LLaMA-family decoder"))?;
                if want_logits {
                    crate::generate::llama_logits(llama, ids, cache).map(Some)
                } else {
                    // A middle chunk: only its keys and values are needed.
                    let t = candle_core::Tensor::new(ids, llama.device())?.unsqueeze(0)?;
                    llama.forward_hidden(&t, Some(cache), false)?;
                    Ok(None)
                }
            }
            (DecodeState::T5(cache), Family::T5) => {
                let t5 = model
                    .downcast_ref::<T5>()
                    .ok_or_else(|| Error::msg("the model is not a T5 encoder-decoder"))?;
                match cache {
                    None => {
                        let (c, logits) = t5.prefill_cache(ids)?;
                        *cache = Some(c);
                        Ok(Some(logits))
                    }
                    Some(c) => match ids {
                        [id] => t5.step_cache(c, *id).map(Some),
                        _ => Err(Error::msg("T5 steps take one token at a time")),
                    },
                }
            }
            _ => Err(Error::msg("slot state does not match the model's family")),
        }
    }

    /// One decode step of one slot.
    fn step_one(&mut self, slot: SlotId, id: u32) -> Result<Vec<f32>> {
        let vocab = self.vocab;
        let s = self.slot_mut(slot)?;
        if !s.primed {
            return Err(Error::msg(format!(
                "slot {slot} is stepped before its prompt was fed"
            )));
        }
        if id as usize >= vocab {
            return Err(Error::msg(format!(
                "token id {id} is outside the vocabulary of {vocab} tokens"
            )));
        }
        let adapter = s.adapter.clone();
        self.mount(adapter.as_deref())?;
        self.run(slot, &[id], true)?
            .ok_or_else(|| Error::msg("no logits for the step"))
    }
}

impl BatchBackend for ModelBackend {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_length(&self) -> usize {
        self.context
    }
    fn prompt_in_context(&self) -> bool {
        self.family == Family::Llama
    }
    fn chunked_prefill(&self) -> bool {
        self.chunked
    }

    fn open(&mut self, adapter: Option<&str>) -> Result<SlotId> {
        if let Some(a) = adapter {
            if self.attached(a).is_none() {
                return Err(self.no_such_adapter(a));
            }
        }
        let state = match self.family {
            Family::Llama => DecodeState::Llama(
                self.model
                    .downcast_ref::<Llama>()
                    .map(Llama::new_cache)
                    .unwrap_or_default(),
            ),
            Family::T5 => DecodeState::T5(None),
        };
        let slot = Slot {
            adapter: adapter.map(str::to_string),
            state,
            pending: Vec::new(),
            primed: false,
        };
        match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(slot);
                Ok(i)
            }
            None => {
                self.slots.push(Some(slot));
                Ok(self.slots.len() - 1)
            }
        }
    }

    fn prefill(&mut self, slot: SlotId, ids: &[u32], last: bool) -> Result<Option<Vec<f32>>> {
        let vocab = self.vocab;
        let chunked = self.chunked;
        let s = self.slot_mut(slot)?;
        if s.primed {
            return Err(Error::msg(format!(
                "slot {slot}: the prompt was already fed"
            )));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::msg(format!(
                "prompt: token id {t} is outside the vocabulary of {vocab} tokens"
            )));
        }
        let adapter = s.adapter.clone();
        let ids: Vec<u32> = if chunked {
            ids.to_vec()
        } else {
            // Whole-prompt prefill: hold chunks back until the last one.
            s.pending.extend_from_slice(ids);
            if !last {
                return Ok(None);
            }
            std::mem::take(&mut s.pending)
        };
        if ids.is_empty() {
            return Err(Error::msg("the prompt is empty (0 tokens)"));
        }
        self.mount(adapter.as_deref())?;
        let out = self.run(slot, &ids, last)?;
        if last {
            self.slot_mut(slot)?.primed = true;
        }
        Ok(out)
    }

    fn step(&mut self, batch: &[(SlotId, u32)]) -> Result<Vec<Vec<f32>>> {
        self.step_rows(batch).into_iter().collect()
    }

    fn step_rows(&mut self, batch: &[(SlotId, u32)]) -> Vec<Result<Vec<f32>>> {
        // Rows grouped by adapter (each sequence is independent, so the order does not change
        // any value), the mounted adapter's rows first.
        let adapter_of = |s: SlotId| -> Option<String> {
            self.slots
                .get(s)
                .and_then(Option::as_ref)
                .and_then(|s| s.adapter.clone())
        };
        let mut order: Vec<(Option<String>, usize)> = batch
            .iter()
            .enumerate()
            .map(|(i, &(s, _))| (adapter_of(s), i))
            .collect();
        let mounted = self.mounted.clone();
        order.sort_by(|a, b| {
            (a.0 != mounted)
                .cmp(&(b.0 != mounted))
                .then_with(|| a.0.cmp(&b.0))
                .then(a.1.cmp(&b.1))
        });
        let mut out: Vec<Option<Result<Vec<f32>>>> = (0..batch.len()).map(|_| None).collect();
        for (_, i) in order {
            let (slot, id) = batch[i];
            out[i] = Some(self.step_one(slot, id));
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::msg("row not stepped"))))
            .collect()
    }

    fn close(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
        // Trailing free slots are dropped so the table does not only grow.
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
    }

    fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<()> {
        if name.is_empty() || name.contains('.') {
            return Err(Error::msg(format!(
                "adapter name `{name}` must be non-empty and contain no '.'"
            )));
        }
        if self.attached(name).is_some() {
            return Err(Error::msg(format!(
                "an adapter named `{name}` is already loaded; unload it first or pick another name"
            )));
        }
        if crate::peft::selective::is_selective_dir(dir) {
            return Err(Error::file(
                dir,
                "a selective fine-tuning adapter replaces base weights, so it cannot be picked per request; merge it into the model and serve that",
            ));
        }
        // Loaded onto the bare base, then taken off again: nothing else is attached while the
        // method's own loader runs (and checks shapes and names).
        self.unmount();
        match crate::peft::load_adapter(&mut *self.model, dir, name) {
            Ok(loaded) => {
                let parts = match loaded.config {
                    crate::peft::AdapterConfig::Prompt(_) => {
                        let p = self.model.virtual_prompt().ok_or_else(|| {
                            Error::file(dir, "the soft prompt was not attached to the model")
                        })?;
                        self.model.set_virtual_prompt(None)?;
                        Parts::Prompt(p)
                    }
                    _ => Parts::Linear(Vec::new()),
                };
                self.adapters.push(Attached {
                    name: name.to_string(),
                    parts,
                });
                // Linear pieces are collected by unmounting them like any mounted adapter.
                self.mounted = Some(name.to_string());
                self.unmount();
                Ok(())
            }
            Err(e) => {
                // Whatever a failed load left behind goes.
                for lin in self.model.linears_mut() {
                    while lin.remove_adapter(name).is_some() {}
                }
                let _ = self.model.set_virtual_prompt(None);
                Err(e)
            }
        }
    }

    fn unload_adapter(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.attached(name) else {
            return Err(self.no_such_adapter(name));
        };
        let users = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.adapter.as_deref() == Some(name))
            .count();
        if users > 0 {
            return Err(Error::msg(format!(
                "adapter `{name}` is in use by {users} open sequence(s)"
            )));
        }
        if self.mounted.as_deref() == Some(name) {
            self.unmount();
        }
        self.adapters.remove(i);
        Ok(())
    }

    fn adapters(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    //! The backend through the scheduler against `generate` on the model's own decoder: same
    //! tokens, for the base and each adapter method, with sequences of different lengths and
    //! adapters in flight at once.
    use super::*;
    use crate::data::testutil::{tiny_tokenizer, TempDir};
    use crate::generate::{generate, GenerationConfig};
    use crate::model::{config_from_hf_dir, LoadOptions, ModelSource, SafetensorsSource};
    use crate::peft::lora::{InitLoraWeights, LoraConfig};
    use crate::peft::prompt_learning::{self, PromptLearningConfig, PromptMethod};
    use crate::serve::{scheduler, GenRequest, SamplingParams, SeqEvent};
    use candle_core::{Device, Tensor};
    use std::path::PathBuf;
    use std::sync::mpsc;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn tiny_llama() -> Box<dyn Model> {
        let dir = fixtures().join("models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
        Box::new(Llama::load(&src, &cfg).unwrap())
    }

    fn tiny_t5() -> crate::model::LoadedModel {
        crate::model::load_source(
            ModelSource::HfDir(fixtures().join("t5/t5-v1_0")),
            &LoadOptions::default(),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Give every parameter of adapter `name` random values (fresh adapters are often the
    /// identity), so that the adapter visibly changes the output. Seeded: the same values every
    /// run (candle's `randn` draws from an unseeded generator, which made these tests pass or
    /// fail by chance when a draw put two greedy candidates within rounding of each other).
    fn randomize(model: &dyn Model, name: &str, seed: u64, scale: f64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for (i, (_, v)) in crate::peft::adapter_params(model, name)
            .into_iter()
            .enumerate()
        {
            // unit variance (uniform on +-sqrt 3), plus a deterministic offset per tensor
            let off = ((seed as f64 + i as f64) * 0.37).sin();
            let a = 3f64.sqrt();
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| ((rng.random_range(-a..a) + off) * scale) as f32)
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    /// A LoRA adapter folder with random A and B (on a fresh copy of `base`).
    fn lora_dir(tmp: &TempDir, base: fn() -> Box<dyn Model>, name: &str, seed: u64) -> PathBuf {
        let mut m = base();
        let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "o_proj", "down_proj"]);
        cfg.init_lora_weights = InitLoraWeights::Bool(false);
        crate::peft::attach_lora(&mut *m, &cfg, "x", seed).unwrap();
        randomize(&*m, "x", seed, 0.3);
        let dir = tmp.path(name);
        crate::peft::save_adapter(&*m, "x", &cfg, &dir).unwrap();
        dir
    }

    /// An IA3 adapter folder (attention keys/values and the feed-forward down projection,
    /// whose input IA3 rescales) with random scales.
    fn ia3_dir(tmp: &TempDir, name: &str) -> PathBuf {
        let mut m = tiny_llama();
        let cfg = crate::peft::Ia3Config::new(&["k_proj", "v_proj", "down_proj"], &["down_proj"]);
        crate::peft::attach_ia3(&mut *m, &cfg, "x", 0).unwrap();
        randomize(&*m, "x", 5, 0.8);
        let dir = tmp.path(name);
        crate::peft::save_adapter(&*m, "x", &cfg, &dir).unwrap();
        dir
    }

    /// A prompt tuning or prefix tuning adapter folder (random virtual tokens).
    fn prompt_dir(tmp: &TempDir, name: &str, method: PromptMethod) -> PathBuf {
        let mut m = tiny_llama();
        let cfg = PromptLearningConfig::new(method, 3);
        let a = prompt_learning::attach_prompt(&mut *m, &cfg, None, 9, "test").unwrap();
        let dir = tmp.path(name);
        prompt_learning::save_prompt_adapter(&a.config, &a.encoder, &dir).unwrap();
        dir
    }

    /// `generate` with the model's own decoder, `adapter` loaded as the CLI loads it.
    fn reference(
        mut model: Box<dyn Model>,
        tok: &crate::tokenizer::Tokenizer,
        adapter: Option<&Path>,
        prompt: &[u32],
        cfg: &GenerationConfig,
    ) -> Vec<u32> {
        if let Some(d) = adapter {
            crate::peft::load_adapter(&mut *model, d, "adapter0").unwrap();
        }
        let mut dec =
            crate::generate::decoder_for(&*model, crate::generate::Engine::Model).unwrap();
        generate(&mut *dec, tok, prompt, cfg, &mut |_| {})
            .unwrap()
            .token_ids
    }

    /// Submit a request; its events arrive on the returned receiver.
    fn submit(h: &scheduler::SchedulerHandle, req: GenRequest) -> mpsc::Receiver<SeqEvent> {
        let (tx, rx) = mpsc::channel();
        h.submit(req, Box::new(move |ev| tx.send(ev).is_ok()))
            .unwrap();
        rx
    }

    /// The tokens of a finished sequence (a trailing stop id dropped, as `generate` drops EOS).
    fn tokens(rx: mpsc::Receiver<SeqEvent>, stop: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        for ev in rx.iter() {
            match ev {
                SeqEvent::Token { id, .. } => out.push(id),
                SeqEvent::Finished { .. } => break,
                SeqEvent::Failed(m) => panic!("sequence failed: {m}"),
            }
        }
        if out.last().is_some_and(|t| stop.contains(t)) {
            out.pop();
        }
        out
    }

    fn request(prompt: Vec<u32>, adapter: Option<&str>, max: usize, stop: &[u32]) -> GenRequest {
        GenRequest {
            prompt,
            adapter: adapter.map(str::to_string),
            max_tokens: max,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            logprobs: None,
            stop_ids: stop.to_vec(),
            constraint: None,
        }
    }

    fn greedy(max: usize) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: max,
            temperature: 0.0,
            ..Default::default()
        }
    }

    fn prompt(len: usize, salt: u32) -> Vec<u32> {
        (0..len as u32)
            .map(|i| 3 + (i * 7 + salt * 13) % 200)
            .collect()
    }

    #[test]
    fn greedy_equals_generate_for_every_adapter_method_in_one_mixed_batch() {
        let tmp = TempDir::new("serve-backend-mixed");
        let tok = tiny_tokenizer(None);
        let stop = tok.eos_ids().to_vec();
        let adapters: Vec<(&str, PathBuf)> = vec![
            ("lora1", lora_dir(&tmp, tiny_llama, "lora1", 1)),
            ("lora2", lora_dir(&tmp, tiny_llama, "lora2", 2)),
            ("ia3", ia3_dir(&tmp, "ia3")),
            ("pt", prompt_dir(&tmp, "pt", PromptMethod::PromptTuning)),
            (
                "prefix",
                prompt_dir(&tmp, "prefix", PromptMethod::PrefixTuning),
            ),
        ];
        let backend = ModelBackend::new(tiny_llama()).unwrap();
        let h = scheduler::start(
            Box::new(backend),
            scheduler::SchedulerConfig {
                max_concurrent: 4,
                max_queue: 32,
                prefill_chunk: 16,
                request_timeout: None,
            },
        );
        for (n, d) in &adapters {
            h.load_adapter(n, d).unwrap();
        }
        assert_eq!(
            h.adapters(),
            adapters.iter().map(|a| a.0.to_string()).collect::<Vec<_>>()
        );
        // Every adapter twice and the base, prompts of different lengths, all in flight.
        let mut jobs: Vec<(Option<usize>, Vec<u32>, usize)> = Vec::new();
        for k in 0..2 {
            jobs.push((None, prompt(3 + 9 * k, k as u32), 12 + 5 * k));
            for a in 0..adapters.len() {
                jobs.push((
                    Some(a),
                    prompt(2 + 5 * a + 11 * k, (a + k) as u32),
                    10 + 3 * a,
                ));
            }
        }
        let rxs: Vec<_> = jobs
            .iter()
            .map(|(a, p, max)| {
                submit(
                    &h,
                    request(p.clone(), a.map(|a| adapters[a].0), *max, &stop),
                )
            })
            .collect();
        let mut base_outputs = Vec::new();
        for ((a, p, max), rx) in jobs.iter().zip(rxs) {
            let got = tokens(rx, &stop);
            let want = reference(
                tiny_llama(),
                &tok,
                a.map(|a| adapters[a].1.as_path()),
                p,
                &greedy(*max),
            );
            assert_eq!(got, want, "adapter {a:?}, prompt of {}", p.len());
            assert!(!got.is_empty());
            if a.is_none() {
                base_outputs.push((p.clone(), *max, got));
            }
        }
        // The adapters matter: each changes the greedy output of the first base prompt.
        let (p, max, base) = &base_outputs[0];
        for (n, d) in &adapters {
            let with = reference(tiny_llama(), &tok, Some(d), p, &greedy(*max));
            assert_ne!(&with, base, "adapter {n} does not change the output");
        }
        let m = h.metrics();
        assert_eq!(m.requests_total, jobs.len() as u64);
        assert_eq!(m.requests_failed, 0);
        assert!(
            m.decode_rows > m.decode_steps,
            "sequences shared steps: {} rows in {} steps",
            m.decode_rows,
            m.decode_steps
        );
        h.shutdown();
        h.join();
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_equals_generate() {
        let tok = tiny_tokenizer(None);
        let h = scheduler::start(
            Box::new(ModelBackend::new(tiny_llama()).unwrap()),
            scheduler::SchedulerConfig::default(),
        );
        let p = prompt(6, 3);
        let sampled = |seed: u64| {
            let mut r = request(p.clone(), None, 24, &[]);
            r.sampling = SamplingParams {
                temperature: 0.9,
                top_p: Some(0.95),
                top_k: Some(50),
                seed: Some(seed),
                ..Default::default()
            };
            r
        };
        let rx: Vec<_> = [7, 7, 8].iter().map(|&s| submit(&h, sampled(s))).collect();
        let out: Vec<Vec<u32>> = rx.into_iter().map(|r| tokens(r, &[])).collect();
        assert_eq!(out[0], out[1], "same seed, same tokens");
        assert_ne!(out[0], out[2], "another seed, other tokens");
        let cfg = GenerationConfig {
            max_new_tokens: 24,
            temperature: 0.9,
            top_p: Some(0.95),
            top_k: Some(50),
            seed: 7,
            stop_on_eos: false,
            ..Default::default()
        };
        assert_eq!(out[0], reference(tiny_llama(), &tok, None, &p, &cfg));
        h.shutdown();
        h.join();
    }

    #[test]
    fn t5_greedy_equals_generate_with_and_without_lora() {
        let tmp = TempDir::new("serve-backend-t5");
        let lm = tiny_t5();
        let tok = lm.tokenizer;
        let stop = tok.eos_ids().to_vec();
        fn t5() -> Box<dyn Model> {
            tiny_t5().model
        }
        let lora = {
            let mut m = t5();
            let mut cfg = LoraConfig::new(4, 8.0, &["q", "v"]);
            cfg.init_lora_weights = InitLoraWeights::Bool(false);
            crate::peft::attach_lora(&mut *m, &cfg, "x", 3).unwrap();
            randomize(&*m, "x", 3, 0.5);
            let d = tmp.path("t5lora");
            crate::peft::save_adapter(&*m, "x", &cfg, &d).unwrap();
            d
        };
        let backend = ModelBackend::new(lm.model).unwrap();
        assert!(!backend.prompt_in_context() && !backend.chunked_prefill());
        let h = scheduler::start(
            Box::new(backend),
            scheduler::SchedulerConfig {
                prefill_chunk: 2,
                ..Default::default()
            },
        );
        h.load_adapter("l", &lora).unwrap();
        let vocab = h.vocab_size() as u32;
        let jobs: Vec<(Option<&str>, Vec<u32>)> = (0..4)
            .map(|i| {
                let p: Vec<u32> = (0..(3 + 4 * i) as u32)
                    .map(|j| 5 + (j * 11 + i as u32 * 3) % (vocab - 10))
                    .collect();
                (if i % 2 == 0 { None } else { Some("l") }, p)
            })
            .collect();
        let rxs: Vec<_> = jobs
            .iter()
            .map(|(a, p)| submit(&h, request(p.clone(), *a, 12, &stop)))
            .collect();
        for ((a, p), rx) in jobs.iter().zip(rxs) {
            let got = tokens(rx, &stop);
            let want = reference(t5(), &tok, a.map(|_| lora.as_path()), p, &greedy(12));
            assert_eq!(got, want, "adapter {a:?}");
        }
        let (_, p) = &jobs[0];
        assert_ne!(
            reference(t5(), &tok, Some(&lora), p, &greedy(12)),
            reference(t5(), &tok, None, p, &greedy(12)),
            "the LoRA adapter changes the output"
        );
        h.shutdown();
        h.join();
    }

    #[test]
    fn adapters_load_unload_and_refuse_bad_input() {
        let tmp = TempDir::new("serve-backend-adapters");
        let mut b = ModelBackend::new(tiny_llama()).unwrap();
        let d = lora_dir(&tmp, tiny_llama, "a", 1);
        b.load_adapter("a", &d).unwrap();
        let one_line = |e: Error| {
            let m = e.to_string();
            assert_eq!(m.lines().count(), 1, "{m}");
            m
        };
        assert!(one_line(b.load_adapter("a", &d).unwrap_err()).contains("already loaded"));
        assert!(one_line(b.load_adapter("x.y", &d).unwrap_err()).contains("no '.'"));
        let missing = tmp.path("missing");
        let e = one_line(b.load_adapter("m", &missing).unwrap_err());
        assert!(e.contains("missing"), "{e}");
        assert_eq!(b.adapters(), vec!["a".to_string()]);
        // Nothing of a failed load stays on the model.
        assert!(crate::peft::adapter_names(b.model()).is_empty());
        assert!(one_line(b.open(Some("nope")).unwrap_err()).contains("`nope`"));
        let s = b.open(Some("a")).unwrap();
        assert!(one_line(b.unload_adapter("a").unwrap_err()).contains("in use"));
        b.prefill(s, &[3, 4, 5], true).unwrap().unwrap();
        b.close(s);
        b.unload_adapter("a").unwrap();
        assert!(b.adapters().is_empty());
        assert!(crate::peft::adapter_names(b.model()).is_empty());
        // A model that already carries an adapter is refused: requests could not pick.
        let mut m = tiny_llama();
        crate::peft::load_adapter(&mut *m, &d, "z").unwrap();
        let e = one_line(ModelBackend::new(m).err().unwrap());
        assert!(e.contains("already has adapters"), "{e}");
    }

    #[test]
    fn chunked_prefill_feeds_the_cache_like_one_forward() {
        // With chunks on, the KV cache and the next logits agree with one forward up to
        // rounding (exact equality is not promised, hence off by default).
        let mut whole = ModelBackend::new(tiny_llama()).unwrap();
        let mut chunked = ModelBackend::new(tiny_llama())
            .unwrap()
            .with_chunked_prefill(true);
        assert!(chunked.chunked_prefill() && !whole.chunked_prefill());
        let p = prompt(20, 1);
        let a = whole.open(None).unwrap();
        let b = chunked.open(None).unwrap();
        let la = whole.prefill(a, &p, true).unwrap().unwrap();
        for (i, c) in p.chunks(6).enumerate() {
            let last = (i + 1) * 6 >= p.len();
            let r = chunked.prefill(b, c, last).unwrap();
            assert_eq!(r.is_some(), last);
            if last {
                let lb = r.unwrap();
                let d = la
                    .iter()
                    .zip(&lb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "max |diff| {d}");
            }
        }
        let sa = whole.step(&[(a, 9)]).unwrap();
        let sb = chunked.step(&[(b, 9)]).unwrap();
        let d = sa[0]
            .iter()
            .zip(&sb[0])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "max |diff| {d}");
    }
}
