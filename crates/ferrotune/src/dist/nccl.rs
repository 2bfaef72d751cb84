//! The NCCL back-end (cargo feature `nccl`, with `cuda`): NVIDIA's collectives between GPUs,
//! through cudarc (as candle re-exports it). One process per GPU, started by torchrun
//! (`--no-python`), `ferrotune launch --backend nccl`, `srun` or `mpirun`; the rank, world size
//! and local rank come from the launcher's variables ([`LaunchEnv`]) and NCCL's unique id from
//! rank 0 over the [`Rendezvous`] at `MASTER_ADDR:MASTER_PORT`. Rank r drives GPU
//! `LOCAL_RANK`.
//!
//! The [`Collectives`] interface takes host buffers (the training code gathers each bucket of
//! gradients into one flat f32 buffer for every back-end), so each collective copies its buffer
//! onto this rank's GPU, runs NCCL on a stream of its own, and copies the result back. That
//! costs two PCIe copies per bucket, small beside a step's compute; device-resident buckets
//! would remove them.
//!
//! A rank that dies leaves NCCL's kernels on the others spinning; the watchdog of [`super::Dist`]
//! then ends each of them at the timeout, naming the rank and the collective.
use super::{Collectives, LaunchEnv, Rendezvous};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct NcclBackend {
    /// NCCL communicators must not be called from two threads at once.
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    local_rank: usize,
    /// The CUDA device this rank drives (its ordinal among those this process sees).
    gpu: usize,
}

// SAFETY: the communicator is a handle NCCL owns for the life of the process; every call on it
// goes through the mutex, so no two threads use it at once (NCCL's requirement). The stream is
// cudarc's thread-safe handle.
unsafe impl Send for NcclBackend {}
unsafe impl Sync for NcclBackend {}

/// A communicator on its way from the thread that created it to the back-end.
struct SendComm(Comm);
// SAFETY: an NCCL communicator is not tied to the thread that created it; it is used by one
// thread at a time (here: handed over once, then only under the back-end's mutex).
unsafe impl Send for SendComm {}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::msg(format!("NCCL {what}: {e:?}"))
}

impl NcclBackend {
    /// Join the job the launcher started: GPU `LOCAL_RANK`, the unique id from rank 0 through
    /// `rendezvous`, then the communicator (which waits for every rank, up to `timeout`).
    pub fn init(env: &LaunchEnv, rendezvous: &Rendezvous, timeout: Duration) -> Result<Self> {
        let (Some(rank), Some(world)) = (env.rank, env.world_size) else {
            return Err(Error::msg(format!(
                "the NCCL back-end needs this process's rank and the world size from its launcher (RANK and WORLD_SIZE, or mpirun / srun's), but {} gave {:?} of {:?}",
                env.launcher, env.rank, env.world_size
            )));
        };
        if rank >= world {
            return Err(Error::msg(format!(
                "the launcher ({}) says rank {rank} of {world} ranks",
                env.launcher
            )));
        }
        let local_rank = env.local_rank.unwrap_or(rank);
        let visible = CudaContext::device_count()
            .map_err(|e| Error::msg(format!("rank {rank}: no CUDA devices: {e}")))?
            .max(0) as usize;
        // One GPU per rank: GPU LOCAL_RANK of the machine's, or the only one this process sees
        // (Slurm's --gpus-per-task 1 and other launchers narrow CUDA_VISIBLE_DEVICES per rank).
        let gpu = match visible {
            0 => return Err(Error::msg(format!("rank {rank}: no CUDA device is visible"))),
            1 => 0,
            n if local_rank < n => local_rank,
            n => {
                return Err(Error::msg(format!(
                    "rank {rank}: LOCAL_RANK {local_rank}, but this process sees {n} GPUs: one GPU per rank on each machine"
                )))
            }
        };
        let ctx = CudaContext::new(gpu)
            .map_err(|e| Error::msg(format!("rank {rank}: GPU {gpu}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::msg(format!("rank {rank}: a CUDA stream on GPU {gpu}: {e}")))?;
        let id = rendezvous.share(
            rank,
            world,
            || {
                let id = Id::new().map_err(|e| nccl_err("unique id", e))?;
                Ok(id.internal().iter().map(|&c| c as u8).collect())
            },
            timeout,
        )?;
        let internal: [std::ffi::c_char; 128] =
            std::array::from_fn(|i| id.get(i).copied().unwrap_or(0) as std::ffi::c_char);
        if id.len() != internal.len() {
            return Err(Error::msg(format!(
                "rendezvous: rank 0 sent {} bytes for NCCL's 128-byte unique id (a different ferrotune on rank 0?)",
                id.len()
            )));
        }
        // ncclCommInitRank waits for every rank; a rank that died after the rendezvous would
        // make it wait forever, so it runs on a thread of its own under the same timeout.
        let (tx, rx) = std::sync::mpsc::channel();
        let init_stream = stream.clone();
        std::thread::spawn(move || {
            // NCCL takes the calling thread's current device as the communicator's GPU.
            let comm = init_stream
                .context()
                .bind_to_thread()
                .map_err(|e| format!("GPU {gpu}: {e}"))
                .and_then(|_| {
                    Comm::from_rank(init_stream, rank, world, Id::uninit(internal))
                        .map(SendComm)
                        .map_err(|e| format!("{e:?}"))
                });
            let _ = tx.send(comm);
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(SendComm(c))) => c,
            Ok(Err(e)) => return Err(Error::msg(format!("rank {rank}: NCCL init: {e}"))),
            Err(_) => {
                return Err(Error::msg(format!(
                    "rank {rank} of {world}: NCCL did not connect every rank within {} s (a rank died after the rendezvous, or the network between the hosts is blocked: NCCL_DEBUG=INFO says which)",
                    timeout.as_secs()
                )))
            }
        };
        Ok(NcclBackend {
            comm: Mutex::new(comm),
            stream,
            rank,
            world,
            local_rank,
            gpu,
        })
    }

    /// Lock the communicator (a poisoned lock means an earlier collective panicked: the job
    /// cannot continue in step with the others).
    fn comm(&self) -> Result<std::sync::MutexGuard<'_, Comm>> {
        self.comm
            .lock()
            .map_err(|_| Error::msg("NCCL: an earlier collective failed on this rank"))
    }

    fn to_device<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| Error::msg(format!("copy to GPU {}: {e}", self.gpu)))
    }

    fn to_host<T: DeviceRepr>(&self, dev: &CudaSlice<T>, host: &mut [T]) -> Result<()> {
        self.stream
            .memcpy_dtoh(dev, host)
            .and_then(|_| self.stream.synchronize())
            .map_err(|e| Error::msg(format!("copy from GPU {}: {e}", self.gpu)))
    }

    /// All-reduce (sum) of `buf` in f32 or f64, in place.
    fn sum_in_place<T: DeviceRepr + NcclType>(&self, buf: &mut [T]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm()?;
        let mut d = self.to_device(buf)?;
        comm.all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all_reduce", e))?;
        self.to_host(&d, buf)
    }

    /// A collective from a send buffer into a separate receive buffer (reduce-scatter,
    /// all-gather): both staged on the GPU, the result copied back into `recv`.
    fn send_receive<R>(
        &self,
        send: &[f32],
        recv: &mut [f32],
        what: &str,
        op: impl FnOnce(
            &Comm,
            &CudaSlice<f32>,
            &mut CudaSlice<f32>,
        ) -> std::result::Result<R, NcclError>,
    ) -> Result<()> {
        if send.is_empty() || recv.is_empty() {
            return Ok(());
        }
        let comm = self.comm()?;
        let s = self.to_device(send)?;
        let mut r = self.zeros(recv.len())?;
        op(&comm, &s, &mut r).map_err(|e| nccl_err(what, e))?;
        self.to_host(&r, recv)
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| Error::msg(format!("{n} floats on GPU {}: {e}", self.gpu)))
    }
}

impl Collectives for NcclBackend {
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn gpu(&self) -> Option<usize> {
        Some(self.gpu)
    }
    fn prepare_thread(&self) -> Result<()> {
        // NCCL and the staging copies run on the calling thread's current device.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::msg(format!("GPU {}: {e}", self.gpu)))
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_in_place(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_in_place(buf)
    }
    fn reduce_scatter_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.send_receive(send, recv, "reduce_scatter", |c, s, r| {
            c.reduce_scatter(s, r, &ReduceOp::Sum)
        })
    }
    fn reduce_sum(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm()?;
        let mut d = self.to_device(buf)?;
        comm.reduce_in_place(&mut d, &ReduceOp::Sum, root as i32)
            .map_err(|e| nccl_err("reduce", e))?;
        if self.rank == root {
            self.to_host(&d, buf)
        } else {
            // The others' buffers are unspecified after a reduce; only wait for the send.
            self.stream
                .synchronize()
                .map_err(|e| Error::msg(format!("GPU {}: {e}", self.gpu)))
        }
    }
    fn all_gather(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.send_receive(send, recv, "all_gather", |c, s, r| c.all_gather(s, r))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let comm = self.comm()?;
        let mut d = self.to_device(buf)?;
        comm.broadcast_in_place(&mut d, root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        self.to_host(&d, buf)
    }
    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-value all-reduce waits for every rank the same way.
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }
    fn abort(&self, code: i32) -> ! {
        // Called with a collective possibly still spinning on the GPU (that is why the job is
        // ending): leave at once; the driver frees the context, and the others' watchdogs or
        // the launcher end them.
        use std::io::Write;
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process without running destructors, which could block on
        // the GPU's spinning collective.
        unsafe { libc::_exit(code) }
    }
}
