//! Distributed training (issue 15) through the real binary on the tiny test model:
//! - DDP on 2 ranks (`mpirun -np 2`, 1 thread each) with batch b per rank gives the losses,
//!   validation losses and final adapter of one process with grad_accum 2 x batch b, within
//!   1e-5 relative (LoRA dropout on: each micro-batch draws the masks of its global pass);
//! - a 2-rank checkpoint resumes in one process (grad_accum doubled) to the same adapter;
//! - `ferrotune launch --nproc 2` runs the same job; rank 0 alone writes; summary.json and the
//!   progress line report the world size and the time in communication;
//! - a rank killed mid-run ends the job within 60 s naming it, and `--resume` completes it;
//! - ZeRO-1 and ZeRO-2 full fine-tuning give DDP's losses and weights (within 1e-5; gradient
//!   clipping on), each rank writing its optimizer shard; ZeRO-2 LoRA equals DDP, and its
//!   2-rank checkpoint resumes in one process to the same adapter;
//! - ZeRO-3 full fine-tuning gives DDP's losses and weights (within 1e-5), each rank holding
//!   only its own weights between steps; its 2-rank checkpoint resumes in one process and on 2
//!   ranks to the same weights; ZeRO-3 LoRA equals DDP; in one process it is the checkpointed run;
//! - gradients sent during the backward pass (`train.overlap_comm`, the default) equal those sent
//!   after it: DDP LoRA, ZeRO-2 full fine-tuning with checkpointing and accumulation; ZeRO-3's
//!   prefetching, overlapped walk gives its sequential walk's weights bit for bit;
//! - refusals: a multi-rank job with `distributed = "none"`, launch without the `mpi` feature.
//!
//! The mpirun tests need the `mpi` feature and `mpirun` (skipped with a note without it).
// Without the feature the helpers serve no test.
#![cfg_attr(not(feature = "mpi"), allow(dead_code, unused_imports))]
use crate::support::{self, arg, check_error, fails, rev_model, succeeds, tmp, REV_WORDS};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A run folder with the tiny model, 12 training rows and 6 validation rows; `train_extra`
/// is appended to `[train]`.
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(tag: &str, train_extra: &str) -> Setup {
        let dir = tmp(tag);
        rev_model(&dir);
        let rows = |n, seed| support::reverse_rows(&REV_WORDS[7..], 6, n, seed);
        std::fs::write(dir.join("train.jsonl"), rows(12, 11)).unwrap();
        std::fs::write(dir.join("dev.jsonl"), rows(6, 12)).unwrap();
        let text = format!(
            r#"model = "model"
output_dir = "out"

[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"

[lora]
r = 4
alpha = 8
dropout = 0.1
targets = "all-linear"

[train]
batch_size = 2
max_seq_len = 32
log_every = 1
lr = 5e-3
warmup_steps = 1
seed = 5
{train_extra}
"#
        );
        let config = dir.join("run.toml");
        std::fs::write(&config, text).unwrap();
        Setup { dir, config }
    }

    /// `train --config run.toml --set output_dir=<dir/name>` plus `args`.
    fn train_args(&self, name: &str, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            "train".to_string(),
            "--config".into(),
            arg(&self.config),
            "--set".into(),
            format!("output_dir={}", arg(&self.dir.join(name))),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }
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
fn zero3_in_one_process_is_a_checkpointed_run_and_fsdp_is_refused() {
    // One rank owns every weight: ZeRO-3's layer walk is activation checkpointing's, bit for
    // bit (full fine-tuning, so the weights themselves go through the walk's slots).
    let s = Setup::new(
        "dist-zero3-one",
        "max_steps = 2\nsave_every = 2\neval_every = 1",
    );
    let full = ["--set", "method=\"full\"", "--threads", "1"];
    let mut z3 = full.to_vec();
    z3.extend(["--set", "train.distributed=\"zero3\""]);
    succeeds(&s.train_args("zero3", &z3));
    let mut ck = full.to_vec();
    ck.extend(["--set", "train.gradient_checkpointing=true"]);
    succeeds(&s.train_args("plain", &ck));
    assert_weights_close(&s.dir.join("zero3"), &s.dir.join("plain"), 0.0);
    assert_eq!(losses(&s.dir.join("zero3")), losses(&s.dir.join("plain")));
    let e = fails(&s.train_args("out", &["--set", "train.distributed=\"fsdp\""]));
    assert!(e.contains("distributed"), "{e}");
}

#[test]
fn zero3_needs_a_llama_family_model() {
    // The layer walk that gathers each layer's weights is the LLaMA one: T5 is refused before
    // the run writes anything, naming the key.
    let s = Setup::new("dist-zero3-t5", "max_steps = 1");
    let t5 = support::repo().join("tests/fixtures/t5/t5-v1_1");
    let model = format!("model=\"{}\"", arg(&t5));
    let e = fails(&s.train_args(
        "out",
        &["--set", &model, "--set", "train.distributed=\"zero3\""],
    ));
    assert!(
        e.contains("train.distributed") && e.contains("LLaMA-family") && e.contains("zero2"),
        "{e}"
    );
    assert!(!s.dir.join("out").exists());
}

#[test]
fn zero_in_one_process_is_a_single_process_run() {
    // One rank owns every parameter: the same weights as a plain run, its optimizer state
    // written as the one shard of one.
    let s = Setup::new("dist-zero-one", "max_steps = 2\nsave_every = 2");
    succeeds(&s.train_args(
        "zero",
        &["--set", "train.distributed=\"zero2\"", "--threads", "1"],
    ));
    succeeds(&s.train_args("plain", &["--threads", "1"]));
    assert_weights_close(&s.dir.join("zero"), &s.dir.join("plain"), 0.0);
    let ck = s.dir.join("zero/checkpoints/step-2");
    assert!(ck.join("optimizer-00001-of-00001.safetensors").is_file());
    assert!(!ck.join("optimizer.safetensors").exists());
}

#[test]
fn ddp_in_one_process_is_a_single_process_run() {
    let s = Setup::new("dist-one", "max_steps = 2");
    succeeds(&s.train_args(
        "out",
        &["--set", "train.distributed=\"ddp\"", "--threads", "1"],
    ));
    let sum = summary(&s.dir.join("out"));
    assert_eq!(sum["world_size"], 1, "{sum}");
    assert_eq!(sum["comm_time_s"], 0.0, "{sum}");
}

#[cfg(not(feature = "mpi"))]
#[test]
fn launch_needs_the_mpi_feature() {
    let e = fails(&[
        "launch", "--nproc", "2", "--", "train", "--config", "run.toml",
    ]);
    assert!(e.contains("without the `mpi` feature"), "{e}");
}

/// `train` as rank 0 of 2 of a torchrun-style launch (RANK / WORLD_SIZE / MASTER_ADDR).
fn torchrun_rank0(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap()
}

#[test]
fn torchrun_style_ranks_need_nccl_and_a_gpu() {
    // A torchrun-style launch is NCCL's (MPI cannot join it): on the CPU that is refused with
    // the way out; `dist_backend = "mpi"` asks for MPI, which must then be built; a GPU run
    // needs the `nccl` feature. Each is one line, before anything is written.
    let s = Setup::new("dist-torchrun", "max_steps = 1\ndistributed = \"ddp\"");
    let e = check_error("cpu", &torchrun_rank0(&s.train_args("out", &[])));
    assert!(
        e.contains("NCCL back-end, which runs between GPUs, but train.device is the CPU")
            && e.contains("torchrun"),
        "{e}"
    );
    if !cfg!(feature = "nccl") {
        let gpu = s.train_args("out", &["--set", "train.device=\"cuda\""]);
        let e = check_error("cuda", &torchrun_rank0(&gpu));
        assert!(e.contains("without the `nccl` feature"), "{e}");
    }
    if !cfg!(feature = "mpi") {
        let mpi = s.train_args("out", &["--set", "train.dist_backend=\"mpi\""]);
        let e = check_error("mpi", &torchrun_rank0(&mpi));
        assert!(e.contains("without the `mpi` feature"), "{e}");
    }
    let e = fails(&s.train_args("out", &["--set", "train.dist_backend=\"gloo\""]));
    assert!(e.contains("dist_backend"), "{e}");
    assert!(!s.dir.join("out").exists());
    if !cfg!(feature = "nccl") {
        let e = fails(&[
            "launch",
            "--backend",
            "nccl",
            "--nproc",
            "2",
            "--",
            "train",
            "--config",
            "x.toml",
        ]);
        assert!(
            e.contains("--backend nccl") && e.contains("`nccl` feature"),
            "{e}"
        );
    }
}

#[test]
fn launch_refuses_a_bad_command_line() {
    if cfg!(feature = "mpi") {
        let e = fails(&[
            "launch", "--nproc", "0", "--", "train", "--config", "x.toml",
        ]);
        assert!(e.contains("--nproc 0"), "{e}");
        let e = fails(&["launch", "--nproc", "2", "--", "merge", "--model", "m"]);
        assert!(e.contains("launch runs `train`"), "{e}");
        // the ranks' config is read before any rank starts: one line, no launcher banner
        let e = fails(&["launch", "--nproc", "2", "--", "train"]);
        assert!(e.contains("needs --config"), "{e}");
        let e = fails(&[
            "launch",
            "--nproc",
            "2",
            "--",
            "train",
            "--config",
            "no-such.toml",
        ]);
        assert!(e.contains("no-such.toml"), "{e}");
        let e = fails(&[
            "launch",
            "--nproc",
            "2",
            "--threads",
            "99999",
            "--",
            "train",
            "--config",
            "x.toml",
        ]);
        assert!(e.contains("--threads 99999"), "{e}");
    }
    // No command after `--`: clap's one-line usage error.
    let e = fails(&["launch", "--nproc", "2"]);
    assert!(e.contains("COMMAND"), "{e}");
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (type, step, loss) of every metrics line.
fn losses(out: &Path) -> Vec<(String, u64, f64)> {
    metrics(out)
        .iter()
        .map(|v| {
            let kind = v["type"].as_str().unwrap().to_string();
            let loss = if kind == "train" {
                &v["loss"]
            } else {
                &v["val_loss"]
            };
            (kind, v["step"].as_u64().unwrap(), loss.as_f64().unwrap())
        })
        .collect()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-30)
}

/// Every tensor of two adapters agrees within `tol` relative to its largest value.
fn assert_adapters_close(a: &Path, b: &Path, tol: f64) {
    assert_weights_close(a, b, tol)
}

/// The trained weights of a run folder: the adapter, or the fully fine-tuned model.
fn weights_file(run: &Path) -> PathBuf {
    // a checkpoint folder of a full or selective run
    let checkpoint = run.join("model.safetensors");
    if checkpoint.is_file() {
        return checkpoint;
    }
    let adapter = run.join("adapter/adapter_model.safetensors");
    if adapter.is_file() {
        return adapter;
    }
    run.join("model/model.safetensors")
}

/// Every tensor of two runs' trained weights agrees within `tol` relative to its largest value.
fn assert_weights_close(a: &Path, b: &Path, tol: f64) {
    let read = |p: &Path| {
        std::fs::read(weights_file(p))
            .unwrap_or_else(|e| panic!("{}: {e}", weights_file(p).display()))
    };
    let (ba, bb) = (read(a), read(b));
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    let mut names = ta.names();
    names.sort();
    let mut names_b = tb.names();
    names_b.sort();
    assert_eq!(names, names_b);
    assert!(!names.is_empty());
    for n in names {
        let f = |t: safetensors::tensor::TensorView| -> Vec<f32> {
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (x, y) = (f(ta.tensor(n).unwrap()), f(tb.tensor(n).unwrap()));
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
        assert!(
            diff <= tol * scale.max(1e-30),
            "{n}: max difference {diff:e} against max {scale:e} ({} vs {})",
            a.display(),
            b.display()
        );
    }
}

fn assert_losses_close(a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{la:?}\n{lb:?}");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!((&x.0, x.1), (&y.0, y.1));
        assert!(rel(x.2, y.2) < 1e-5, "{x:?} vs {y:?}");
    }
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::time::{Duration, Instant};

    /// `mpirun -np 2 --oversubscribe ferrotune <args>`; None (with a note) without mpirun.
    fn mpirun(args: &[String]) -> Option<Command> {
        if Command::new("mpirun").arg("--version").output().is_err() {
            eprintln!("note: mpirun not found; the distributed training tests are skipped");
            return None;
        }
        let mut c = Command::new("mpirun");
        c.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg(env!("CARGO_BIN_EXE_ferrotune"))
            .args(args);
        Some(c)
    }

    fn ddp(s: &Setup, name: &str, extra: &[&str]) -> Option<Output> {
        let mut args = vec!["--set", "train.distributed=\"ddp\"", "--threads", "1"];
        args.extend_from_slice(extra);
        let o = mpirun(&s.train_args(name, &args))?.output().unwrap();
        Some(o)
    }

    #[test]
    fn ddp_on_two_ranks_equals_one_process_with_twice_the_accumulation() {
        let s = Setup::new("dist-ddp", "max_steps = 6\neval_every = 2");
        let Some(o) = ddp(&s, "ddp", &[]) else { return };
        assert!(o.status.success(), "{}", text(&o));
        succeeds(&s.train_args("single", &["--set", "train.grad_accum=2", "--threads", "1"]));
        let (d, one) = (s.dir.join("ddp"), s.dir.join("single"));
        assert_losses_close(&d, &one);
        assert_adapters_close(&d, &one, 1e-5);
        // Rank 0 alone wrote: every step logged once; the world size and communication time.
        let steps: Vec<u64> = losses(&d)
            .iter()
            .filter(|l| l.0 == "train")
            .map(|l| l.1)
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        let sum = summary(&d);
        assert_eq!(sum["world_size"], 2, "{sum}");
        assert!(sum["comm_time_s"].as_f64().unwrap() > 0.0, "{sum}");
        assert_eq!(sum["train_tokens"], summary(&one)["train_tokens"]);
        let line = &metrics(&d)[1];
        assert_eq!(line["world_size"], 2, "{line}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("distributed: ddp on 2 ranks (mpi)"), "{err}");
        assert!(err.contains("| 2 ranks, comm "), "{err}");
        // train.overlap_comm's default (auto) says what it decided on this machine, and why.
        assert!(err.contains("(train.overlap_comm, auto: "), "{err}");
    }

    #[test]
    fn a_two_rank_checkpoint_resumes_in_one_process() {
        let s = Setup::new(
            "dist-resume",
            "max_steps = 6\neval_every = 2\nsave_every = 2",
        );
        let Some(o) = ddp(&s, "run", &["--set", "train.stop_after=3"]) else {
            return;
        };
        assert!(o.status.success(), "{}", text(&o));
        // One process must take the same micro-batches per step: said in one line.
        let e = fails(&s.train_args("run", &["--resume"]));
        assert!(
            e.contains("trainer_state.json")
                && e.contains("field `grad_accum`")
                && e.contains("set train.grad_accum = 2"),
            "{e}"
        );
        succeeds(&s.train_args(
            "run",
            &["--resume", "--set", "train.grad_accum=2", "--threads", "1"],
        ));
        succeeds(&s.train_args("single", &["--set", "train.grad_accum=2", "--threads", "1"]));
        assert_losses_close(&s.dir.join("run"), &s.dir.join("single"));
        assert_adapters_close(&s.dir.join("run"), &s.dir.join("single"), 1e-5);
    }

    /// `mpirun -np 2` of `stage` (1 thread a rank).
    fn sharded(s: &Setup, name: &str, stage: &str, extra: &[&str]) -> Option<Output> {
        let set = format!("train.distributed=\"{stage}\"");
        let mut args = vec!["--set", set.as_str(), "--threads", "1"];
        args.extend_from_slice(extra);
        let o = mpirun(&s.train_args(name, &args))?.output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        Some(o)
    }

    #[test]
    fn zero1_zero2_and_zero3_full_fine_tuning_give_ddp_weights() {
        // Full fine-tuning with gradient clipping on (the ZeRO-2 norm is assembled from the
        // ranks' shares) and checkpoints.
        let s = Setup::new(
            "dist-zero-full",
            "max_steps = 4\neval_every = 2\nsave_every = 2\nmax_grad_norm = 0.05",
        );
        let full = ["--set", "method=\"full\""];
        let Some(_) = sharded(&s, "ddp", "ddp", &full) else {
            return;
        };
        for stage in ["zero1", "zero2", "zero3"] {
            let o = sharded(&s, stage, stage, &full).unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains(&format!("distributed: {stage} on 2 ranks")),
                "{err}"
            );
            if stage == "zero3" {
                // Each rank loaded only the weights it owns (the others' as placeholders).
                assert!(
                    err.contains("ZeRO-3: this rank read its own ")
                        && err.contains(" weights, not the others' "),
                    "{err}"
                );
            }
            assert_losses_close(&s.dir.join(stage), &s.dir.join("ddp"));
            // ZeRO-1 runs DDP's arithmetic element for element: bit-identical.
            let tol = if stage == "zero1" { 0.0 } else { 1e-5 };
            assert_weights_close(&s.dir.join(stage), &s.dir.join("ddp"), tol);
            // Each rank wrote its shard of the optimizer state, about half of DDP's.
            let ck = s.dir.join(stage).join("checkpoints/step-4");
            let whole =
                std::fs::metadata(s.dir.join("ddp/checkpoints/step-4/optimizer.safetensors"))
                    .unwrap()
                    .len();
            for r in 1..=2 {
                let shard = ck.join(format!("optimizer-0000{r}-of-00002.safetensors"));
                let len = std::fs::metadata(&shard)
                    .unwrap_or_else(|e| panic!("{}: {e}", shard.display()))
                    .len();
                assert!(
                    len < whole * 3 / 4,
                    "{stage} shard {r}: {len} of {whole} bytes"
                );
            }
            assert!(!ck.join("optimizer.safetensors").exists());
            assert_eq!(summary(&s.dir.join(stage))["world_size"], 2);
        }
        // A clipped step happened (else the sharded norm would not have been exercised).
        let norms: Vec<f64> = metrics(&s.dir.join("zero2"))
            .iter()
            .filter(|m| m["type"] == "train")
            .map(|m| m["grad_norm"].as_f64().unwrap())
            .collect();
        assert!(norms.iter().any(|&n| n > 0.05), "{norms:?}");
    }

    #[test]
    fn zero2_lora_equals_ddp_and_its_checkpoint_resumes_in_one_process() {
        let s = Setup::new(
            "dist-zero-lora",
            "max_steps = 6\neval_every = 2\nsave_every = 2",
        );
        let Some(_) = sharded(&s, "ddp", "ddp", &[]) else {
            return;
        };
        sharded(&s, "zero2", "zero2", &[]).unwrap();
        assert_losses_close(&s.dir.join("zero2"), &s.dir.join("ddp"));
        assert_adapters_close(&s.dir.join("zero2"), &s.dir.join("ddp"), 1e-5);
        // Stopped after step 3 (checkpoint at 2), resumed by one process: it reads both
        // ranks' shards and ends where the uninterrupted run ended.
        sharded(&s, "run", "zero2", &["--set", "train.stop_after=3"]).unwrap();
        succeeds(&s.train_args(
            "run",
            &["--resume", "--set", "train.grad_accum=2", "--threads", "1"],
        ));
        assert_adapters_close(&s.dir.join("run"), &s.dir.join("ddp"), 1e-5);
        // And by the same 2 ranks, each reading its own entries from both shards.
        sharded(&s, "again", "zero2", &["--set", "train.stop_after=3"]).unwrap();
        sharded(&s, "again", "zero2", &["--resume"]).unwrap();
        assert_adapters_close(&s.dir.join("again"), &s.dir.join("ddp"), 1e-5);
    }

    #[test]
    fn zero3_checkpoints_resume_in_one_process_and_on_two_ranks() {
        let s = Setup::new(
            "dist-zero3-resume",
            "max_steps = 6\neval_every = 2\nsave_every = 2\nmax_grad_norm = 0.05",
        );
        let full = ["--set", "method=\"full\""];
        let Some(_) = sharded(&s, "ddp", "ddp", &full) else {
            return;
        };
        let mut stop = full.to_vec();
        stop.extend(["--set", "train.stop_after=3"]);
        // Stopped after step 3 (checkpoint at 2, weights gathered onto rank 0 for it), resumed
        // by one process: the same weights as the uninterrupted DDP run.
        sharded(&s, "run", "zero3", &stop).unwrap();
        // Resume from step 2's checkpoint, written mid-run (step 3's was written at the end,
        // with the whole model gathered).
        std::fs::remove_dir_all(s.dir.join("run/checkpoints/step-3")).unwrap();
        succeeds(&s.train_args(
            "run",
            &[
                "--resume",
                "--set",
                "train.grad_accum=2",
                "--set",
                "method=\"full\"",
                "--threads",
                "1",
            ],
        ));
        assert_weights_close(&s.dir.join("run"), &s.dir.join("ddp"), 1e-5);
        // And by 2 ranks again, each taking back only its own weights.
        sharded(&s, "again", "zero3", &stop).unwrap();
        let mut resume = full.to_vec();
        resume.push("--resume");
        sharded(&s, "again", "zero3", &resume).unwrap();
        assert_weights_close(&s.dir.join("again"), &s.dir.join("ddp"), 1e-5);
        assert_losses_close(&s.dir.join("again"), &s.dir.join("ddp"));
    }

    #[test]
    fn zero3_lora_equals_ddp() {
        // Adapters are replicated under ZeRO-3 (the frozen f32 base is sharded): LoRA's tensors
        // are reduced onto their owners layer by layer and broadcast back after the update.
        // Two micro-batches a rank: gradients accumulate on the owners across them, each with
        // its own dropout masks.
        let s = Setup::new(
            "dist-zero3-lora",
            "max_steps = 4\neval_every = 2\ngrad_accum = 2",
        );
        let Some(_) = sharded(&s, "ddp", "ddp", &[]) else {
            return;
        };
        let z3 = sharded(&s, "zero3", "zero3", &[]).unwrap();
        // The frozen base other ranks own was never read here (placeholders until gathered).
        assert!(
            text(&z3).contains("ZeRO-3: this rank read its own"),
            "{}",
            text(&z3)
        );
        assert_losses_close(&s.dir.join("zero3"), &s.dir.join("ddp"));
        // The sums are grouped differently: DDP adds a rank's two micro-batches, then the
        // ranks; ZeRO-3 reduces each micro-batch's gradient as its backward pass ends (as FSDP
        // does), then adds them on the owner. Measured: 1.2e-5 of the largest value on one
        // LoRA B matrix after 4 AdamW steps; a lost or doubled micro-batch is off by far more.
        assert_adapters_close(&s.dir.join("zero3"), &s.dir.join("ddp"), 3e-5);
    }

    #[test]
    fn zero3_reads_only_its_share_of_a_gguf_and_equals_ddp() {
        // A GGUF base (Q8_0 blocks): under ZeRO-3 the ownership is planned from the file's
        // header and each rank reads only the blocks of the weights it owns, for LoRA (the
        // quantized base sharded as its blocks) and for full fine-tuning (dequantized to f32):
        // both compute what DDP computes on the whole file.
        let s = Setup::new("dist-zero3-gguf", "max_steps = 3\neval_every = 3");
        let gguf = s.dir.join("model-q8_0.gguf");
        let tiny = support::repo().join("tests/fixtures/gguf/tiny-llama3-rope-freqs.gguf");
        succeeds(&[
            "quantize",
            "--model",
            tiny.to_str().unwrap(),
            "--to",
            "q8_0",
            "--out",
            gguf.to_str().unwrap(),
        ]);
        let model = format!("model=\"{}\"", gguf.display());
        let lora = ["--set", model.as_str()];
        let Some(_) = sharded(&s, "ddp", "ddp", &lora) else {
            return;
        };
        let z3 = sharded(&s, "zero3", "zero3", &lora).unwrap();
        let t = text(&z3);
        assert!(t.contains("ZeRO-3: this rank read its own"), "{t}");
        assert!(t.contains("ZeRO-3 shards the quantized base too"), "{t}");
        assert_losses_close(&s.dir.join("zero3"), &s.dir.join("ddp"));
        assert_adapters_close(&s.dir.join("zero3"), &s.dir.join("ddp"), 1e-9);

        // Full fine-tuning stops after step 3 and compares that step's checkpoint: the final
        // HF folder cannot be written for this file (its Llama 3 RoPE factors have no
        // config.json form), whatever the mode.
        let full = [
            "--set",
            model.as_str(),
            "--set",
            "method=\"full\"",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.save_every=3",
            "--set",
            "train.stop_after=3",
        ];
        sharded(&s, "ddp-full", "ddp", &full).unwrap();
        let z3 = sharded(&s, "zero3-full", "zero3", &full).unwrap();
        let t = text(&z3);
        assert!(
            t.contains("ZeRO-3: this rank read its own")
                && t.contains(" weights, not the others' "),
            "{t}"
        );
        assert_losses_close(&s.dir.join("zero3-full"), &s.dir.join("ddp-full"));
        assert_weights_close(
            &s.dir.join("zero3-full/checkpoints/step-3"),
            &s.dir.join("ddp-full/checkpoints/step-3"),
            1e-5,
        );
    }

    #[test]
    fn zero3_shards_a_quantized_base_and_equals_ddp() {
        // FSDP + QLoRA: the NF4 base (double quantization) is sharded like a dense one, its
        // weights sent as their own blocks. Each rank quantizes only the weights it owns (the
        // others load as placeholders); DoRA reads its base to start, so with it every rank
        // loads and quantizes the whole model, then drops the others' share: both paths must
        // compute what DDP computes on the whole quantized base. One micro-batch a rank: the
        // gradients are summed in DDP's order, so the adapters agree to the last bits.
        let s = Setup::new(
            "dist-zero3-qlora",
            "max_steps = 3\neval_every = 3\nbase_quant = \"nf4\"",
        );
        let Some(_) = sharded(&s, "ddp", "ddp", &[]) else {
            return;
        };
        let z3 = sharded(&s, "zero3", "zero3", &[]).unwrap();
        let t = text(&z3);
        assert!(t.contains("ZeRO-3: this rank read its own"), "{t}");
        assert!(
            t.contains("ZeRO-3 shards the quantized base too (14 weights sent as their blocks)"),
            "{t}"
        );
        assert_losses_close(&s.dir.join("zero3"), &s.dir.join("ddp"));
        assert_adapters_close(&s.dir.join("zero3"), &s.dir.join("ddp"), 1e-9);

        let q4 = [
            "--set",
            "train.base_quant=\"q4_0\"",
            "--set",
            "lora.use_dora=true",
        ];
        sharded(&s, "ddp-q4", "ddp", &q4).unwrap();
        let z3 = sharded(&s, "zero3-q4", "zero3", &q4).unwrap();
        let t = text(&z3);
        assert!(!t.contains("this rank read its own"), "{t}");
        assert!(t.contains("ZeRO-3 shards the quantized base too"), "{t}");
        assert_losses_close(&s.dir.join("zero3-q4"), &s.dir.join("ddp-q4"));
        assert_adapters_close(&s.dir.join("zero3-q4"), &s.dir.join("ddp-q4"), 1e-9);
    }

    #[test]
    fn gradients_sent_during_the_backward_pass_equal_those_sent_after_it() {
        // train.overlap_comm on against off (its default, auto, picks by the cores): DDP LoRA with dropout, and ZeRO-2
        // full fine-tuning (reduce onto owners, a tied embedding that is final only at the
        // end) with two micro-batches a rank and activation checkpointing (the recomputing
        // walk), clipping on.
        let s = Setup::new(
            "dist-overlap",
            "max_steps = 4\neval_every = 2\ngrad_accum = 2\nmax_grad_norm = 0.05",
        );
        let off = ["--set", "train.overlap_comm=false"];
        let forced = ["--set", "train.overlap_comm=true"];
        let Some(on) = sharded(&s, "ddp-on", "ddp", &forced) else {
            return;
        };
        assert!(
            text(&on).contains("gradients sent during the backward pass"),
            "{}",
            text(&on)
        );
        assert!(text(&on).contains("waited)"), "{}", text(&on));
        let o = sharded(&s, "ddp-off", "ddp", &off).unwrap();
        assert!(!text(&o).contains("gradients sent during the backward pass"));
        assert_losses_close(&s.dir.join("ddp-on"), &s.dir.join("ddp-off"));
        assert_adapters_close(&s.dir.join("ddp-on"), &s.dir.join("ddp-off"), 1e-6);
        let sum = summary(&s.dir.join("ddp-on"));
        let (comm, wait) = (
            sum["comm_time_s"].as_f64().unwrap(),
            sum["comm_wait_time_s"].as_f64().unwrap(),
        );
        assert!(comm > 0.0 && wait >= 0.0, "{sum}");
        let full = [
            "--set",
            "method=\"full\"",
            "--set",
            "train.gradient_checkpointing=true",
        ];
        let mut full_on = full.to_vec();
        full_on.extend_from_slice(&forced);
        sharded(&s, "zero2-on", "zero2", &full_on).unwrap();
        let mut full_off = full.to_vec();
        full_off.extend_from_slice(&off);
        sharded(&s, "zero2-off", "zero2", &full_off).unwrap();
        assert_losses_close(&s.dir.join("zero2-on"), &s.dir.join("zero2-off"));
        assert_weights_close(&s.dir.join("zero2-on"), &s.dir.join("zero2-off"), 1e-6);
        // ZeRO-3: the next layer's weights gathered while one computes, the gradients reduced
        // on the queue's thread; the same collectives and additions: the same bits.
        let z3 = ["--set", "method=\"full\""];
        let mut z3_on = z3.to_vec();
        z3_on.extend_from_slice(&forced);
        let o = sharded(&s, "zero3-on", "zero3", &z3_on).unwrap();
        assert!(
            text(&o).contains("ZeRO-3's collectives on a thread of their own"),
            "{}",
            text(&o)
        );
        let mut z3_off = z3.to_vec();
        z3_off.extend_from_slice(&off);
        sharded(&s, "zero3-off", "zero3", &z3_off).unwrap();
        assert_losses_close(&s.dir.join("zero3-on"), &s.dir.join("zero3-off"));
        assert_weights_close(&s.dir.join("zero3-on"), &s.dir.join("zero3-off"), 0.0);
    }

    #[test]
    fn a_multi_rank_job_needs_train_distributed() {
        let s = Setup::new("dist-none", "max_steps = 1");
        let Some(mut c) = mpirun(&s.train_args("out", &[])) else {
            return;
        };
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{}", text(&o));
        let t = text(&o);
        assert!(
            t.contains("key `train.distributed`: is \"none\", but this process is one of 2 ranks"),
            "{t}"
        );
        assert!(!s.dir.join("out").exists(), "{t}");
    }

    #[test]
    fn launch_starts_the_ranks_with_a_thread_each_and_rank_0_writes() {
        let s = Setup::new("dist-launch", "max_steps = 2");
        if Command::new("mpirun").arg("--version").output().is_err() {
            return;
        }
        let mut args = vec![
            "launch".to_string(),
            "--nproc".into(),
            "2".into(),
            "--threads".into(),
            "1".into(),
            "--".into(),
        ];
        args.extend(s.train_args("out", &["--set", "train.distributed=\"ddp\""]));
        let o = support::ferrotune(&args);
        assert!(o.status.success(), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("launch: 2 ranks x 1 threads"), "{err}");
        assert!(err.contains("--threads 1"), "{err}");
        assert_eq!(summary(&s.dir.join("out"))["world_size"], 2);
    }

    /// The pid of rank `rank` among mpirun's children.
    fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(mpirun) {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let want = format!("OMPI_COMM_WORLD_RANK={rank}");
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    #[test]
    fn a_rank_killed_mid_run_ends_the_job_naming_it_and_resume_completes_it() {
        // Long enough (a few seconds) to be killed after its first checkpoint.
        let s = Setup::new(
            "dist-kill",
            "max_steps = 300\nsave_every = 2\nkeep_checkpoints = 2\neval_every = 300",
        );
        let args = s.train_args(
            "run",
            &["--set", "train.distributed=\"ddp\"", "--threads", "1"],
        );
        let Some(mut c) = mpirun(&args) else { return };
        let child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the first checkpoint, then kill rank 1.
        let t0 = Instant::now();
        while support::checkpoint_steps(&s.dir.join("run")).is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(pid) = rank_pid(child.id(), 1) else {
            panic!(
                "rank 1 is not a child of mpirun: {}",
                text(&child.wait_with_output().unwrap())
            );
        };
        // SAFETY: kill(2) on a pid we found as our child's child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let killed = Instant::now();
        let o = child.wait_with_output().unwrap();
        assert!(killed.elapsed() < Duration::from_secs(60));
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(t.contains("rank 1"), "{t}");
        // The last checkpoint is whole: the job resumes from it and ends as one never killed.
        let o = mpirun(&[args.clone(), vec!["--resume".into()]].concat())
            .unwrap()
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        succeeds(&s.train_args("single", &["--set", "train.grad_accum=2", "--threads", "1"]));
        assert_adapters_close(&s.dir.join("run"), &s.dir.join("single"), 1e-5);
    }
}
