//! Checks every collective of `ferrotune::dist` on the MPI back-end against the value it must
//! give; run as `mpirun -np N ferrotune-dist-check` (the distributed tests do). Built as
//! `ferrotune-nccl-check` (feature `nccl`) it checks the NCCL back-end instead, one rank per
//! GPU under a torchrun-style launch (bench/nccl_check.sh). Each rank prints
//! `rank R of N: ok` or fails with the first wrong result. `ferrotune-dist-check hang R`: rank R
//! stops answering before the first collective, so the others must end the job through the
//! watchdog (`FERROTUNE_DIST_TIMEOUT_S`, default 5 s here); `ferrotune-dist-check die R`: rank
//! R aborts (SIGABRT), so mpirun must end the job naming it.
use ferrotune::dist::{BackendChoice, Dist, LaunchEnv};
use std::time::Duration;

fn check(what: &str, got: &[f32], want: &[f32]) {
    if got != want {
        eprintln!("error: {what}: got {got:?}, want {want:?}");
        std::process::exit(1);
    }
}

pub fn main() {
    let timeout = std::env::var("FERROTUNE_DIST_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let nccl = env!("CARGO_BIN_NAME") == "ferrotune-nccl-check";
    let choice = if nccl {
        BackendChoice::Nccl
    } else {
        BackendChoice::Mpi
    };
    let d = match Dist::from_environment(Duration::from_secs(timeout), choice, nccl) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let (r, n) = (d.rank(), d.world_size());
    let args: Vec<String> = std::env::args().collect();
    let who: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    match args.get(1).map(String::as_str) {
        Some("hang") if r == who => std::thread::sleep(Duration::from_secs(3600)),
        Some("die") if r == who => std::process::abort(),
        _ => {}
    }
    let env = LaunchEnv::read();
    if env.rank.is_some_and(|er| er != r) {
        eprintln!("error: the launcher says rank {:?}, MPI says {r}", env.rank);
        std::process::exit(1);
    }
    let rf = r as f32;
    // all_reduce: sum over ranks of (rank + 1) * [1, 2, 3].
    let tri = (n * (n + 1) / 2) as f32;
    let mut v = vec![rf + 1.0, 2.0 * (rf + 1.0), 3.0 * (rf + 1.0)];
    d.all_reduce_sum(&mut v).unwrap();
    check("all_reduce", &v, &[tri, 2.0 * tri, 3.0 * tri]);
    let mut w = vec![1e15f64 + r as f64, 0.5];
    d.all_reduce_sum_f64(&mut w).unwrap();
    let want = n as f64 * 1e15 + (n * (n - 1) / 2) as f64;
    if w != [want, 0.5 * n as f64] {
        eprintln!("error: all_reduce f64: got {w:?}");
        std::process::exit(1);
    }
    // reduce_scatter: rank q sends block b = [q + b, 10 b]; rank r receives the sum of block r.
    let send: Vec<f32> = (0..n)
        .flat_map(|b| [rf + b as f32, 10.0 * b as f32])
        .collect();
    let mut recv = vec![0.0f32; 2];
    d.reduce_scatter_sum(&send, &mut recv).unwrap();
    let sum_q = (n * (n - 1) / 2) as f32;
    check(
        "reduce_scatter",
        &recv,
        &[sum_q + n as f32 * rf, 10.0 * rf * n as f32],
    );
    // all_gather: [rank, -rank] from each.
    let mut all = vec![0.0f32; 2 * n];
    d.all_gather(&[rf, -rf], &mut all).unwrap();
    let want: Vec<f32> = (0..n).flat_map(|q| [q as f32, -(q as f32)]).collect();
    check("all_gather", &all, &want);
    // reduce to rank 0: sum over ranks of (rank + 1) * [1, 2].
    let mut red = vec![rf + 1.0, 2.0 * (rf + 1.0)];
    d.reduce_sum(&mut red, 0).unwrap();
    if r == 0 {
        check("reduce", &red, &[tri, 2.0 * tri]);
    }
    // broadcast from the last rank.
    let mut b = vec![rf; 4];
    d.broadcast(&mut b, n - 1).unwrap();
    check("broadcast", &b, &[(n - 1) as f32; 4]);
    d.barrier().unwrap();
    if d.local_rank() >= n {
        eprintln!("error: local rank {} of {n}", d.local_rank());
        std::process::exit(1);
    }
    println!(
        "rank {r} of {n}: ok (local rank {}, {:.6} s in collectives)",
        d.local_rank(),
        d.comm_seconds()
    );
}
