//! A small persistent thread pool for the quantized kernels.
//!
//! Why not rayon: a decode-time matvec (576x576 Q4_1) takes a few microseconds, so the
//! fork/join cost decides whether a second thread helps at all. Workers here spin briefly on
//! a generation counter before parking, the calling thread does a share of the work itself, and
//! work is handed out through one atomic cursor, so a worker that wakes late simply takes fewer
//! chunks instead of stalling the call.
use std::any::Any;
use std::cell::Cell;
use std::hint::spin_loop;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

/// How long an idle worker polls before parking. Long enough to bridge the gap between two
/// matmuls of one decode step (the norms and attention in between take tens of microseconds),
/// short enough not to burn a shared core when the model is idle.
const SPIN_ITERS: u32 = 20_000;

#[repr(C, align(64))]
struct Slot {
    go: AtomicUsize,
    done: AtomicUsize,
}

/// The job of the current call: a type-erased `&dyn Fn(usize)` (argument: worker index).
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
}

struct Shared {
    slots: Box<[Slot]>,
    job: Mutex<Option<Job>>,
    handles: OnceLock<Box<[Thread]>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `Job` holds a pointer to a closure that is `Sync` and outlives the call that published it
// (the caller waits for every worker's `done` before returning).
unsafe impl Send for Job {}

pub(crate) struct Pool {
    shared: &'static Shared,
    /// Serialises callers; holds the current generation.
    call: Mutex<usize>,
    n_workers: usize,
}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Threads the kernels may use (including the caller); 0 means "not set, use all cores".
static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

fn default_threads() -> usize {
    let env = ["FERROTUNE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| {
            std::env::var(k)
                .ok()?
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
        });
    env.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Number of threads the quantized kernels use (the caller included).
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Set the number of threads the quantized kernels use (the caller included). Takes effect on
/// the next call; the pool grows to the largest value ever asked for.
pub fn set_num_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(default_threads().max(num_threads()).saturating_sub(1)))
}

impl Pool {
    fn new(n_workers: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            slots: (0..n_workers)
                .map(|_| Slot {
                    go: AtomicUsize::new(0),
                    done: AtomicUsize::new(0),
                })
                .collect(),
            job: Mutex::new(None),
            handles: OnceLock::new(),
            panic: Mutex::new(None),
        }));
        let mut handles = Vec::with_capacity(n_workers);
        for tid in 0..n_workers {
            let h = std::thread::Builder::new()
                .name(format!("ferrotune-q{tid}"))
                .spawn(move || worker(shared, tid))
                .expect("spawning a quantized-kernel worker thread");
            handles.push(h.thread().clone());
        }
        let _ = shared.handles.set(handles.into_boxed_slice());
        Pool {
            shared,
            call: Mutex::new(0),
            n_workers,
        }
    }
}

fn worker(shared: &'static Shared, tid: usize) {
    IN_POOL.with(|f| f.set(true));
    let slot = &shared.slots[tid];
    let mut gen = 0usize;
    loop {
        let mut spins = 0u32;
        loop {
            let g = slot.go.load(Ordering::Acquire);
            if g != gen {
                gen = g;
                break;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                spin_loop();
            } else {
                // An unpark() that raced ahead of this park() leaves a token, so no wake-up is lost.
                std::thread::park();
                spins = 0;
            }
        }
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                (job.call)(job.data, tid + 1)
            }));
            if let Err(p) = r {
                shared
                    .panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(p);
            }
        }
        slot.done.store(gen, Ordering::Release);
    }
}

unsafe fn call_job<F: Fn(usize) + Sync>(data: *const (), tid: usize) {
    (*(data as *const F))(tid)
}

/// Runs `f(tid)` on `n` threads (tid 0 is the caller). Runs inline when the pool is busy with
/// another caller or when called from inside a worker, so it never deadlocks.
fn broadcast<F: Fn(usize) + Sync>(n: usize, f: F) {
    let pool = pool();
    let n = n.min(pool.n_workers + 1);
    if n <= 1 || IN_POOL.with(|c| c.get()) {
        f(0);
        return;
    }
    let mut gen = match pool.call.try_lock() {
        Ok(g) => g,
        // A panic in an earlier call's closure poisoned the lock; the pool itself is fine.
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            f(0);
            return;
        }
    };
    *gen = gen.wrapping_add(1);
    let g = *gen;
    let shared = pool.shared;
    *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job {
        data: &f as *const F as *const (),
        call: call_job::<F>,
    });
    let handles = shared.handles.get().expect("pool initialised");
    for (slot, h) in shared.slots[..n - 1].iter().zip(handles.iter()) {
        slot.go.store(g, Ordering::Release);
        h.unpark();
    }
    // Wait for the workers even if our own share panics: they hold a pointer to `f`.
    struct Wait<'a>(&'a [Slot], usize, &'a Shared);
    impl Drop for Wait<'_> {
        fn drop(&mut self) {
            for s in self.0 {
                let mut spins = 0u32;
                while s.done.load(Ordering::Acquire) != self.1 {
                    spins += 1;
                    if spins < 1 << 16 {
                        spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
            if std::thread::panicking() {
                // The caller's own panic wins; drop a worker's so it does not leak into the next call.
                self.2
                    .panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
            }
        }
    }
    {
        let _wait = Wait(&shared.slots[..n - 1], g, shared);
        f(0);
    }
    *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    drop(gen);
    if let Some(p) = shared
        .panic
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        std::panic::resume_unwind(p);
    }
}

/// Calls `f` on disjoint ranges covering `0..n_items`, on up to `threads` threads. Items are
/// handed out in chunks of at least `min_chunk` through a shared cursor, about four chunks per
/// thread, so uneven progress (a late worker, a core shared with another process) evens out.
pub(crate) fn for_each_chunk<F: Fn(Range<usize>) + Sync>(
    n_items: usize,
    min_chunk: usize,
    threads: usize,
    f: F,
) {
    if n_items == 0 {
        return;
    }
    let threads = threads.min(n_items.div_ceil(min_chunk.max(1))).max(1);
    if threads == 1 {
        f(0..n_items);
        return;
    }
    let chunk = n_items.div_ceil(threads * 4).max(min_chunk.max(1));
    let cursor = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    broadcast(threads, |_| {
        while !stop.load(Ordering::Relaxed) {
            let start = cursor.fetch_add(chunk, Ordering::Relaxed);
            if start >= n_items {
                stop.store(true, Ordering::Relaxed);
                break;
            }
            f(start..n_items.min(start + chunk));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_visited_once() {
        for threads in 1..=4 {
            for n in [1usize, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each_chunk(n, 3, threads, |r| {
                    for i in r {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "n={n} threads={threads}"
                );
            }
        }
    }

    #[test]
    fn panics_propagate_and_pool_survives() {
        let r = std::panic::catch_unwind(|| {
            for_each_chunk(64, 1, 2, |r| {
                if r.contains(&40) {
                    panic!("boom");
                }
            })
        });
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        for_each_chunk(64, 1, 2, |r| {
            sum.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64);
    }
}
