//! `ferrotune launch --nproc N -- train --config run.toml`: N ranks of a distributed run on
//! this machine, started with Open MPI's `mpirun` (the `mpi` feature's back-end), or with
//! `--backend nccl` as torchrun starts them (one per GPU; `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`; `ferrotune::dist::local_launch`). Each rank gets `--threads`
//! so that ranks × threads stays within the cores. On a cluster, start the ranks with `mpirun`,
//! `srun` or torchrun directly (README: Distributed training).
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::Command;

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks (processes) to start on this machine.
    #[arg(long)]
    pub nproc: usize,
    /// Worker threads per rank (default: the cores shared among the ranks, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The collectives: `mpi` (CPUs; started with mpirun) or `nccl` (GPUs, one rank per GPU;
    /// started as torchrun does). Default: mpi when this build has it, else nccl.
    #[arg(long, value_parser = ["mpi", "nccl"])]
    pub backend: Option<String>,
    /// The command every rank runs, after `--`: `train --config run.toml [--resume ...]`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Most ranks `--nproc` accepts on one machine (more is a typo).
const MAX_NPROC: usize = 1024;

/// Start the ranks and wait for them; the job's exit status is returned.
pub fn run(a: LaunchArgs) -> Result<i32> {
    use ferrotune::dist::{MPI_BUILT, NCCL_BUILT};
    let backend = match a.backend.as_deref() {
        Some(b) => b,
        None if MPI_BUILT || !NCCL_BUILT => "mpi",
        None => "nccl",
    };
    if backend == "mpi" && !MPI_BUILT {
        bail!(
            "this ferrotune was built without the `mpi` feature, which `launch` starts its ranks with: rebuild with `cargo build --release --features mpi` (needs Open MPI: apt-get install openmpi-bin libopenmpi-dev libclang-dev), or use --backend nccl on GPUs"
        );
    }
    if backend == "nccl" && !NCCL_BUILT {
        bail!(
            "--backend nccl: this ferrotune was built without the `nccl` feature: build it with scripts/build-cuda.sh"
        );
    }
    if a.nproc == 0 || a.nproc > MAX_NPROC {
        bail!("--nproc {}: expected 1 to {MAX_NPROC}", a.nproc);
    }
    if a.command.first().map(String::as_str) != Some("train") {
        bail!(
            "launch runs `train` on every rank: ferrotune launch --nproc {} -- train --config run.toml (got `{}`)",
            a.nproc,
            a.command.join(" ")
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match a.threads {
        Some(t) if t == 0 || t > crate::MAX_THREADS => {
            bail!("--threads {t}: expected 1 to {}", crate::MAX_THREADS)
        }
        Some(t) => t,
        None => (cores / a.nproc).max(1),
    };
    check_train_config(&a.command[1..], a.nproc)?;
    if a.nproc * threads > cores {
        eprintln!(
            "warning: {} ranks x {threads} threads is more than the {cores} cores: the ranks will slow each other down",
            a.nproc
        );
    }
    let has_threads = a
        .command
        .iter()
        .any(|w| w == "--threads" || w.starts_with("--threads=") || w.contains("train.threads="));
    let mut rank_args: Vec<String> = a.command.clone();
    if !has_threads {
        rank_args.extend(["--threads".to_string(), threads.to_string()]);
    }
    let exe = std::env::current_exe()?;
    if backend == "nccl" {
        return launch_nccl(&exe, &rank_args, a.nproc, threads, cores);
    }
    let Some(mpirun) = find_in_path("mpirun") else {
        bail!(
            "mpirun not found on PATH: install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin), or start the ranks with your cluster's launcher (srun)"
        );
    };
    let mut cmd = Command::new(&mpirun);
    cmd.args(["-np", &a.nproc.to_string()])
        // Threads per rank are set by --threads: MPI's default binding would pin each rank,
        // threads and all, to one core.
        .args(["--bind-to", "none"]);
    if a.nproc > cores {
        cmd.arg("--oversubscribe");
    }
    if is_root_user() {
        // Containers commonly run as root, which Open MPI refuses unless told; whoever runs
        // launch as root has chosen to.
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg(&exe).args(&rank_args);
    eprintln!(
        "launch: {} ranks x {threads} threads on {cores} cores: {}",
        a.nproc,
        shown(&cmd)
    );
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("{}: {e}", mpirun.display()))?;
    Ok(status.code().unwrap_or(1))
}

/// The ranks' config, read here before any rank starts: a missing or bad config would otherwise
/// fail on every rank at once, each printing the error, with the launcher's abort banner after.
/// (The rest — data, model — each rank checks as a single run does.)
fn check_train_config(args: &[String], nproc: usize) -> Result<()> {
    let mut config = None;
    let mut sets = Vec::new();
    let mut it = args.iter();
    while let Some(w) = it.next() {
        let value = |flag: &str, it: &mut std::slice::Iter<String>| -> Result<String> {
            match w.strip_prefix(&format!("{flag}=")) {
                Some(v) => Ok(v.to_string()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("train {flag}: a value is missing")),
            }
        };
        if w == "--config" || w.starts_with("--config=") {
            config = Some(value("--config", &mut it)?);
        } else if w == "--set" || w.starts_with("--set=") {
            sets.push(value("--set", &mut it)?);
        }
    }
    let Some(config) = config else {
        bail!("launch: `train` needs --config FILE (ferrotune launch --nproc {nproc} -- train --config run.toml)");
    };
    let c = ferrotune::train::load_config(std::path::Path::new(&config), &sets)?;
    if nproc > 1 && c.config.train.distributed == ferrotune::train::config::Distributed::None {
        bail!(
            "{config}: train.distributed is none (one process): set it to ddp, zero1, zero2 or zero3 to launch {nproc} ranks (--set train.distributed=ddp)"
        );
    }
    Ok(())
}

/// One process per GPU, torchrun-style; a rank that fails stops the others.
fn launch_nccl(
    exe: &std::path::Path,
    args: &[String],
    nproc: usize,
    threads: usize,
    cores: usize,
) -> Result<i32> {
    let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    let runs_on_gpu = args
        .iter()
        .any(|w| w.to_string_lossy().contains("train.device="));
    if !runs_on_gpu {
        // NCCL runs between GPUs: `cuda` is each rank's own (LOCAL_RANK) under NCCL.
        args.extend(["--set".into(), "train.device=cuda".into()]);
    }
    eprintln!(
        "launch: {nproc} ranks (NCCL, one GPU each) x {threads} threads on {cores} cores: {} {}",
        exe.display(),
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Long enough for a rank to finish writing a checkpoint after a peer failed.
    let grace = std::time::Duration::from_secs(30);
    let out = ferrotune::dist::local_launch::run_ranks(exe, &args, nproc, grace)?;
    if let Some(r) = out.failed_rank {
        eprintln!(
            "launch: rank {r} of {nproc} exited with status {}; the other ranks were stopped",
            out.code
        );
    }
    Ok(out.code)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn is_root_user() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The command line as one would type it.
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
