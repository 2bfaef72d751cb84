//! The scheduler thread (in progress).
use super::{BatchBackend, EventSink, GenRequest, MetricsSnapshot, SubmitError};
use std::path::Path;
use std::time::Duration;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in prefill or decode at once.
    pub max_concurrent: usize,
    /// Most requests waiting for a slot; beyond it, [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Most prompt tokens prefilled per iteration (so a long prompt does not stall decoding).
    pub prefill_chunk: usize,
    /// A sequence running longer is cancelled.
    pub request_timeout: Option<Duration>,
}

/// Talks to the scheduler thread; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct SchedulerHandle {}

impl SchedulerHandle {
    /// Queue a sequence; its events go to `sink`. Returns the sequence's id.
    pub fn submit(&self, _req: GenRequest, _sink: EventSink) -> Result<u64, SubmitError> {
        Err(SubmitError::ShuttingDown)
    }
    /// Cancel a sequence (no-op if it finished).
    pub fn cancel(&self, _id: u64) {}
    /// Attach an adapter between decode steps; blocks until done.
    pub fn load_adapter(&self, _name: &str, _dir: &Path) -> crate::Result<()> {
        Err(crate::Error::msg("not yet"))
    }
    /// Detach an adapter; refused while a sequence uses it.
    pub fn unload_adapter(&self, _name: &str) -> crate::Result<()> {
        Err(crate::Error::msg("not yet"))
    }
    /// Names of the attached adapters.
    pub fn adapters(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn metrics(&self) -> MetricsSnapshot {
        MetricsSnapshot::default()
    }
    /// Refuse new requests; sequences in flight finish.
    pub fn shutdown(&self) {}
    /// Wait for the scheduler thread to end (after [`Self::shutdown`] and the last sequence).
    pub fn join(&self) {}
}

/// Start the scheduler thread over `backend`.
pub fn start(_backend: Box<dyn BatchBackend>, _cfg: SchedulerConfig) -> SchedulerHandle {
    SchedulerHandle {}
}
