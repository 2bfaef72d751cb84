//! The MPI back-end under `mpirun -np 2` (feature `mpi`; skipped with a note where mpirun is
//! missing): every collective's result, and the two failures a job must not hang on: a rank
//! that hangs (the others' watchdog ends the job) and a rank that dies (mpirun ends the job).
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mpirun() -> Option<Command> {
    let found = Command::new("mpirun").arg("--version").output().is_ok();
    if !found {
        eprintln!("note: mpirun not found; the MPI tests are skipped (install openmpi-bin)");
        return None;
    }
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe"])
        // CI containers run as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .arg(env!("CARGO_BIN_EXE_ferrotune-dist-check"));
    Some(c)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_collective_gives_its_result_on_two_ranks() {
    let Some(mut c) = mpirun() else { return };
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for r in 0..2 {
        assert!(t.contains(&format!("rank {r} of 2: ok")), "{t}");
    }
}

#[test]
fn a_hung_rank_ends_the_job_through_the_watchdog() {
    let Some(mut c) = mpirun() else { return };
    let t0 = Instant::now();
    let o = c
        .args(["hang", "1"])
        .env("FERROTUNE_DIST_TIMEOUT_S", "2")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{t}");
    assert!(
        t.contains("error: rank 0 of 2: all_reduce of 3 values has waited 2 s for the other ranks"),
        "{t}"
    );
}

#[test]
fn a_dead_rank_ends_the_job_naming_it() {
    let Some(mut c) = mpirun() else { return };
    let t0 = Instant::now();
    let o = c
        .args(["die", "1"])
        .env("FERROTUNE_DIST_TIMEOUT_S", "30")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    // mpirun notices at once: well before the watchdog's 30 s.
    assert!(t0.elapsed() < Duration::from_secs(25), "{t}");
    assert!(t.contains("rank 1"), "{t}");
}
