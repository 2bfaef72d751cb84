//! What the scheduler drives: a model that runs many sequences, each in its own slot (KV cache)
//! with its own adapter, and steps them together.
use crate::Result;
use std::path::Path;

/// A slot: one sequence's state (KV cache, adapter) inside a backend.
pub type SlotId = usize;

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
    /// Feed prompt tokens to `slot`, after those fed before. With `last`, return the logits
    /// of the prompt's last position (the first generated token's distribution).
    fn prefill(&mut self, slot: SlotId, ids: &[u32], last: bool) -> Result<Option<Vec<f32>>>;
    /// One token for each `(slot, token)`, in one batched forward; returns one row of logits
    /// per entry, in order. Every slot must have finished its prefill.
    fn step(&mut self, batch: &[(SlotId, u32)]) -> Result<Vec<Vec<f32>>>;
    /// Free the slot (its KV cache may be reused).
    fn close(&mut self, slot: SlotId);
    /// Attach the PEFT adapter folder `dir` as `name` (no slot may be using `name`).
    fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<()>;
    /// Detach adapter `name`; refused while an open slot uses it.
    fn unload_adapter(&mut self, name: &str) -> Result<()>;
    /// Names of the attached adapters.
    fn adapters(&self) -> Vec<String>;
}
