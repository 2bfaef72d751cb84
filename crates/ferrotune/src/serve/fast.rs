//! [`FastBatchBackend`]: the allocation-free CPU LLaMA engine of [`crate::engine`] serving many
//! sequences at once, each in its own slot (KV cache) with its own LoRA adapter.
//!
//! - A decode step ([`BatchBackend::step`]) runs all its rows through one pass over each weight
//!   matrix ([`crate::quant::QuantWeight::decode_rows_into`]); attention runs per row over its
//!   own cache and position, LoRA per row (`scale · B (A x)`, the rows of each adapter).
//! - Prefix caching ([`BatchBackend::open_with_prompt`]): a closed slot keeps its prefilled
//!   prompt tokens, and a new prompt of the same adapter that starts the same way reopens it
//!   holding those positions (a chat template's system prompt, few-shot examples).
//! - Every row's logits are bit-identical whatever the batch size and whatever else is in the
//!   batch, prefill chunking does not change them either, and they equal what `generate`'s
//!   [`crate::engine::FastDecoder`] computes for the same prompt, base and adapter: both run
//!   [`crate::engine::Weights::forward`] (see the engine's module docs for how).
//! - Adapters: plain LoRA (rsLoRA scaling and per-module ranks/alphas included) on any of the
//!   attention and MLP projections and the LM head, read from PEFT folders. DoRA, IA3,
//!   bottleneck adapters, soft prompts, `modules_to_save` and PiSSA/OLoRA inits (which change
//!   the base weights) are one-line errors: the caller serves those with the generic
//!   [`super::backend::ModelBackend`].
use super::backend::{BatchBackend, MixedResults, PromptChunk, SlotId};
use crate::engine::{Kernel, KvCache, LoraDelta, Row, Scratch, Weights};
use crate::model::Model;
use crate::peft::lora::InitKind;
use crate::peft::AdapterConfig;
use crate::{Error, Result};
use std::path::Path;

/// A closed slot keeps its cache for the next sequence unless it grew past this many bytes
/// (a long sequence's cache is freed rather than held while idle).
const KEEP_CACHE_BYTES: usize = 64 << 20;

/// Closed slots kept for their prompt prefixes before a new sequence recycles one (each holds
/// its KV cache: 12 MB for SmolLM2-135M at the first 256 positions).
const PREFIX_SLOTS: usize = 4;

struct Slot {
    cache: KvCache,
    /// The adapter set of its sequence (`None`: the base), and whether a sequence holds it.
    set: Option<u32>,
    open: bool,
    /// The prompt tokens at the cache's first positions, whose keys and values were computed by
    /// prefill (not by decode steps, whose arithmetic differs), with adapter set `prefix_set`.
    /// They outlive the sequence: a later prompt with the same start and adapter reuses them.
    prefix: Vec<u32>,
    prefix_set: Option<u32>,
}

/// One attached adapter: its name and the engine's adapter set.
struct Adapter {
    name: String,
    set: u32,
}

/// Many sequences over one LLaMA model on the CPU, a LoRA adapter per sequence.
pub struct FastBatchBackend {
    /// The base model: adapters are attached to it only while their weights are read.
    model: Box<dyn Model>,
    w: Weights,
    slots: Vec<Slot>,
    adapters: Vec<Adapter>,
    next_set: u32,
    scratch: Scratch,
}

impl FastBatchBackend {
    /// Why `model` cannot run on this backend (not a LLaMA-family model on the CPU with
    /// quantized or dense f32 weights, or adapters already attached), as a one-line error.
    pub fn check(model: &dyn Model) -> Result<()> {
        let attached = crate::peft::adapter_names(model);
        if !attached.is_empty() || model.virtual_prompt().is_some() {
            return Err(Error::msg(format!(
                "the fast engine takes a base model without adapters (attached: {}); load them through the backend",
                if attached.is_empty() {
                    "a soft prompt".to_string()
                } else {
                    attached.join(", ")
                }
            )));
        }
        if Weights::new(model).is_none() {
            return Err(Error::msg(format!(
                "the fast engine does not run this model (a {} model; it runs LLaMA-family decoders on the CPU with GGML-quantized, bitsandbytes or dense weights)",
                model.family()
            )));
        }
        Ok(())
    }

    /// A backend over `model` (see [`Self::check`] for what it runs).
    pub fn new(model: Box<dyn Model>) -> Result<Self> {
        Self::check(&*model)?;
        let w = Weights::new(&*model)
            .ok_or_else(|| Error::msg("the fast engine does not run this model"))?;
        w.prepare_decode();
        Ok(Self {
            model,
            w,
            slots: Vec::new(),
            adapters: Vec::new(),
            next_set: 0,
            scratch: Scratch::default(),
        })
    }

    /// The base model (without adapters).
    pub fn model(&self) -> &dyn Model {
        &*self.model
    }

    /// Open sequences.
    pub fn open_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.open).count()
    }

    /// Positions held by `slot`'s cache (0 for a closed or unknown slot).
    pub fn cached(&self, slot: SlotId) -> usize {
        self.slots
            .get(slot)
            .filter(|s| s.open)
            .map_or(0, |s| s.cache.len)
    }

    /// Prompt chunks and decode rows (one token each) in one forward pass with `kernel`: what
    /// `prefill`, `step_rows` and `step_mixed` run. Each chunk and row is checked on its own
    /// first (a slot not open or named twice, an empty chunk, a step before the prompt, past
    /// the context): one that fails gets its error and the others run; an error of the pass
    /// itself is every row's. Returns, per chunk, the logits of its last position when it is
    /// its prompt's last chunk, and per decode row its logits.
    fn pass(
        &mut self,
        chunks: &[PromptChunk<'_>],
        decode: &[(SlotId, u32)],
        kernel: Kernel,
    ) -> MixedResults {
        let ctx = self.w.context_length();
        let mut pre: Vec<Result<Option<Vec<f32>>>> = chunks.iter().map(|_| Ok(None)).collect();
        let mut dec: Vec<Result<Vec<f32>>> = decode.iter().map(|_| Ok(Vec::new())).collect();
        let mut seen = std::collections::HashSet::new();
        let mut once = |slot: SlotId| -> Result<()> {
            if seen.insert(slot) {
                Ok(())
            } else {
                Err(Error::msg(format!("slot {slot} appears twice in one step")))
            }
        };
        let overflow = |tokens: usize| Error::ContextOverflow {
            tokens,
            context: ctx,
            hint: String::new(),
        };
        // chunks and rows that run, with their first position
        let mut ok_chunks = Vec::new();
        for (j, c) in chunks.iter().enumerate() {
            let r = once(c.slot).and_then(|()| {
                if c.ids.is_empty() {
                    return Err(Error::msg(format!(
                        "slot {}: an empty prompt chunk",
                        c.slot
                    )));
                }
                let base = self.slot_mut(c.slot)?.cache.len;
                if base + c.ids.len() > ctx {
                    return Err(overflow(base + c.ids.len()));
                }
                Ok(base)
            });
            match r {
                Ok(base) => ok_chunks.push((j, base)),
                Err(e) => pre[j] = Err(e),
            }
        }
        let mut ok_rows = Vec::new();
        for (j, &(slot, _)) in decode.iter().enumerate() {
            let r = once(slot).and_then(|()| {
                let len = self.slot_mut(slot)?.cache.len;
                if len == 0 {
                    return Err(Error::msg(format!(
                        "slot {slot}: a step before its prompt was prefilled"
                    )));
                }
                if len >= ctx {
                    return Err(overflow(len + 1));
                }
                Ok(len)
            });
            match r {
                Ok(len) => ok_rows.push((j, len)),
                Err(e) => dec[j] = Err(e),
            }
        }
        if ok_chunks.is_empty() && ok_rows.is_empty() {
            return (pre, dec);
        }
        // the caches in slot order (one mutable borrow each), and each slot's index into them
        let mut used: Vec<SlotId> = ok_chunks
            .iter()
            .map(|&(j, _)| chunks[j].slot)
            .chain(ok_rows.iter().map(|&(j, _)| decode[j].0))
            .collect();
        used.sort_unstable();
        let seq_of = |slot: SlotId| used.binary_search(&slot).unwrap_or(0);
        let mut caches: Vec<&mut KvCache> = Vec::with_capacity(used.len());
        let mut sets = vec![None; used.len()];
        let mut wanted = used.iter().peekable();
        for (id, s) in self.slots.iter_mut().enumerate() {
            if wanted.peek() == Some(&&id) {
                wanted.next();
                sets[caches.len()] = s.set;
                caches.push(&mut s.cache);
            }
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut want: Vec<usize> = Vec::new();
        for &(j, len) in &ok_rows {
            let (slot, id) = decode[j];
            let seq = seq_of(slot);
            want.push(rows.len());
            rows.push(Row {
                seq,
                pos: len,
                id,
                set: sets[seq],
            });
        }
        for &(j, base) in &ok_chunks {
            let c = &chunks[j];
            let seq = seq_of(c.slot);
            rows.extend(c.ids.iter().enumerate().map(|(i, &id)| Row {
                seq,
                pos: base + i,
                id,
                set: sets[seq],
            }));
            if c.last {
                want.push(rows.len() - 1);
            }
        }
        let out = self
            .w
            .forward(&mut caches, &rows, &want, kernel, &mut self.scratch);
        drop(caches);
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                // one entry keeps the error as it is; several get its text each
                match (&ok_chunks[..], &ok_rows[..]) {
                    ([(j, _)], []) => pre[*j] = Err(e),
                    ([], [(j, _)]) => dec[*j] = Err(e),
                    _ => {
                        let m = e.to_string();
                        for &(j, _) in &ok_chunks {
                            pre[j] = Err(Error::msg(m.clone()));
                        }
                        for &(j, _) in &ok_rows {
                            dec[j] = Err(Error::msg(m.clone()));
                        }
                    }
                }
                return (pre, dec);
            }
        };
        let mut next = logits.chunks_exact(self.w.vocab_size());
        for &(j, _) in &ok_rows {
            dec[j] = Ok(next.next().map(<[f32]>::to_vec).unwrap_or_default());
        }
        for &(j, base) in &ok_chunks {
            let c = &chunks[j];
            if c.last {
                pre[j] = Ok(next.next().map(<[f32]>::to_vec));
            }
            // reusable while every position before these came from prefill too
            let s = &mut self.slots[c.slot];
            if s.prefix.len() == base {
                s.prefix.extend_from_slice(c.ids);
            }
        }
        (pre, dec)
    }

    fn slot_mut(&mut self, slot: SlotId) -> Result<&mut Slot> {
        match self.slots.get_mut(slot) {
            Some(s) if s.open => Ok(s),
            _ => Err(Error::msg(format!("slot {slot} is not open"))),
        }
    }

    fn set_of(&self, name: &str) -> Result<u32> {
        self.adapters
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.set)
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown adapter `{name}` (loaded: {})",
                    if self.adapters.is_empty() {
                        "none".to_string()
                    } else {
                        self.adapter_list()
                    }
                ))
            })
    }

    fn adapter_list(&self) -> String {
        self.adapters
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Why the adapter folder `dir` cannot run on this backend (the fast engine runs plain LoRA).
    pub fn check_adapter_config(dir: &Path) -> Result<()> {
        let cfg = crate::peft::read_adapter_config(dir)?;
        let where_ = dir.join("adapter_config.json");
        let refuse = |what: &str| {
            Err(Error::file(
                where_.clone(),
                format!("{what}: the fast engine does not run it (it runs plain LoRA); serve this model with the generic backend (`ferrotune serve --engine model`)"),
            ))
        };
        match &cfg {
            AdapterConfig::Lora(c) => {
                if c.use_dora {
                    return refuse("a DoRA adapter (use_dora)");
                }
                if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
                    return refuse("an adapter with modules_to_save");
                }
                if c.init_lora_weights.kind().is_ok_and(InitKind::mutates_base) {
                    return refuse(
                        "a PiSSA/OLoRA/LoftQ adapter (its init changes the base weights)",
                    );
                }
                Ok(())
            }
            other => refuse(&format!("a {} adapter", other.peft_type())),
        }
    }

    /// The LoRA of adapter `name` on each projection of the model (in the order of
    /// `Llama::linears`), or an error naming the first module the engine cannot run.
    fn extract(&self, name: &str, set: u32) -> Result<Vec<Option<LoraDelta>>> {
        let mut out = Vec::new();
        for lin in self.model.linears() {
            let mut delta = None;
            for (n, a) in lin.adapters() {
                if n != name {
                    continue;
                }
                let lora = crate::peft::lora::as_lora(a).filter(|l| !l.is_merged());
                let (o, i) = (lin.out_features(), lin.in_features());
                delta = lora.and_then(|l| LoraDelta::from_lora(l, set, o, i));
                if delta.is_none() {
                    return Err(Error::msg(format!(
                        "adapter `{name}`: module `{}` is a {} layer: the fast engine does not run it (it runs plain LoRA); serve this model with the generic backend (`ferrotune serve --engine model`)",
                        lin.name(),
                        a.method()
                    )));
                }
            }
            out.push(delta);
        }
        Ok(out)
    }
}

impl BatchBackend for FastBatchBackend {
    fn vocab_size(&self) -> usize {
        self.w.vocab_size()
    }

    fn context_length(&self) -> usize {
        self.w.context_length()
    }

    fn open(&mut self, adapter: Option<&str>) -> Result<SlotId> {
        let set = adapter.map(|a| self.set_of(a)).transpose()?;
        // A closed slot without a reusable prefix; else a new slot while fewer than
        // PREFIX_SLOTS closed ones keep prefixes; else the closed one with the shortest prefix.
        let closed: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].open)
            .collect();
        let shortest = closed
            .iter()
            .copied()
            .min_by_key(|&i| self.slots[i].prefix.len());
        let free =
            shortest.filter(|&i| self.slots[i].prefix.is_empty() || closed.len() >= PREFIX_SLOTS);
        let i = match free {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    cache: KvCache::default(),
                    set: None,
                    open: false,
                    prefix: Vec::new(),
                    prefix_set: None,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.cache.len = 0;
        s.prefix.clear();
        s.prefix_set = set;
        s.set = set;
        s.open = true;
        Ok(i)
    }

    /// Prefix caching: the closed slot of the same adapter whose prefilled tokens share the
    /// longest start with `prompt` is reopened holding those positions (at most all but the
    /// prompt's last token, which must run for its logits). Their keys and values are what a
    /// fresh prefill would compute, bit for bit: a prompt row's arithmetic does not depend on
    /// the chunk it ran in (`chunked_prefill_equals_one_shot`), and only prefill rows count.
    fn open_with_prompt(
        &mut self,
        adapter: Option<&str>,
        prompt: &[u32],
    ) -> Result<(SlotId, usize)> {
        let set = adapter.map(|a| self.set_of(a)).transpose()?;
        let limit = prompt.len().saturating_sub(1);
        let best = (0..self.slots.len())
            .filter(|&i| !self.slots[i].open && self.slots[i].prefix_set == set)
            .map(|i| {
                let p = &self.slots[i].prefix;
                let n = p.iter().zip(prompt).take_while(|(a, b)| a == b).count();
                (i, n.min(limit))
            })
            .max_by_key(|&(_, n)| n);
        match best {
            Some((i, n)) if n > 0 => {
                let s = &mut self.slots[i];
                s.prefix.truncate(n);
                s.cache.len = n;
                s.set = set;
                s.open = true;
                Ok((i, n))
            }
            _ => Ok((self.open(adapter)?, 0)),
        }
    }

    fn prefill(&mut self, slot: SlotId, ids: &[u32], last: bool) -> Result<Option<Vec<f32>>> {
        let chunk = PromptChunk { slot, ids, last };
        let (mut pre, _) = self.pass(&[chunk], &[], Kernel::Prefill);
        pre.pop().unwrap_or(Ok(None))
    }

    fn step(&mut self, batch: &[(SlotId, u32)]) -> Result<Vec<Vec<f32>>> {
        self.step_rows(batch).into_iter().collect()
    }

    fn step_rows(&mut self, batch: &[(SlotId, u32)]) -> Vec<Result<Vec<f32>>> {
        self.pass(&[], batch, Kernel::Decode).1
    }

    fn mixed_steps(&self) -> bool {
        crate::engine::prefill_on_panels()
    }

    /// One forward pass over the prompt chunks' rows and the decode rows where prompt chunks
    /// run the decode arithmetic ([`Self::mixed_steps`]): each weight is read once for both,
    /// and every row's result is the one the separate passes give, bit for bit
    /// (`mixed_steps_equal_separate_passes`). Elsewhere the two passes.
    fn step_mixed(&mut self, chunks: &[PromptChunk<'_>], decode: &[(SlotId, u32)]) -> MixedResults {
        if self.mixed_steps() {
            self.pass(chunks, decode, Kernel::Decode)
        } else {
            super::backend::separately(self, chunks, decode)
        }
    }

    fn close(&mut self, slot: SlotId) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.open = false;
            s.set = None;
            s.cache.len = 0;
            if s.cache.bytes() > KEEP_CACHE_BYTES {
                s.cache = KvCache::default();
                s.prefix.clear();
            }
        }
    }

    fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<()> {
        if name.is_empty() || name.contains('.') {
            return Err(Error::msg(format!(
                "adapter name `{name}` must be non-empty and contain no '.'"
            )));
        }
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(Error::msg(format!(
                "an adapter named `{name}` is already loaded; unload it first"
            )));
        }
        Self::check_adapter_config(dir)?;
        crate::peft::load_adapter(&mut *self.model, dir, name)?;
        let set = self.next_set;
        // The base model goes back to no adapters whatever happens: the engine holds copies.
        let extracted = self.extract(name, set);
        let detached = crate::peft::remove_adapter(&mut *self.model, name);
        let deltas = extracted?;
        detached?;
        if self.model.virtual_prompt().is_some() {
            return Err(Error::msg(format!(
                "adapter `{name}`: a soft prompt: the fast engine does not run it"
            )));
        }
        self.w.add_loras(deltas)?;
        self.next_set += 1;
        self.adapters.push(Adapter {
            name: name.to_string(),
            set,
        });
        Ok(())
    }

    fn unload_adapter(&mut self, name: &str) -> Result<()> {
        let set = self.set_of(name)?;
        let users = self
            .slots
            .iter()
            .filter(|s| s.open && s.set == Some(set))
            .count();
        if users > 0 {
            return Err(Error::msg(format!(
                "adapter `{name}` is in use by {users} sequence(s); unload it when they finish"
            )));
        }
        self.w.remove_loras(set);
        self.adapters.retain(|a| a.name != name);
        Ok(())
    }

    fn adapters(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::TempDir;
    use crate::engine::{FastDecoder, KvDtype};
    use crate::generate::{Decoder, LlamaDecoder};
    use crate::model::{config_from_hf_dir, Llama, LoadOptions, SafetensorsSource};
    use crate::peft::lora::{InitLoraWeights, LoraConfig, ModuleSpec};
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    /// The tiny random LLaMA of the fixtures (GQA, untied head), dense or requantized.
    fn tiny(q: Option<GgmlDType>) -> Llama {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-llama-gqa-untied");
        let cfg = config_from_hf_dir(&dir).unwrap();
        let opts = LoadOptions {
            requantize: q,
            ..Default::default()
        };
        let src = SafetensorsSource::open(&dir, &opts, &Device::Cpu).unwrap();
        Llama::load(&src, &cfg).unwrap()
    }

    /// A LoRA adapter with random A and B (so it changes the output) saved as a PEFT folder.
    fn lora_dir(tmp: &TempDir, name: &str, targets: &[&str], r: usize, rslora: bool, seed: u64) {
        let mut m = tiny(None);
        let cfg = LoraConfig {
            r,
            lora_alpha: 2.0 * r as f64 + 1.0,
            use_rslora: rslora,
            target_modules: Some(ModuleSpec::List(
                targets.iter().map(|t| t.to_string()).collect(),
            )),
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        };
        crate::peft::attach_lora(&mut m, &cfg, "a", seed).unwrap();
        crate::peft::save_adapter(&m, "a", &cfg, &tmp.path(name)).unwrap();
    }

    /// Two adapters: q/v at rank 4, and every projection at rank 8 with rsLoRA.
    fn adapters(tmp: &TempDir) -> [(&'static str, std::path::PathBuf); 2] {
        lora_dir(tmp, "qv", &["q_proj", "v_proj"], 4, false, 1);
        let all = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        lora_dir(tmp, "all", &all, 8, true, 2);
        [("qv", tmp.path("qv")), ("all", tmp.path("all"))]
    }

    fn prompt(s: usize, len: usize) -> Vec<u32> {
        (0..len)
            .map(|i| ((s * 71 + i * 29 + 3) % 250) as u32)
            .collect()
    }

    /// What `generate` computes: the engine over the model with the adapter (if any) attached.
    fn alone(
        q: Option<GgmlDType>,
        adapter: Option<&std::path::Path>,
        prompt: &[u32],
        feed: &[u32],
    ) -> Vec<Vec<f32>> {
        alone_kv(q, KvDtype::F32, adapter, prompt, feed)
    }

    /// [`alone`] with a KV cache of `kv` values.
    fn alone_kv(
        q: Option<GgmlDType>,
        kv: KvDtype,
        adapter: Option<&std::path::Path>,
        prompt: &[u32],
        feed: &[u32],
    ) -> Vec<Vec<f32>> {
        let mut m = tiny(q);
        m.set_kv_cache_dtype(kv);
        if let Some(dir) = adapter {
            crate::peft::load_adapter(&mut m, dir, "x").unwrap();
        }
        let mut dec = FastDecoder::new(&m).expect("the engine runs plain LoRA");
        assert_eq!(dec.has_adapters(), adapter.is_some());
        let mut out = vec![dec.prefill(prompt).unwrap()];
        for &t in feed {
            out.push(dec.step(t).unwrap());
        }
        out
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Eight sequences of different prompt lengths and adapters (base, q/v, all projections),
    /// prefilled in chunks of different sizes and stepped in batches of 1 to 8 whose members
    /// change every step: every row's logits are bit-identical to the sequence decoded alone
    /// by `generate`'s engine.
    #[test]
    fn rows_are_bit_identical_whatever_the_batch() {
        let tmp = TempDir::new("fast-batch-rows");
        let ads = adapters(&tmp);
        for q in [Some(GgmlDType::Q4_1), Some(GgmlDType::Q8_0), None] {
            let mut be = FastBatchBackend::new(Box::new(tiny(q))).unwrap();
            for (n, d) in &ads {
                be.load_adapter(n, d).unwrap();
            }
            let n_seq = 8;
            let steps = 6;
            let seqs: Vec<(Option<usize>, Vec<u32>, Vec<u32>)> = (0..n_seq)
                .map(|s| {
                    let adapter = [None, Some(0), Some(1)][s % 3];
                    let feed = prompt(s + 100, steps);
                    (adapter, prompt(s, 3 + 5 * s), feed)
                })
                .collect();
            let want: Vec<Vec<Vec<f32>>> = seqs
                .iter()
                .map(|(a, p, f)| alone(q, a.map(|i| ads[i].1.as_path()), p, f))
                .collect();
            let mut slots = Vec::new();
            let mut done = vec![0usize; n_seq];
            for (s, (a, p, _)) in seqs.iter().enumerate() {
                let slot = be.open(a.map(|i| ads[i].0)).unwrap();
                // chunks of 1, 2, 3, ... tokens (the last may be shorter)
                let chunk = 1 + s % 4;
                let mut got = None;
                for (ci, c) in p.chunks(chunk).enumerate() {
                    let last = (ci + 1) * chunk >= p.len();
                    got = be.prefill(slot, c, last).unwrap();
                    assert_eq!(got.is_some(), last);
                }
                assert!(
                    same_bits(&got.unwrap(), &want[s][0]),
                    "{q:?}: sequence {s}: prefill logits differ from generate's"
                );
                slots.push(slot);
            }
            // Batches of changing membership and size: step k takes the sequences whose
            // index is not a multiple of (k % 4 + 2), then every sequence catches up.
            let mut k = 0;
            while done.iter().any(|&d| d < steps) {
                let members: Vec<usize> = (0..n_seq)
                    .filter(|&s| done[s] < steps && (k >= 6 || s % (k % 4 + 2) != 0))
                    .rev()
                    .collect();
                let batch: Vec<(SlotId, u32)> = members
                    .iter()
                    .map(|&s| (slots[s], seqs[s].2[done[s]]))
                    .collect();
                let out = be.step(&batch).unwrap();
                for (&s, row) in members.iter().zip(&out) {
                    done[s] += 1;
                    assert!(
                        same_bits(row, &want[s][done[s]]),
                        "{q:?}: sequence {s} step {} in a batch of {}: logits differ from alone",
                        done[s],
                        members.len()
                    );
                }
                k += 1;
            }
        }
    }

    /// Mixed steps (prompt chunks and decode rows in one pass, mixed adapters) give every
    /// sequence the logits it gets alone (`generate`'s), bit for bit, while others join, feed
    /// their prompts in chunks of different sizes and leave; a chunk or row that cannot run
    /// (a slot not open, named twice, past the context) gets its own error and the others run.
    /// Where prompt chunks do not run the decode arithmetic (no AVX-512) the backend runs the
    /// two passes apart and the same comparison holds.
    #[test]
    fn mixed_steps_equal_separate_passes() {
        let tmp = TempDir::new("fast-mixed");
        let ads = adapters(&tmp);
        let cases = [Some(GgmlDType::Q4_1), Some(GgmlDType::Q8_0), None]
            .into_iter()
            .map(|q| (q, KvDtype::F32))
            .chain([(Some(GgmlDType::Q4_1), KvDtype::F16), (None, KvDtype::F16)]);
        for (q, kv) in cases {
            let model = tiny(q);
            model.set_kv_cache_dtype(kv);
            let mut be = FastBatchBackend::new(Box::new(model)).unwrap();
            for (n, d) in &ads {
                be.load_adapter(n, d).unwrap();
            }
            let (n_seq, steps) = (6usize, 5usize);
            let seqs: Vec<(Option<usize>, Vec<u32>, Vec<u32>)> = (0..n_seq)
                .map(|s| {
                    (
                        [None, Some(0), Some(1)][s % 3],
                        prompt(s, 4 + 3 * s),
                        prompt(s + 50, steps),
                    )
                })
                .collect();
            let want: Vec<Vec<Vec<f32>>> = seqs
                .iter()
                .map(|(a, p, f)| alone_kv(q, kv, a.map(|i| ads[i].1.as_path()), p, f))
                .collect();
            if kv == KvDtype::F16 {
                // the setting took effect: rounded keys and values move the logits a little
                let (p, f) = (&seqs[1].1, &seqs[1].2);
                let exact = alone(q, None, p, f);
                let half = alone_kv(q, kv, None, p, f);
                let moved = exact.iter().zip(&half).any(|(a, b)| !same_bits(a, b));
                let worst = exact
                    .iter()
                    .flatten()
                    .zip(half.iter().flatten())
                    .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
                    .fold(0f32, f32::max);
                assert!(
                    moved && worst < 1e-2,
                    "f16 cache: moved {moved}, worst {worst}"
                );
            }
            // sequence s joins at iteration s; `fed` prompt tokens, `done` decode steps
            let mut slot = vec![None; n_seq];
            let (mut fed, mut done) = (vec![0usize; n_seq], vec![0usize; n_seq]);
            let mut it = 0;
            while done.iter().any(|&d| d < steps) {
                for s in 0..n_seq.min(it + 1) {
                    if slot[s].is_none() {
                        slot[s] = Some(be.open(seqs[s].0.map(|i| ads[i].0)).unwrap());
                    }
                }
                let mut chunks = Vec::new();
                let mut owners = Vec::new();
                for s in 0..n_seq {
                    let p = &seqs[s].1;
                    if let Some(sl) = slot[s].filter(|_| fed[s] < p.len()) {
                        let n = (1 + (s + it) % 4).min(p.len() - fed[s]);
                        chunks.push(PromptChunk {
                            slot: sl,
                            ids: &p[fed[s]..fed[s] + n],
                            last: fed[s] + n == p.len(),
                        });
                        owners.push((s, n));
                    }
                }
                // sequences whose prompt ended in an earlier pass decode
                let members: Vec<usize> = (0..n_seq)
                    .filter(|&s| fed[s] == seqs[s].1.len() && done[s] < steps)
                    .collect();
                let batch: Vec<(SlotId, u32)> = members
                    .iter()
                    .map(|&s| (slot[s].unwrap(), seqs[s].2[done[s]]))
                    .collect();
                // a closed slot's chunk and a slot named twice fail alone
                let mut bad = chunks.clone();
                bad.push(PromptChunk {
                    slot: 999,
                    ids: &[1],
                    last: true,
                });
                if let Some(sl) = chunks.first().map(|c| c.slot) {
                    bad.push(PromptChunk {
                        slot: sl,
                        ids: &[1],
                        last: false,
                    });
                }
                let (pre, dec) = be.step_mixed(&bad, &batch);
                assert_eq!((pre.len(), dec.len()), (bad.len(), batch.len()));
                for r in &pre[chunks.len()..] {
                    assert!(r.is_err(), "{q:?}: a bad chunk ran");
                }
                for (&(s, n), r) in owners.iter().zip(&pre) {
                    fed[s] += n;
                    let got = r.as_ref().unwrap();
                    assert_eq!(got.is_some(), fed[s] == seqs[s].1.len());
                    if let Some(l) = got {
                        assert!(
                            same_bits(l, &want[s][0]),
                            "{q:?}: sequence {s}: prompt logits differ from alone"
                        );
                    }
                }
                for (&s, r) in members.iter().zip(&dec) {
                    done[s] += 1;
                    assert!(
                        same_bits(r.as_ref().unwrap(), &want[s][done[s]]),
                        "{q:?}: sequence {s} step {} in a mixed pass of {} chunks and {} rows: \
                         logits differ from alone",
                        done[s],
                        chunks.len(),
                        members.len()
                    );
                }
                it += 1;
            }
            // past the context: that row alone fails
            let ctx = be.context_length();
            let sl = be.open(None).unwrap();
            let long = prompt(7, ctx + 1);
            let (pre, _) = be.step_mixed(
                &[PromptChunk {
                    slot: sl,
                    ids: &long,
                    last: true,
                }],
                &[],
            );
            assert!(
                matches!(pre[0], Err(Error::ContextOverflow { .. })),
                "{q:?}"
            );
        }
    }

    /// A prompt fed in chunks leaves the same cache and logits as one feed, bit for bit.
    #[test]
    fn chunked_prefill_equals_one_shot() {
        for q in [Some(GgmlDType::Q4_1), None] {
            let mut be = FastBatchBackend::new(Box::new(tiny(q))).unwrap();
            let p = prompt(7, 23);
            let one = be.open(None).unwrap();
            let a = be.prefill(one, &p, true).unwrap().unwrap();
            let a2 = be.step(&[(one, 5)]).unwrap();
            for chunk in [1, 2, 7, 22] {
                let s = be.open(None).unwrap();
                let mut last = None;
                for c in p.chunks(chunk) {
                    last = be.prefill(s, c, true).unwrap();
                }
                assert!(same_bits(&last.unwrap(), &a), "{q:?} chunks of {chunk}");
                let b2 = be.step(&[(s, 5)]).unwrap();
                assert!(same_bits(&b2[0], &a2[0]), "{q:?} chunks of {chunk}: step");
                be.close(s);
            }
        }
    }

    /// The engine's LoRA (what `generate --adapter` now runs) agrees with the differentiable
    /// model's LoRA path (`Engine::Model`) to within the engine's usual rounding.
    #[test]
    fn fast_lora_matches_the_model_path() {
        let tmp = TempDir::new("fast-lora-model");
        let ads = adapters(&tmp);
        for (q, tol) in [(None, 1e-4f32), (Some(GgmlDType::Q4_1), 5e-3)] {
            for (_, dir) in &ads {
                let mut m = tiny(q);
                crate::peft::load_adapter(&mut m, dir, "x").unwrap();
                let ids = prompt(3, 12);
                let mut fast = FastDecoder::new(&m).unwrap();
                let mut slow = LlamaDecoder::new(&m);
                let mut worst = 0f32;
                let diff = |a: &[f32], b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max)
                };
                worst = worst.max(diff(
                    &fast.prefill(&ids).unwrap(),
                    &slow.prefill(&ids).unwrap(),
                ));
                for t in [4u32, 77, 200, 9] {
                    worst = worst.max(diff(&fast.step(t).unwrap(), &slow.step(t).unwrap()));
                }
                assert!(
                    worst < tol,
                    "{q:?} {}: engine vs model {worst}",
                    dir.display()
                );
                // The adapter moves the logits far more than that: the engine does apply it.
                let mut base = FastDecoder::new(&tiny(q)).unwrap();
                let moved = diff(&base.prefill(&ids).unwrap(), &fast.prefill(&ids).unwrap());
                assert!(
                    moved > 100.0 * tol,
                    "the adapter changed the logits by only {moved}"
                );
            }
        }
    }

    /// Prefix caching: a closed slot's prefilled positions serve a later prompt with the same
    /// start and adapter, and the result is bit-identical to a fresh prefill (logits of the
    /// prompt's end and of the steps after it). Only prefill positions count (not the decoded
    /// tokens after them), at most all but the prompt's last token, never across adapters.
    #[test]
    fn prompt_prefixes_are_reused_bit_for_bit() {
        let tmp = TempDir::new("fast-prefix");
        let ads = adapters(&tmp);
        for q in [Some(GgmlDType::Q4_1), Some(GgmlDType::Q8_0), None] {
            let mut be = FastBatchBackend::new(Box::new(tiny(q))).unwrap();
            be.load_adapter(ads[0].0, &ads[0].1).unwrap();
            let system = prompt(5, 17);
            let first: Vec<u32> = system.iter().copied().chain(prompt(6, 5)).collect();
            let (a, reused) = be.open_with_prompt(None, &first).unwrap();
            assert_eq!(reused, 0, "nothing to reuse yet");
            be.prefill(a, &first[..10], false).unwrap();
            be.prefill(a, &first[10..], true).unwrap();
            be.step(&[(a, 7)]).unwrap();
            be.step(&[(a, 8)]).unwrap();
            be.close(a);
            let second: Vec<u32> = system.iter().copied().chain(prompt(9, 6)).collect();
            // another adapter finds nothing
            let (o, n) = be.open_with_prompt(Some(ads[0].0), &second).unwrap();
            assert_eq!(
                n, 0,
                "{q:?}: a prefix computed without the adapter was reused with it"
            );
            be.close(o);
            let (b, n) = be.open_with_prompt(None, &second).unwrap();
            assert_eq!(
                (b, n),
                (a, system.len()),
                "{q:?}: the system prompt is reused"
            );
            let got = be.prefill(b, &second[n..], true).unwrap().unwrap();
            let want = alone(q, None, &second, &[3, 4]);
            assert!(
                same_bits(&got, &want[0]),
                "{q:?}: prefill after a reused prefix"
            );
            for (i, t) in [3u32, 4].into_iter().enumerate() {
                let row = be.step(&[(b, t)]).unwrap();
                assert!(
                    same_bits(&row[0], &want[i + 1]),
                    "{q:?}: step {i} after reuse"
                );
            }
            be.close(b);
            // the whole earlier prompt plus its decoded tokens: only the prompt is reused, and
            // the same prompt again keeps its last token to run
            let longer: Vec<u32> = second.iter().copied().chain([3, 4, 11]).collect();
            let (_, n) = be.open_with_prompt(None, &longer).unwrap();
            assert_eq!(n, second.len(), "{q:?}: decoded positions are not reused");
            let (c, n) = be.open_with_prompt(None, &first).unwrap();
            assert!(n < first.len(), "{q:?}: the last token always runs");
            let got = be.prefill(c, &first[n..], true).unwrap().unwrap();
            assert!(
                same_bits(&got, &alone(q, None, &first, &[])[0]),
                "{q:?}: same prompt again"
            );
        }
    }

    #[test]
    fn closed_slots_are_reused_with_a_fresh_cache() {
        let mut be = FastBatchBackend::new(Box::new(tiny(Some(GgmlDType::Q4_1)))).unwrap();
        let a = be.open(None).unwrap();
        let b = be.open(None).unwrap();
        assert_ne!(a, b);
        let p = prompt(1, 9);
        let first = be.prefill(a, &p, true).unwrap().unwrap();
        be.prefill(b, &prompt(2, 30), true).unwrap();
        be.step(&[(b, 3)]).unwrap();
        be.close(b);
        assert_eq!(be.open_slots(), 1);
        let c = be.open(None).unwrap();
        assert_eq!(be.cached(c), 0);
        // closed slots are kept for their prefixes up to PREFIX_SLOTS, then recycled
        for i in 0..3 * PREFIX_SLOTS {
            let s = be.open(None).unwrap();
            be.prefill(s, &prompt(10 + i, 5), true).unwrap();
            be.close(s);
        }
        assert!(
            be.slots.len() <= 2 + PREFIX_SLOTS + 1,
            "{} slots",
            be.slots.len()
        );
        let again = be.prefill(c, &p, true).unwrap().unwrap();
        assert!(same_bits(&first, &again), "a reused slot starts empty");
        // Closed slots are refused.
        be.close(a);
        assert!(be
            .prefill(a, &p, true)
            .unwrap_err()
            .to_string()
            .contains("not open"));
        assert!(be
            .step(&[(a, 1)])
            .unwrap_err()
            .to_string()
            .contains("not open"));
        let e = be.step(&[(c, 1), (c, 2)]).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    /// Past the context length: an error, not a panic, and the slot keeps its state.
    #[test]
    fn context_length_is_an_error() {
        let mut be = FastBatchBackend::new(Box::new(tiny(Some(GgmlDType::Q4_1)))).unwrap();
        let ctx = be.context_length();
        let s = be.open(None).unwrap();
        let long = prompt(4, ctx + 1);
        let e = be.prefill(s, &long, true).unwrap_err();
        assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
        assert_eq!(be.cached(s), 0);
        be.prefill(s, &long[..ctx - 1], true).unwrap();
        let e = be.prefill(s, &long[..2], true).unwrap_err();
        assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
        be.step(&[(s, 1)]).unwrap();
        assert_eq!(be.cached(s), ctx);
        let e = be.step(&[(s, 1)]).unwrap_err();
        assert!(matches!(e, Error::ContextOverflow { .. }), "{e}");
        // A bad token id is an error too.
        let t = be.open(None).unwrap();
        let e = be.prefill(t, &[9999], true).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        assert_eq!(be.cached(t), 0);
    }

    /// What the engine does not run is a one-line error that leaves the backend as it was.
    #[test]
    fn unsupported_adapters_are_errors() {
        let tmp = TempDir::new("fast-unsupported");
        let mut m = tiny(None);
        let dora = LoraConfig {
            use_dora: true,
            ..Default::default()
        };
        crate::peft::attach_lora(&mut m, &dora, "d", 1).unwrap();
        crate::peft::save_adapter(&m, "d", &dora, &tmp.path("dora")).unwrap();
        let mut m = tiny(None);
        let ia3 = crate::peft::Ia3Config::default();
        crate::peft::attach_ia3(&mut m, &ia3, "i", 1).unwrap();
        crate::peft::save_adapter(&m, "i", &ia3, &tmp.path("ia3")).unwrap();
        lora_dir(&tmp, "ok", &["q_proj"], 2, false, 3);

        let mut be = FastBatchBackend::new(Box::new(tiny(None))).unwrap();
        for (dir, what) in [("dora", "DoRA"), ("ia3", "IA3")] {
            let e = be
                .load_adapter(dir, &tmp.path(dir))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(what) && e.contains("fast engine does not run"),
                "{e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        assert!(be.adapters().is_empty());
        assert!(crate::peft::adapter_names(be.model()).is_empty());
        let e = be.open(Some("ok")).unwrap_err().to_string();
        assert!(e.contains("unknown adapter `ok`"), "{e}");
        be.load_adapter("ok", &tmp.path("ok")).unwrap();
        assert!(
            crate::peft::adapter_names(be.model()).is_empty(),
            "the base stays bare"
        );
        let e = be
            .load_adapter("ok", &tmp.path("ok"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("already loaded"), "{e}");
        let s = be.open(Some("ok")).unwrap();
        let e = be.unload_adapter("ok").unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        be.close(s);
        be.unload_adapter("ok").unwrap();
        assert!(be.adapters().is_empty());
        // A model that already carries adapters is refused (they belong to the backend).
        let mut m = tiny(None);
        crate::peft::load_adapter(&mut m, &tmp.path("ok"), "x").unwrap();
        let e = FastBatchBackend::new(Box::new(m))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("without adapters"), "{e}");
    }

    /// The real SmolLM2-135M GGUF (Q4_1): three sequences (base, and a random LoRA on q/v) in
    /// batches give `generate`'s engine's logits bit for bit.
    #[test]
    fn smollm2_batched_rows_equal_generate() {
        let path = crate::data::testutil::SMOL_GGUF;
        let load = || crate::model::load(path, &LoadOptions::default(), &Device::Cpu).unwrap();
        let tmp = TempDir::new("fast-smollm2");
        let cfg = LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            target_modules: Some(ModuleSpec::List(vec!["q_proj".into(), "v_proj".into()])),
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        };
        let mut m = load();
        crate::peft::attach_lora(&mut *m.model, &cfg, "a", 5).unwrap();
        crate::peft::save_adapter(&*m.model, "a", &cfg, &tmp.path("qv")).unwrap();
        let dir = tmp.path("qv");
        let prompts: Vec<Vec<u32>> = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
            .iter()
            .map(|p| m.tokenizer.encode(p, true).unwrap())
            .collect();
        let adapters = [None, Some("qv"), Some("qv")];
        let feed = [28u32, 2000, 13];
        let mut want = Vec::new();
        for (p, a) in prompts.iter().zip(adapters) {
            let mut m = load();
            if a.is_some() {
                crate::peft::load_adapter(&mut *m.model, &dir, "x").unwrap();
            }
            let mut dec = FastDecoder::new(&*m.model).unwrap();
            let mut v = vec![dec.prefill(p).unwrap()];
            for &t in &feed {
                v.push(dec.step(t).unwrap());
            }
            want.push(v);
        }
        let mut be = FastBatchBackend::new(load().model).unwrap();
        be.load_adapter("qv", &dir).unwrap();
        let slots: Vec<SlotId> = prompts
            .iter()
            .zip(adapters)
            .enumerate()
            .map(|(i, (p, a))| {
                let s = be.open(a).unwrap();
                let mut last = None;
                for c in p.chunks(2) {
                    last = be.prefill(s, c, true).unwrap();
                }
                assert!(same_bits(&last.unwrap(), &want[i][0]), "prefill {i}");
                s
            })
            .collect();
        // Step 1: sequences 0 and 2; then all three; then 1 and 0 catch up.
        let mut done = [0usize; 3];
        for members in [vec![0, 2], vec![2, 1, 0], vec![1, 0], vec![1, 2, 0]] {
            let members: Vec<usize> = members.into_iter().filter(|&s| done[s] < 3).collect();
            let batch: Vec<(SlotId, u32)> =
                members.iter().map(|&s| (slots[s], feed[done[s]])).collect();
            let out = be.step(&batch).unwrap();
            for (&s, row) in members.iter().zip(&out) {
                done[s] += 1;
                assert!(
                    same_bits(row, &want[s][done[s]]),
                    "sequence {s} step {}",
                    done[s]
                );
            }
        }
        assert_eq!(done, [3, 3, 3]);
    }
}
