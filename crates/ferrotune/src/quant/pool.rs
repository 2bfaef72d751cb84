//! A small persistent thread pool for the quantized kernels.
//!
//! Why not rayon: a decode-time matvec (576x576 Q4_1) takes a few microseconds, so the
//! fork/join cost decides whether a second thread helps at all. Workers here spin briefly on
//! a generation counter before parking, the calling thread does a share of the work itself, and
//! work is handed out through one atomic cursor, so a worker that wakes late simply takes fewer
//! chunks instead of stalling the call.
use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker polls before parking. Long enough to bridge the gap between two
/// matmuls of one decode step (a norm or a RoPE in between takes a few microseconds), short
/// enough not to hold a shared core once the model stops calling. A parked worker costs only
/// parallelism, never correctness or a stall: it joins late and takes fewer chunks.
const SPIN: Duration = Duration::from_micros(100);
/// Pure spinning (lowest wake-up latency) for this long, then spin with `yield_now`.
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(5);

#[repr(C, align(64))]
struct Slot {
    go: AtomicUsize,
}

/// The job of the current call: a type-erased `&F` with `F: Fn(usize) + Sync`.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const ()),
}

/// `state` packs the call's generation (high 32 bits), a "closed" bit and the number of workers
/// that entered the call. A worker may run the job only by incrementing `entered` while the
/// generation matches and the call is open; the caller closes the call when its own share is
/// done and then waits only for the workers that entered. A worker the OS has not scheduled yet
/// therefore never delays the caller (with 2 cores shared by other processes this is common).
const CLOSED: u64 = 1 << 31;
const ENTERED: u64 = CLOSED - 1;

struct Shared {
    slots: Box<[Slot]>,
    state: AtomicU64,
    done: AtomicUsize,
    /// Written by the caller before it opens a call, read by workers that entered it.
    job: UnsafeCell<Job>,
    handles: OnceLock<Box<[Thread]>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only while no worker can be inside a call (see `state`), and the
// pointer it holds refers to a `Sync` closure that outlives every worker that runs it.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub(crate) struct Pool {
    shared: &'static Shared,
    /// Serialises callers; holds the current generation.
    call: Mutex<u32>,
    n_workers: usize,
}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Threads the kernels may use (including the caller); 0 means "not set, use all cores".
static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

/// Read once: `num_threads` runs on every kernel call, and reading the environment takes a
/// process-wide lock and allocates (it cost a third of a single-stream decode's speed).
fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(default_threads_from_env)
}

fn default_threads_from_env() -> usize {
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

/// Number of threads the quantized kernels use (the caller included): `set_num_threads`, else
/// `FERROTUNE_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the number of cores.
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Set the number of threads the quantized kernels use (the caller included). Takes effect on
/// the next call; the pool is sized on first use to the larger of this and the default.
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
                })
                .collect(),
            state: AtomicU64::new(CLOSED),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                data: std::ptr::null(),
                call: |_| {},
            }),
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
    let mut seen = 0usize;
    loop {
        let mut since: Option<Instant> = None;
        let mut spins = 0u32;
        let g = loop {
            let g = slot.go.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                spin_loop();
                continue;
            }
            let t0 = *since.get_or_insert_with(Instant::now);
            let idle = t0.elapsed();
            if idle > SPIN {
                // An unpark() that raced ahead of this park() leaves a token: no lost wake-up.
                std::thread::park();
                since = None;
            } else if idle > SPIN_BEFORE_YIELD {
                // Let another runnable thread on this core go first (candle's rayon or barrier
                // pool workers between our calls): a pure spin would hold the core for its
                // whole time slice and stall them. With nothing else runnable this returns at once.
                std::thread::yield_now();
            }
        };
        seen = g;
        // enter call `g` if it is still open
        let mut s = shared.state.load(Ordering::Acquire);
        let entered = loop {
            if (s >> 32) as u32 != g as u32 || s & CLOSED != 0 {
                break false;
            }
            match shared
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break true,
                Err(now) => s = now,
            }
        };
        if !entered {
            continue;
        }
        // SAFETY: the caller wrote `job` before opening this call and waits for us.
        let job = unsafe { *shared.job.get() };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
            (job.call)(job.data)
        }));
        if let Err(p) = r {
            shared
                .panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(p);
        }
        shared.done.fetch_add(1, Ordering::Release);
    }
}

unsafe fn call_job<F: Fn() + Sync>(data: *const ()) {
    (*(data as *const F))()
}

/// Runs `f` on the calling thread and on up to `n - 1` pool workers that start in time.
/// Runs inline when the pool is busy with another caller or when called from a worker, so it
/// never deadlocks.
fn broadcast<F: Fn() + Sync>(n: usize, f: F) {
    let pool = pool();
    let n = n.min(pool.n_workers + 1);
    if n <= 1 || IN_POOL.with(|c| c.get()) {
        f();
        return;
    }
    let mut gen = match pool.call.try_lock() {
        Ok(g) => g,
        // A panic in an earlier call's closure poisoned the lock; the pool itself is fine.
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            f();
            return;
        }
    };
    *gen = gen.wrapping_add(1);
    let g = *gen;
    let shared = pool.shared;
    // SAFETY: the previous call is closed and all its entrants are done, so nobody reads `job`.
    unsafe {
        *shared.job.get() = Job {
            data: &f as *const F as *const (),
            call: call_job::<F>,
        }
    };
    shared.done.store(0, Ordering::Relaxed);
    shared.state.store((g as u64) << 32, Ordering::Release);
    let handles = shared.handles.get().expect("pool initialised");
    for (slot, h) in shared.slots[..n - 1].iter().zip(handles.iter()) {
        slot.go.store(g as usize, Ordering::Release);
        h.unpark();
    }
    // Close the call and wait for the entrants even if our own share panics: they use `f`.
    struct Close(&'static Shared);
    impl Drop for Close {
        fn drop(&mut self) {
            let entered = (self.0.state.fetch_or(CLOSED, Ordering::AcqRel) & ENTERED) as usize;
            let mut spins = 0u32;
            while self.0.done.load(Ordering::Acquire) < entered {
                spins = spins.wrapping_add(1);
                if spins < 1 << 16 {
                    spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if std::thread::panicking() {
                // the caller's own panic wins; drop a worker's so it does not leak into the next call
                self.0
                    .panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
            }
        }
    }
    {
        let _close = Close(shared);
        f();
    }
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

/// Activation rows from which a product runs on rayon's global pool ([`for_each_chunk_rows`]).
pub(crate) const RAYON_MIN_ROWS: usize = 64;

/// Calls `f` on disjoint ranges covering `0..n_items`, on up to `threads` threads, never giving
/// a thread less than about `min_chunk` items. Items are handed out in equal chunks through a
/// shared cursor, up to four per thread and a multiple of the thread count, so uneven progress
/// (a late worker, a core shared with another process) evens out without leaving one odd chunk
/// for the end.
pub(crate) fn for_each_chunk<F: Fn(Range<usize>) + Sync>(
    n_items: usize,
    min_chunk: usize,
    threads: usize,
    f: F,
) {
    let Some((threads, chunk)) = chunking(n_items, min_chunk, threads) else {
        if n_items > 0 {
            f(0..n_items);
        }
        return;
    };
    let cursor = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    broadcast(threads, || {
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

/// [`for_each_chunk`] for a product over `rows` activation rows: from [`RAYON_MIN_ROWS`] rows
/// (training, evaluation, prompt prefill) the chunks run on rayon's global pool instead of
/// this one, the calling thread waiting, and in chunks of `min_chunk` items.
///
/// Why rayon: between two such products the model runs rayon ops (attention, SwiGLU, norms,
/// candle's matmuls), and rayon's workers keep polling for work a while after each; products
/// on this pool then had more threads running than there are cores (`perf sched` on 2 cores:
/// a thread preempted in the middle of its share of a product for a whole time slice, twice
/// as many context switches per QLoRA step as with one pool). A product this size takes
/// milliseconds, so rayon's wake-up (tens of microseconds) costs nothing; small ones (decode)
/// keep this pool's microsecond fork/join.
pub(crate) fn for_each_chunk_rows<F: Fn(Range<usize>) + Sync>(
    rows: usize,
    n_items: usize,
    min_chunk: usize,
    threads: usize,
    f: F,
) {
    if rows < RAYON_MIN_ROWS || IN_POOL.with(|c| c.get()) {
        return for_each_chunk(n_items, min_chunk, threads, f);
    }
    let Some((threads, _)) = chunking(n_items, min_chunk, threads) else {
        if n_items > 0 {
            f(0..n_items);
        }
        return;
    };
    // The smallest chunks the caller allows, not `for_each_chunk`'s four per thread: with
    // 64+ rows a chunk is microseconds of work or more (a fetch_add hands it out), and with
    // four per thread the thread that took the last one ran on alone for up to an eighth of
    // the product (the cores were idle 10-11% of a QLoRA step on 2 threads with four per
    // thread, 7-8% with the smallest)
    let chunk = min_chunk.max(1);
    let cursor = AtomicUsize::new(0);
    let work = || loop {
        let start = cursor.fetch_add(chunk, Ordering::Relaxed);
        if start >= n_items {
            break;
        }
        f(start..n_items.min(start + chunk));
    };
    let work = &work;
    // `threads` tasks at most, whatever the size of rayon's pool, each taking chunks until
    // none is left (a task that starts late finds fewer)
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(move |_| work());
        }
        work();
    });
}

/// The threads to use and the chunk size for `n_items` (see [`for_each_chunk`]); `None` where
/// one thread does everything.
fn chunking(n_items: usize, min_chunk: usize, threads: usize) -> Option<(usize, usize)> {
    if n_items == 0 {
        return None;
    }
    let min_chunk = min_chunk.max(1);
    let threads = threads.min(n_items / min_chunk).max(1);
    if threads == 1 {
        return None;
    }
    let n_chunks = threads * (n_items / (min_chunk * threads)).clamp(1, 4);
    Some((threads, n_items.div_ceil(n_chunks)))
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
    fn products_of_many_rows_run_on_rayon_and_visit_every_item_once() {
        for rows in [1, RAYON_MIN_ROWS - 1, RAYON_MIN_ROWS, 1024] {
            for threads in 1..=3 {
                for n in [1usize, 7, 100, 1000] {
                    let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                    let on_rayon = AtomicUsize::new(0);
                    let workers = Mutex::new(std::collections::HashSet::new());
                    for_each_chunk_rows(rows, n, 3, threads, |r| {
                        if rayon::current_thread_index().is_some() {
                            on_rayon.fetch_add(1, Ordering::Relaxed);
                        }
                        workers.lock().unwrap().insert(std::thread::current().id());
                        for i in r {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    let case = format!("rows={rows} n={n} threads={threads}");
                    assert!(
                        hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                        "{case}"
                    );
                    // split work goes to rayon exactly when the product is large
                    let split = threads > 1 && n / 3 > 1;
                    let expect_rayon = split && rows >= RAYON_MIN_ROWS;
                    assert_eq!(on_rayon.load(Ordering::Relaxed) > 0, expect_rayon, "{case}");
                    assert!(workers.lock().unwrap().len() <= threads, "{case}");
                }
            }
        }
    }

    #[test]
    fn panics_on_the_rayon_path_propagate() {
        let r = std::panic::catch_unwind(|| {
            for_each_chunk_rows(RAYON_MIN_ROWS, 64, 1, 2, |r| {
                if r.contains(&40) {
                    panic!("boom");
                }
            })
        });
        assert!(r.is_err());
        let sum = AtomicUsize::new(0);
        for_each_chunk_rows(RAYON_MIN_ROWS, 64, 1, 2, |r| {
            sum.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64);
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
