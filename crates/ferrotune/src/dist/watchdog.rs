//! The watchdog of a multi-rank job: a thread that watches the collective this rank is in, and
//! ends the job when one has waited longer than the timeout. MPI itself waits forever on a peer
//! that hangs (stopped, deadlocked, stuck in I/O); a rank that *dies* is noticed by mpirun, which
//! ends the job naming it. Either way no rank hangs silently.
//!
//! Entering a collective costs a lock and a wake-up of this thread (microseconds, against the
//! collective's own latency); a single-process run has no watchdog at all.
use super::{Collectives, TIMEOUT_EXIT_CODE};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do with the one-line message when a collective times out (it does not return in
/// production: the job is ended).
type OnTimeout = Box<dyn Fn(String) + Send>;

pub(super) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    pending: Option<Pending>,
    stop: bool,
}

struct Pending {
    op: &'static str,
    values: usize,
    since: Instant,
}

/// Marks this rank as inside a collective until dropped.
pub(super) struct InCollective<'a> {
    shared: &'a (Mutex<State>, Condvar),
}

impl Drop for InCollective<'_> {
    fn drop(&mut self) {
        lock(&self.shared.0).pending = None;
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic elsewhere cannot leave the state half-written: take it anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Watchdog {
    /// Watch `backend`'s collectives: one that waits `timeout` prints why on stderr and ends
    /// the job (every rank) with [`TIMEOUT_EXIT_CODE`].
    pub(super) fn start(backend: Arc<dyn Collectives>, timeout: Duration) -> Self {
        let (rank, world) = (backend.rank(), backend.world_size());
        Self::start_with(
            timeout,
            Box::new(move |what| {
                eprintln!("error: rank {rank} of {world}: {what}; ending the job");
                backend.abort(TIMEOUT_EXIT_CODE)
            }),
        )
    }

    pub(super) fn start_with(timeout: Duration, on_timeout: OnTimeout) -> Self {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("ferrotune-dist-watchdog".into())
            .spawn(move || watch(&s, timeout, on_timeout))
            .expect("the watchdog thread starts");
        Watchdog {
            shared,
            thread: Some(thread),
        }
    }

    /// This rank enters collective `op` of `values` values.
    pub(super) fn enter(&self, op: &'static str, values: usize) -> InCollective<'_> {
        lock(&self.shared.0).pending = Some(Pending {
            op,
            values,
            since: Instant::now(),
        });
        self.shared.1.notify_one();
        InCollective {
            shared: &self.shared,
        }
    }

    /// End the thread and wait for it.
    pub(super) fn stop(mut self) {
        lock(&self.shared.0).stop = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &(Mutex<State>, Condvar), timeout: Duration, on_timeout: OnTimeout) {
    let (m, cv) = shared;
    let mut st = lock(m);
    loop {
        if st.stop {
            return;
        }
        let waited = st
            .pending
            .as_ref()
            .map(|p| (p.since.elapsed(), p.op, p.values));
        match waited {
            None => st = cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some((w, op, values)) if w >= timeout => {
                let what = format!(
                    "{} of {} values has waited {:.0} s for the other ranks: one of them died or hangs (the limit is train.dist_timeout_s = {})",
                    op,
                    values,
                    w.as_secs_f64(),
                    timeout.as_secs()
                );
                // Report once; the production handler does not return.
                st.pending = None;
                drop(st);
                on_timeout(what);
                st = lock(m);
            }
            Some((w, _, _)) => {
                st = cv
                    .wait_timeout(st, timeout - w)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_collective_past_the_timeout_is_reported_once_with_its_name() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let w = Watchdog::start_with(
            Duration::from_millis(50),
            Box::new(move |m| tx.lock().unwrap().send(m).unwrap()),
        );
        // A quick collective: nothing reported.
        drop(w.enter("all_reduce", 10));
        assert!(rx.recv_timeout(Duration::from_millis(120)).is_err());
        // A hung one.
        let g = w.enter("reduce_scatter", 1234);
        let msg = rx.recv_timeout(Duration::from_secs(5)).expect("reported");
        assert!(
            msg.starts_with("reduce_scatter of 1234 values has waited 0 s for the other ranks"),
            "{msg}"
        );
        assert!(rx.recv_timeout(Duration::from_millis(150)).is_err());
        drop(g);
        w.stop();
    }
}
