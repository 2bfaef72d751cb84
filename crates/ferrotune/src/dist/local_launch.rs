//! Start N ranks of one command on this machine the way torchrun does (`--standalone`): each
//! process gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
//! `MASTER_PORT` (a free port on the loopback unless the caller's environment names one).
//! `ferrotune launch --backend nccl` uses it (one rank per GPU); the MPI back-end has mpirun.
//!
//! If a rank fails, the others are stopped (SIGTERM, then SIGKILL after a grace period) and
//! the failing rank's status is the job's: no rank is left waiting for a dead peer.
use crate::{Error, Result};
use std::ffi::OsString;
use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// 0 when every rank succeeded; else the first failing rank's exit status (128 + signal
    /// for a rank killed by a signal).
    pub code: i32,
    /// The first rank that failed, if any.
    pub failed_rank: Option<usize>,
}

/// The rendezvous address the ranks get: the caller's `MASTER_ADDR` / `MASTER_PORT` if set,
/// else the loopback and a port free now.
pub fn local_master() -> Result<(String, u16)> {
    let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    if let Some(r) = super::Rendezvous::from_env()? {
        return Ok((r.addr, r.port));
    }
    let port = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| {
            Error::msg(format!(
                "launch: no free local port for the rendezvous: {e}"
            ))
        })?
        .port();
    Ok((addr, port))
}

/// Run `program args` as `nproc` ranks and wait for them. `grace`: how long the surviving
/// ranks get to stop after one failed before they are killed.
pub fn run_ranks(
    program: &std::path::Path,
    args: &[OsString],
    nproc: usize,
    grace: Duration,
) -> Result<LaunchOutcome> {
    if nproc == 0 {
        return Err(Error::msg("launch: at least one rank"));
    }
    let (addr, port) = local_master()?;
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string());
        // An outer launcher's variables would win over ours (LaunchEnv reads mpirun's and
        // srun's first): this job is the torchrun-style one.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("OMPI_COMM_WORLD_")
                || k.starts_with("PMI_")
                || k.starts_with("PMIX_")
                || matches!(
                    k.as_ref(),
                    "SLURM_PROCID" | "SLURM_STEP_NUM_TASKS" | "SLURM_LOCALID"
                )
            {
                cmd.env_remove(k.as_ref());
            }
        }
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop_all(&mut children, grace);
                return Err(Error::msg(format!(
                    "launch: cannot start rank {rank} ({}): {e}",
                    program.display()
                )));
            }
        }
    }
    let mut outcome = LaunchOutcome {
        code: 0,
        failed_rank: None,
    };
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    let code = exit_code(status);
                    if code != 0 && outcome.failed_rank.is_none() {
                        outcome = LaunchOutcome {
                            code,
                            failed_rank: Some(rank),
                        };
                    }
                }
                Ok(None) => running += 1,
                Err(e) => {
                    return Err(Error::msg(format!("launch: waiting for rank {rank}: {e}")));
                }
            }
        }
        if running == 0 {
            return Ok(outcome);
        }
        if outcome.failed_rank.is_some() {
            stop_all(&mut children, grace);
            return Ok(outcome);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// SIGTERM every rank still running, wait up to `grace`, then SIGKILL the rest.
fn stop_all(children: &mut [Option<Child>], grace: Duration) {
    for c in children.iter().flatten() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not
        // yet waited for, so it cannot have been reused.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        let mut running = false;
        for slot in children.iter_mut() {
            if let Some(c) = slot {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => *slot = None,
                    Ok(None) => running = true,
                }
            }
        }
        if !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn every_rank_gets_the_torchrun_environment() {
        let dir = std::env::temp_dir().join(format!("ft-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT\" > {}/rank$RANK",
            dir.display()
        );
        let out = run_ranks(
            Path::new("/bin/sh"),
            &sh(&script),
            3,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            out,
            LaunchOutcome {
                code: 0,
                failed_rank: None
            }
        );
        let mut ports = Vec::new();
        for r in 0..3 {
            let line = std::fs::read_to_string(dir.join(format!("rank{r}"))).unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                &f[..4],
                &[r.to_string().as_str(), "3", r.to_string().as_str(), "3"]
            );
            assert!(!f[4].is_empty());
            ports.push(f[5].parse::<u16>().unwrap());
        }
        assert!(ports.iter().all(|&p| p == ports[0] && p > 0), "{ports:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_gives_its_status() {
        let t0 = Instant::now();
        // Rank 1 fails at once; ranks 0 and 2 would run for a minute.
        let out = run_ranks(
            Path::new("/bin/sh"),
            &sh("if [ \"$RANK\" = 1 ]; then exit 7; fi; sleep 60"),
            3,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            out,
            LaunchOutcome {
                code: 7,
                failed_rank: Some(1)
            }
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_rank_that_ignores_sigterm_is_killed_after_the_grace() {
        let t0 = Instant::now();
        let out = run_ranks(
            Path::new("/bin/sh"),
            &sh("if [ \"$RANK\" = 0 ]; then exit 3; fi; trap '' TERM; sleep 60"),
            2,
            Duration::from_millis(500),
        )
        .unwrap();
        assert_eq!(
            out,
            LaunchOutcome {
                code: 3,
                failed_rank: Some(0)
            }
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_missing_program_is_an_error_naming_it() {
        let e = run_ranks(
            Path::new("/no/such/ferrotune"),
            &[],
            2,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cannot start rank 0 (/no/such/ferrotune)"),
            "{e}"
        );
    }
}
