//! Collectives between the ranks of a distributed training run (issue 15).
//!
//! Training code talks to [`Dist`], a cheap handle over a [`Collectives`] back-end:
//! - [`SingleProcess`] (the default): one rank; every collective is a no-op or a copy, and no
//!   thread, lock or clock is touched.
//! - `MpiBackend` (cargo feature `mpi`): Open MPI through rsmpi, so a job runs under the
//!   launchers clusters already have (`mpirun`, Slurm's `srun`). Rank, world size and local
//!   rank come from the communicator.
//! - `NcclBackend` (cargo feature `nccl`, with `cuda`): NCCL between GPUs, one process per
//!   GPU, started torchrun-style (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`: torchrun, `ferrotune launch --backend nccl`, or srun / mpirun with
//!   `MASTER_ADDR` set); NCCL's unique id goes from rank 0 to the others over [`Rendezvous`].
//!
//! A multi-rank [`Dist`] times every collective (the run reports its time in communication) and
//! watches it ([`watchdog`]): a collective that has not completed within the timeout (a peer died
//! or hangs) ends the whole job with an error naming this rank and the collective, never a silent
//! hang. Open MPI already ends the job when a rank dies (mpirun names the rank and its signal);
//! the watchdog covers the hung peer, which MPI waits on forever.
//!
//! Sums are over f32 (gradients) or f64 (token counts and loss sums, exact as integers up to
//! 2^53); all ranks must call the same collectives in the same order with the same lengths.
pub mod background;
mod launch_env;
pub mod local_launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
mod rendezvous;
mod single;
mod watchdog;

pub use launch_env::LaunchEnv;
#[cfg(feature = "mpi")]
pub use mpi::MpiBackend;
#[cfg(feature = "nccl")]
pub use nccl::NcclBackend;
pub use rendezvous::Rendezvous;
pub use single::SingleProcess;

use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The operations a back-end provides. Buffers are host memory; lengths agree across ranks.
pub trait Collectives: Send + Sync {
    /// `single`, `mpi`.
    fn backend(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// This rank's index among the ranks on its machine.
    fn local_rank(&self) -> usize;
    /// How many ranks share this rank's machine (all of them unless the back-end knows).
    fn local_size(&self) -> usize {
        self.world_size()
    }
    /// The CUDA device a GPU back-end drives for this rank (`train.device = "cuda"` means it);
    /// `None` for the CPU back-ends.
    fn gpu(&self) -> Option<usize> {
        None
    }
    /// Ready the calling thread for collectives (NCCL: make the rank's GPU current); a thread
    /// other than the one that started the back-end calls it before its first collective.
    fn prepare_thread(&self) -> Result<()> {
        Ok(())
    }
    /// Element-wise sum over the ranks, in place: every rank ends with the same sums.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Self::all_reduce_sum`] in f64.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// [`Self::all_reduce_sum`] from a thread that shares the cores with the training thread
    /// (overlapped gradient communication): waiting for the other ranks must not take a core.
    fn all_reduce_sum_background(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)
    }
    /// [`Self::reduce_sum`] from such a thread.
    fn reduce_sum_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.reduce_sum(buf, root)
    }
    /// [`Self::broadcast`] from such a thread.
    fn broadcast_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast(buf, root)
    }
    /// `send` is `world_size` blocks of `recv.len()` values; rank r receives the element-wise
    /// sum over the ranks of block r.
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the ranks into `root`'s `buf` (the other ranks' `buf` is left as
    /// it was or holds partial sums: callers must not read it).
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Every rank's `send` (all the same length), concatenated in rank order into `recv`.
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `root`'s `buf` into every rank's.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has entered it.
    fn barrier(&self) -> Result<()>;
    /// End every rank of the job now with exit status `code`.
    fn abort(&self, code: i32) -> !;
}

/// How long a collective may wait for the other ranks before the job is ended, unless the
/// run says otherwise (`train.dist_timeout_s`): long enough for rank 0 to write a checkpoint
/// of a large model while the others wait at the next collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether this build has the MPI back-end (cargo feature `mpi`).
pub const MPI_BUILT: bool = cfg!(feature = "mpi");

/// Whether this build has the NCCL back-end (cargo feature `nccl`).
pub const NCCL_BUILT: bool = cfg!(feature = "nccl");

/// Which collectives a multi-rank job uses (`train.dist_backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// NCCL when the run trains on a GPU and this build has it, or when the launch is
    /// torchrun-style (`RANK` / `WORLD_SIZE`, which MPI cannot join); MPI otherwise.
    #[default]
    Auto,
    Mpi,
    Nccl,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Mpi => "mpi",
            BackendChoice::Nccl => "nccl",
        }
    }

    /// The back-end a multi-rank launch by `launcher` uses for a run on a GPU (`gpu`) or not.
    pub fn resolve(self, launcher: &str, gpu: bool) -> BackendChoice {
        match self {
            BackendChoice::Auto if (gpu && NCCL_BUILT) || launcher == "torchrun" => {
                BackendChoice::Nccl
            }
            BackendChoice::Auto => BackendChoice::Mpi,
            chosen => chosen,
        }
    }
}

/// The exit status of a job ended by the watchdog.
pub const TIMEOUT_EXIT_CODE: i32 = 75;

/// A handle on the run's collectives (clones share them). `Dist::default()` is one process.
#[derive(Clone)]
pub struct Dist {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Collectives>,
    rank: usize,
    world: usize,
    /// Nanoseconds spent inside collectives, this rank.
    comm_ns: AtomicU64,
    /// Present when there are other ranks to wait on.
    watchdog: Option<watchdog::Watchdog>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop the watchdog first: it holds the back-end, whose drop ends MPI.
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
    }
}

impl Default for Dist {
    fn default() -> Self {
        Dist::new(Arc::new(SingleProcess), DEFAULT_TIMEOUT)
    }
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dist({} rank {} of {})",
            self.backend(),
            self.rank(),
            self.world_size()
        )
    }
}

impl Dist {
    /// A handle over `backend`; with more than one rank, collectives are timed and watched
    /// with `timeout`.
    pub fn new(backend: Arc<dyn Collectives>, timeout: Duration) -> Self {
        let (rank, world) = (backend.rank(), backend.world_size());
        let watchdog = (world > 1).then(|| watchdog::Watchdog::start(backend.clone(), timeout));
        Dist {
            inner: Arc::new(Inner {
                backend,
                rank,
                world,
                comm_ns: AtomicU64::new(0),
                watchdog,
            }),
        }
    }

    /// The back-end the launch environment asks for: one process unless the process was
    /// started as one of several ranks (mpirun, srun, torchrun, `launch`) or `choice` is `Mpi`
    /// (MPI started in one process is a job of one); then MPI or NCCL as
    /// [`BackendChoice::resolve`] says for a run on a GPU (`gpu`) or not. A multi-rank launch
    /// of a binary without the back-end it needs is an error, not N copies of one run.
    pub fn from_environment(timeout: Duration, choice: BackendChoice, gpu: bool) -> Result<Self> {
        let env = LaunchEnv::read();
        if !(choice == BackendChoice::Mpi || env.is_multi_rank()) {
            return Ok(Dist::default());
        }
        match choice.resolve(env.launcher, gpu) {
            BackendChoice::Nccl => Self::nccl(&env, timeout, gpu),
            _ => Self::mpi(&env, timeout),
        }
    }

    fn mpi(env: &LaunchEnv, timeout: Duration) -> Result<Self> {
        #[cfg(feature = "mpi")]
        {
            let backend = MpiBackend::init()?;
            if let Some(n) = env.world_size.filter(|&n| n != backend.world_size()) {
                return Err(Error::msg(format!(
                    "the launcher ({}) says {n} ranks but MPI sees {}: start the job with mpirun or srun --mpi=pmix",
                    env.launcher,
                    backend.world_size()
                )));
            }
            Ok(Dist::new(Arc::new(backend), timeout))
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = timeout;
            Err(Error::msg(format!(
                "started as one of {} ranks ({}), but this ferrotune was built without the `mpi` feature: rebuild with `cargo build --release --features mpi` (needs Open MPI: libopenmpi-dev)",
                env.world_size.map_or("several".to_string(), |n| n.to_string()),
                env.launcher
            )))
        }
    }

    fn nccl(env: &LaunchEnv, timeout: Duration, gpu: bool) -> Result<Self> {
        if !gpu {
            return Err(Error::msg(format!(
                "started as one of {} ranks ({}) on the NCCL back-end, which runs between GPUs, but train.device is the CPU: set train.device = \"cuda\", or start the ranks with mpirun / `ferrotune launch` for CPUs",
                env.world_size.map_or("several".to_string(), |n| n.to_string()),
                env.launcher
            )));
        }
        #[cfg(feature = "nccl")]
        {
            let Some(rendezvous) = Rendezvous::from_env()? else {
                return Err(Error::msg(
                    "the NCCL back-end needs MASTER_ADDR (rank 0's host) and MASTER_PORT to exchange NCCL's id: torchrun and `ferrotune launch --backend nccl` set them; under srun / mpirun export them",
                ));
            };
            let backend = NcclBackend::init(env, &rendezvous, timeout)?;
            Ok(Dist::new(Arc::new(backend), timeout))
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = timeout;
            Err(Error::msg(format!(
                "started as one of {} ranks ({}) on GPUs, but this ferrotune was built without the `nccl` feature: build it with scripts/build-cuda.sh (cargo feature nccl)",
                env.world_size.map_or("several".to_string(), |n| n.to_string()),
                env.launcher
            )))
        }
    }

    pub fn backend(&self) -> &'static str {
        self.inner.backend.backend()
    }
    pub fn rank(&self) -> usize {
        self.inner.rank
    }
    pub fn world_size(&self) -> usize {
        self.inner.world
    }
    pub fn local_rank(&self) -> usize {
        self.inner.backend.local_rank()
    }
    /// How many ranks share this rank's machine.
    pub fn local_size(&self) -> usize {
        self.inner.backend.local_size()
    }
    /// The CUDA device this rank's collectives run on (NCCL), if any.
    pub fn gpu(&self) -> Option<usize> {
        self.inner.backend.gpu()
    }
    /// Rank 0: the one that writes the run's files.
    pub fn is_root(&self) -> bool {
        self.inner.rank == 0
    }
    /// `rank 1 of 2: ` in a multi-rank job, else empty: the prefix of this rank's messages.
    pub fn label(&self) -> String {
        if self.inner.world > 1 {
            format!("rank {} of {}: ", self.inner.rank, self.inner.world)
        } else {
            String::new()
        }
    }
    /// A collective rooted at `root` needs that rank to exist.
    fn check_root(&self, what: &str, root: usize) -> Result<()> {
        if root >= self.inner.world {
            return Err(Error::msg(format!(
                "{what} rank {root}, but there are {} ranks",
                self.inner.world
            )));
        }
        Ok(())
    }

    /// Ready the calling thread for this back-end's collectives (see
    /// [`Collectives::prepare_thread`]).
    pub fn prepare_thread(&self) -> Result<()> {
        self.inner.backend.prepare_thread()
    }
    /// Seconds this rank has spent inside collectives (waiting for the others included).
    pub fn comm_seconds(&self) -> f64 {
        self.inner.comm_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Run one collective under the watchdog and the clock.
    fn timed<T>(
        &self,
        op: &'static str,
        values: usize,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let t0 = Instant::now();
        let guard = self.inner.watchdog.as_ref().map(|w| w.enter(op, values));
        let r = f();
        drop(guard);
        self.inner
            .comm_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }

    /// Element-wise sum over the ranks, in place.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("all_reduce", buf.len(), || {
            self.inner.backend.all_reduce_sum(buf)
        })
    }

    /// [`Self::all_reduce_sum`] from a background thread (see
    /// [`Collectives::all_reduce_sum_background`]).
    pub fn all_reduce_sum_background(&self, buf: &mut [f32]) -> Result<()> {
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("all_reduce", buf.len(), || {
            self.inner.backend.all_reduce_sum_background(buf)
        })
    }

    /// [`Self::reduce_sum`] from a background thread.
    pub fn reduce_sum_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root("reduce to", root)?;
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("reduce", buf.len(), || {
            self.inner.backend.reduce_sum_background(buf, root)
        })
    }

    /// Element-wise sum over the ranks, in place, in f64 (counts, loss sums).
    pub fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("all_reduce", buf.len(), || {
            self.inner.backend.all_reduce_sum_f64(buf)
        })
    }

    /// `send`: `world_size` blocks of `recv.len()`; this rank gets the sum of its block.
    pub fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if send.len() != recv.len() * self.inner.world {
            return Err(Error::msg(format!(
                "reduce_scatter: {} values sent for {} ranks of {} values",
                send.len(),
                self.inner.world,
                recv.len()
            )));
        }
        if self.inner.world == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        self.timed("reduce_scatter", send.len(), || {
            self.inner.backend.reduce_scatter_sum(send, recv)
        })
    }

    /// Element-wise sum over the ranks into `root`'s `buf` (the others' `buf` is unspecified
    /// after the call).
    pub fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root("reduce to", root)?;
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("reduce", buf.len(), || {
            self.inner.backend.reduce_sum(buf, root)
        })
    }

    /// Every rank's `send`, concatenated in rank order into `recv`.
    pub fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        if recv.len() != send.len() * self.inner.world {
            return Err(Error::msg(format!(
                "all_gather: room for {} values, but {} ranks send {} each",
                recv.len(),
                self.inner.world,
                send.len()
            )));
        }
        if self.inner.world == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        self.timed("all_gather", recv.len(), || {
            self.inner.backend.all_gather(send, recv)
        })
    }

    /// `root`'s `buf` into every rank's.
    pub fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root("broadcast from", root)?;
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("broadcast", buf.len(), || {
            self.inner.backend.broadcast(buf, root)
        })
    }

    /// [`Self::broadcast`] from a background thread.
    pub fn broadcast_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.check_root("broadcast from", root)?;
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("broadcast", buf.len(), || {
            self.inner.backend.broadcast_background(buf, root)
        })
    }

    pub fn barrier(&self) -> Result<()> {
        if self.inner.world == 1 {
            return Ok(());
        }
        self.timed("barrier", 0, || self.inner.backend.barrier())
    }

    /// End every rank of the job (this rank failed; the others would wait for it forever).
    pub fn abort(&self, code: i32) -> ! {
        self.inner.backend.abort(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_collectives_are_identities() {
        let d = Dist::default();
        assert_eq!((d.rank(), d.world_size(), d.local_rank()), (0, 1, 0));
        assert!(d.is_root());
        assert_eq!(d.label(), "");
        assert_eq!(d.backend(), "single");
        let mut v = vec![1.5f32, -2.0, 3.25];
        d.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0, 3.25]);
        let mut w = vec![1e300f64, 7.0];
        d.all_reduce_sum_f64(&mut w).unwrap();
        assert_eq!(w, [1e300, 7.0]);
        let mut r = vec![0.0f32; 3];
        d.reduce_scatter_sum(&v, &mut r).unwrap();
        assert_eq!(r, v);
        let mut g = vec![0.0f32; 3];
        d.all_gather(&v, &mut g).unwrap();
        assert_eq!(g, v);
        d.broadcast(&mut v, 0).unwrap();
        assert_eq!(v, [1.5, -2.0, 3.25]);
        d.barrier().unwrap();
        // No time is counted: nothing was waited on.
        assert_eq!(d.comm_seconds(), 0.0);
    }

    #[test]
    fn the_back_end_follows_the_launcher_and_the_device() {
        use BackendChoice::*;
        // mpirun / srun on CPUs: MPI; torchrun-style: NCCL (MPI cannot join it).
        assert_eq!(Auto.resolve("mpirun", false), Mpi);
        assert_eq!(Auto.resolve("srun", false), Mpi);
        assert_eq!(Auto.resolve("torchrun", false), Nccl);
        // On GPUs NCCL when built, whoever launched.
        let gpu = if NCCL_BUILT { Nccl } else { Mpi };
        assert_eq!(Auto.resolve("srun", true), gpu);
        // A choice is kept.
        assert_eq!(Mpi.resolve("torchrun", true), Mpi);
        assert_eq!(Nccl.resolve("mpirun", false), Nccl);
    }

    #[test]
    fn mismatched_lengths_and_roots_are_errors() {
        let d = Dist::default();
        let mut r = vec![0.0f32; 2];
        let e = d.reduce_scatter_sum(&[1.0; 3], &mut r).unwrap_err();
        assert!(
            e.to_string().contains("3 values sent for 1 ranks of 2"),
            "{e}"
        );
        let e = d.all_gather(&[1.0; 3], &mut r).unwrap_err();
        assert!(e.to_string().contains("room for 2 values"), "{e}");
        let e = d.broadcast(&mut r, 1).unwrap_err();
        assert!(
            e.to_string().contains("from rank 1, but there are 1 ranks"),
            "{e}"
        );
    }

    /// A fake two-rank back-end whose collectives are scripted, to test the handle's timing and
    /// its watchdog without MPI.
    struct Fake {
        delay: Duration,
    }
    impl Collectives for Fake {
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn rank(&self) -> usize {
            1
        }
        fn world_size(&self) -> usize {
            2
        }
        fn local_rank(&self) -> usize {
            1
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            std::thread::sleep(self.delay);
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            recv.copy_from_slice(&send[recv.len()..]);
            Ok(())
        }
        fn reduce_sum(&self, buf: &mut [f32], _root: usize) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        }
        fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            recv[..send.len()].copy_from_slice(send);
            recv[send.len()..].copy_from_slice(send);
            Ok(())
        }
        fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }

    #[test]
    fn multi_rank_collectives_are_timed_and_checked() {
        let d = Dist::new(
            Arc::new(Fake {
                delay: Duration::from_millis(20),
            }),
            Duration::from_secs(60),
        );
        assert_eq!(d.label(), "rank 1 of 2: ");
        assert!(!d.is_root());
        let mut v = vec![1.0f32, 2.0];
        d.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, [2.0, 4.0]);
        assert!(d.comm_seconds() >= 0.019, "{}", d.comm_seconds());
        let mut r = vec![0.0f32; 2];
        d.reduce_scatter_sum(&[1.0, 2.0, 3.0, 4.0], &mut r).unwrap();
        assert_eq!(r, [3.0, 4.0]);
        let e = d.reduce_scatter_sum(&[1.0, 2.0], &mut r).unwrap_err();
        assert!(
            e.to_string().contains("2 values sent for 2 ranks of 2"),
            "{e}"
        );
        let mut g = vec![0.0f32; 4];
        d.all_gather(&[5.0, 6.0], &mut g).unwrap();
        assert_eq!(g, [5.0, 6.0, 5.0, 6.0]);
        // Dropping the last handle stops the watchdog thread (the test would hang otherwise).
        drop(d);
    }
}
