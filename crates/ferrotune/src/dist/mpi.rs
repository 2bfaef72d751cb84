//! The MPI back-end (cargo feature `mpi`): Open MPI through rsmpi (the `mpi` crate). MPI is
//! started with `MPI_THREAD_MULTIPLE` so that the watchdog thread may call `MPI_Abort` while
//! the main thread is blocked in a collective; MPI ends when the back-end is dropped.
//!
//! MPI's default error handler aborts the job on any MPI error, so the collectives here return
//! `Ok` or never return.
use super::Collectives;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

pub struct MpiBackend {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    /// Dropped last: `MPI_Finalize`.
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI was initialised with MPI_THREAD_MULTIPLE (checked in `init`), under which any
// thread may call MPI on these handles; the handles themselves are plain integers / pointers
// owned by the MPI library for the life of the process.
unsafe impl Send for MpiBackend {}
unsafe impl Sync for MpiBackend {}

impl MpiBackend {
    /// Start MPI (once per process). Under mpirun or srun this joins the job; started on its
    /// own it is a job of one rank.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| {
                Error::msg("MPI was already started in this process (it starts once)")
            })?;
        if threading != mpi::Threading::Multiple {
            return Err(Error::msg(format!(
                "the MPI library offers threading level {threading:?}, but the watchdog needs MULTIPLE (Open MPI 4 has it; is another MPI first on the library path?)"
            )));
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        // The ranks that share this machine's memory, in world order.
        let shared = world.split_shared(world.rank());
        let (local_rank, local_size) = (shared.rank() as usize, shared.size() as usize);
        Ok(MpiBackend {
            world,
            rank,
            size,
            local_rank,
            local_size,
            _universe: universe,
        })
    }
}

impl Collectives for MpiBackend {
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_reduce_sum_background(&self, buf: &mut [f32]) -> Result<()> {
        if wait_policy() == WaitPolicy::Block {
            return self.all_reduce_sum(buf);
        }
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            wait_patiently(self.world.immediate_all_reduce_into(
                scope,
                &send[..],
                buf,
                SystemOperation::sum(),
            ))
        });
        Ok(())
    }
    fn reduce_sum_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if wait_policy() == WaitPolicy::Block {
            return self.reduce_sum(buf, root);
        }
        let send = buf.to_vec();
        let at = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| {
            if self.rank == root {
                wait_patiently(at.immediate_reduce_into_root(
                    scope,
                    &send[..],
                    buf,
                    SystemOperation::sum(),
                ))
            } else {
                wait_patiently(at.immediate_reduce_into(scope, &send[..], SystemOperation::sum()))
            }
        });
        Ok(())
    }
    fn broadcast_background(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if wait_policy() == WaitPolicy::Block {
            return self.broadcast(buf, root);
        }
        let at = self.world.process_at_rank(root as i32);
        mpi::request::scope(|scope| wait_patiently(at.immediate_broadcast_into(scope, buf)));
        Ok(())
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.world
            .reduce_scatter_block_into(send, recv, SystemOperation::sum());
        Ok(())
    }
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let send = buf.to_vec();
        let at = self.world.process_at_rank(root as i32);
        if self.rank == root {
            at.reduce_into_root(&send[..], buf, SystemOperation::sum());
        } else {
            at.reduce_into(&send[..], SystemOperation::sum());
        }
        Ok(())
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.world.all_gather_into(send, recv);
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// How a background collective waits for the other ranks (`FERROTUNE_COMM_WAIT`): `yield`
/// (default) tests its non-blocking request and yields the core between tests, so a training
/// thread on the same core runs while the other ranks are not there yet and the transfer still
/// progresses at every test (Open MPI advances non-blocking collectives only inside MPI calls,
/// a fragment at a time over shared memory); `sleep` sleeps 100 us between tests (the least CPU,
/// but a large bucket crawls); `block` is MPI's own blocking call, which spins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitPolicy {
    Yield,
    Sleep,
    Block,
}

fn wait_policy() -> WaitPolicy {
    static POLICY: std::sync::OnceLock<WaitPolicy> = std::sync::OnceLock::new();
    *POLICY.get_or_init(|| match std::env::var("FERROTUNE_COMM_WAIT").as_deref() {
        Ok("sleep") => WaitPolicy::Sleep,
        Ok("block") => WaitPolicy::Block,
        Ok("yield") | Err(_) => WaitPolicy::Yield,
        Ok(other) => {
            eprintln!(
                "warning: FERROTUNE_COMM_WAIT=`{other}` is not yield, sleep or block: yield is used"
            );
            WaitPolicy::Yield
        }
    })
}

/// Wait for a non-blocking collective by testing it, yielding or sleeping in between (see
/// [`WaitPolicy`]): MPI's own wait spins on a core, which a background thread on a machine with
/// a rank per core takes from the training thread (measured: DDP 0.85x with overlapped, spinning
/// communication on two cores).
fn wait_patiently<'a, D: ?Sized, S: mpi::request::Scope<'a>>(
    mut request: mpi::request::Request<'a, D, S>,
) {
    let sleep = wait_policy() == WaitPolicy::Sleep;
    loop {
        match request.test() {
            Ok(_) => return,
            Err(pending) => {
                request = pending;
                if sleep {
                    std::thread::sleep(std::time::Duration::from_micros(100));
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}
