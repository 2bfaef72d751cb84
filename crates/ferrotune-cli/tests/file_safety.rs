//! No command loses a user's file, through the real binary, on the tiny test model
//! (tests/fixtures/models, 2 layers, vocab 256) with a word-level tokenizer:
//! - `train` uses a new or empty `output_dir` (and marks it as a run folder) or a run folder
//!   (with `--resume` or `--overwrite`, which removes only the run's files); any other folder is
//!   refused, so a config's own folder, or a folder holding a `summary.json` of the user's, is
//!   never written into;
//! - `--resume` of a finished run changes nothing; a checkpoint whose state does not follow from
//!   the run (a huge dropout counter, a step past max_steps, a cursor out of range) is a
//!   one-line error, not a hang;
//! - Ctrl-C (SIGINT, SIGTERM) stops a run at the next step boundary with a checkpoint and says
//!   how to resume, and the resumed run ends with the adapter of an uninterrupted one; a second
//!   Ctrl-C quits at once; a Ctrl-C before training starts writes nothing;
//! - `train --dry-run` checks everything and writes nothing;
//! - `eval --output` refuses an existing file without `--overwrite` and its own inputs always;
//!   `convert --out` / `merge --out` refuse a folder of the user's without `--overwrite` and the
//!   input model's folder always, and appear whole or not at all.
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::support;
use support::{
    check_error, checkpoint_steps, fails, ferrotune, logged_steps, merge, rev_model as tiny_model,
    succeeds, tmp, REV_WORDS,
};

/// `n` rows {"q": "rev a b c", "a": "c b a"} of 1 to 6 words, seeded.
fn reverse_rows(n: usize, seed: u64) -> String {
    support::reverse_rows(&REV_WORDS[7..], 6, n, seed)
}

/// The text of a run config over `model/`, `train.jsonl` and `dev.jsonl`.
fn config_text(output_dir: &str, lora_extra: &str, train_extra: &str) -> String {
    format!(
        r#"model = "model"
output_dir = "{output_dir}"

[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"

[lora]
r = 4
alpha = 8
targets = "all-linear"
{lora_extra}

[train]
batch_size = 2
max_seq_len = 32
log_every = 1000
{train_extra}
"#
    )
}

/// A folder with the model, the data and `run.toml` (output_dir `out`).
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(tag: &str, lora_extra: &str, train_extra: &str) -> Setup {
        let dir = tmp(tag);
        tiny_model(&dir);
        std::fs::write(dir.join("train.jsonl"), reverse_rows(10, 1)).unwrap();
        std::fs::write(dir.join("dev.jsonl"), reverse_rows(4, 2)).unwrap();
        let config = dir.join("run.toml");
        std::fs::write(&config, config_text("out", lora_extra, train_extra)).unwrap();
        Setup { dir, config }
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    fn train_args(&self, args: &[&str]) -> Vec<String> {
        let mut v = vec![
            "train".to_string(),
            "--config".to_string(),
            self.config.display().to_string(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
}

/// `args`, killed and failed if it runs longer than `limit` (a hang is a failure, not a stuck
/// test run).
fn run_with_limit(args: &[String], limit: Duration) -> Output {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} still ran after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Every file under `dir`: relative path -> (bytes, modification time).
type Snapshot = BTreeMap<PathBuf, (Vec<u8>, SystemTime)>;
fn snapshot(dir: &Path) -> Snapshot {
    fn walk(root: &Path, d: &Path, out: &mut Snapshot) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (std::fs::read(&p).unwrap(), meta.modified().unwrap()),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

// ---- train: the run folder ------------------------------------------------------------------

#[test]
fn a_run_in_its_configs_folder_never_writes_over_the_users_config() {
    // The config is `config.toml`, the name of the file a run saves its effective config to,
    // and the run's output_dir is the config's own folder.
    let s = Setup::new("configdir", "", "max_steps = 2");
    let config = s.dir.join("config.toml");
    std::fs::write(&config, config_text(".", "", "max_steps = 2")).unwrap();
    let before = snapshot(&s.dir);
    let e = fails(&["train", "--config", config.to_str().unwrap()]);
    assert!(e.contains("config.toml: line 2: key `output_dir`"), "{e}");
    assert!(
        e.contains(&s.dir.display().to_string()) && e.contains("not a ferrotune run folder"),
        "{e}"
    );
    assert_eq!(snapshot(&s.dir), before, "the config's folder changed");
    // --overwrite does not make the user's folder a run folder.
    let e = fails(&["train", "--config", config.to_str().unwrap(), "--overwrite"]);
    assert!(e.contains("not a ferrotune run folder"), "{e}");
    assert_eq!(snapshot(&s.dir), before);
}

#[test]
fn an_existing_folder_without_a_run_keeps_its_summary_and_metrics() {
    let s = Setup::new("foreign", "", "max_steps = 2");
    std::fs::create_dir_all(s.out()).unwrap();
    std::fs::write(s.out().join("summary.json"), "{\"mine\": true}").unwrap();
    std::fs::write(s.out().join("metrics.jsonl"), "{\"mine\": 1}\n").unwrap();
    let before = snapshot(&s.out());
    for flags in [&[][..], &["--resume"], &["--overwrite"]] {
        let e = fails(&s.train_args(flags));
        assert!(
            e.contains("key `output_dir`") && e.contains("`metrics.jsonl`, `summary.json`"),
            "{flags:?}: {e}"
        );
        assert_eq!(snapshot(&s.out()), before, "{flags:?}");
    }
    // An empty folder is taken, and marked as a run folder.
    let s = Setup::new("emptydir", "", "max_steps = 2");
    std::fs::create_dir_all(s.out()).unwrap();
    succeeds(&s.train_args(&[]));
    assert!(s.out().join(".ferrotune").exists());
    assert!(s.out().join("adapter/adapter_model.safetensors").exists());
}

#[test]
fn a_file_as_output_dir_and_an_input_inside_the_run_are_refused() {
    let s = Setup::new("notadir", "", "max_steps = 2");
    std::fs::write(s.out(), "a file").unwrap();
    let e = fails(&s.train_args(&[]));
    assert!(
        e.contains("key `output_dir`") && e.contains("not a folder"),
        "{e}"
    );
    assert_eq!(std::fs::read(s.out()).unwrap(), b"a file");
    // A run folder whose config.toml is the config being read: --overwrite would remove it and
    // a run rewrites it.
    let s = Setup::new("ownconfig", "", "max_steps = 2");
    succeeds(&s.train_args(&[]));
    let inside = s.out().join("config.toml");
    std::fs::write(&inside, config_text(".", "", "max_steps = 2")).unwrap();
    let text = std::fs::read(&inside).unwrap();
    for flags in [&["--overwrite"][..], &["--resume"]] {
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            inside.display().to_string(),
            "--set".into(),
            format!("model={}", s.dir.join("model").display()),
            "--set".into(),
            format!("data.train={}", s.dir.join("train.jsonl").display()),
            "--set".into(),
            format!("data.validation={}", s.dir.join("dev.jsonl").display()),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let e = fails(&args);
        assert!(
            e.contains("the config") && e.contains("never written over"),
            "{e}"
        );
        assert_eq!(std::fs::read(&inside).unwrap(), text);
    }
}

#[test]
fn a_run_folder_needs_resume_or_overwrite_and_overwrite_removes_only_the_runs_files() {
    let s = Setup::new("overwrite", "", "max_steps = 4\nsave_every = 2");
    succeeds(&s.train_args(&[]));
    let out = s.out();
    assert_eq!(checkpoint_steps(&out), vec![2, 4]);
    // The user's notes in the run folder and in its adapter folder.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::write(out.join("adapter/README.md"), "my adapter").unwrap();
    let before = snapshot(&out);
    let e = fails(&s.train_args(&[]));
    assert!(
        e.contains("already holds a run (checkpoints up to step 4)")
            && e.contains("--resume")
            && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(snapshot(&out), before);
    // --resume and --overwrite together make no sense.
    let r = ferrotune(&s.train_args(&["--resume", "--overwrite"]));
    // Usage errors exit 1 with one line (see bad_flags.rs), as every other error.
    assert_eq!(r.status.code(), Some(1), "clap refuses the pair");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.trim().lines().count() == 1
            && stderr.contains("--resume")
            && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(snapshot(&out), before);

    // Start again with fewer steps: the old checkpoints go, the user's files stay.
    succeeds(&s.train_args(&["--overwrite", "--set", "train.max_steps=3"]));
    assert_eq!(checkpoint_steps(&out), vec![2, 3]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("adapter/README.md")).unwrap(),
        "my adapter"
    );
    assert_eq!(logged_steps(&out), vec![1, 2, 3]);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 3);
}

#[test]
fn resume_of_a_finished_run_says_so_and_changes_nothing() {
    let s = Setup::new("finished", "", "max_steps = 3\neval_every = 2");
    succeeds(&s.train_args(&[]));
    let before = snapshot(&s.out());
    assert!(before.contains_key(Path::new("summary.json")));
    std::thread::sleep(Duration::from_millis(20)); // a rewrite would show in the mtimes
    let r = succeeds(&s.train_args(&["--resume"]));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("already finished: step 3 of 3") && stderr.contains("Nothing was changed"),
        "{stderr}"
    );
    assert_eq!(snapshot(&s.out()), before, "files or mtimes changed");
    // Raising max_steps continues it: not finished any more.
    let r = succeeds(&s.train_args(&["--resume", "--set", "train.max_steps=5"]));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("resuming from step 3 of 5"), "{stderr}");
    assert_eq!(logged_steps(&s.out()), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_run_folder_from_before_markers_is_recognised_by_its_checkpoint() {
    let s = Setup::new("legacy", "", "max_steps = 4");
    succeeds(&s.train_args(&["--set", "train.stop_after=2"]));
    // What an older ferrotune left: the same files without the marker.
    std::fs::remove_file(s.out().join(".ferrotune")).unwrap();
    let e = fails(&s.train_args(&[]));
    assert!(
        e.contains("already holds a run (checkpoints up to step 2)"),
        "{e}"
    );
    let r = succeeds(&s.train_args(&["--resume"]));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("resuming from step 2 of 4"), "{stderr}");
    assert!(
        s.out().join(".ferrotune").exists(),
        "the resumed run marks its folder"
    );
    assert_eq!(logged_steps(&s.out()), vec![1, 2, 3, 4]);
}

// ---- train: checkpoints that do not follow from the run ----------------------------------------

#[test]
fn a_checkpoint_state_that_does_not_fit_the_run_is_an_error_naming_the_file_and_field() {
    let s = Setup::new("badstate", "dropout = 0.1", "max_steps = 6\ngrad_accum = 2");
    succeeds(&s.train_args(&["--set", "train.stop_after=2"]));
    let state_path = s.out().join("checkpoints/step-2/trainer_state.json");
    let good: Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(good["rng"]["dropout_calls"], 4, "{good}");
    // (what, the JSON pointer of the value, its new value, the field the error names)
    let edits = [
        // Replaying a counter this large mask by mask would never end.
        (
            "huge dropout counter",
            "/rng/dropout_calls",
            Value::from(1u64 << 62),
            "field `rng.dropout_calls`",
        ),
        (
            "dropout counter past the micro-batches",
            "/rng/dropout_calls",
            Value::from(5),
            "field `rng.dropout_calls`",
        ),
        (
            "step past max_steps",
            "/step",
            Value::from(1000),
            "field `step`",
        ),
        (
            "cursor out of range",
            "/data_cursor/index",
            Value::from(1u64 << 40),
            "field `data_cursor`",
        ),
        (
            "cursor in another epoch",
            "/data_cursor/epoch",
            Value::from(3),
            "field `data_cursor`",
        ),
        (
            "another seed",
            "/rng/seed",
            Value::from(7),
            "field `rng.seed`",
        ),
        (
            "a negative step",
            "/step",
            Value::from(-1),
            "invalid trainer state",
        ),
    ];
    for (what, pointer, value, field) in edits {
        let mut v = good.clone();
        *v.pointer_mut(pointer).unwrap() = value;
        std::fs::write(&state_path, v.to_string()).unwrap();
        let args = s.train_args(&["--resume"]);
        let out = run_with_limit(&args, Duration::from_secs(120));
        let e = check_error(&format!("{what:?}"), &out);
        assert!(
            e.contains("checkpoints/step-2/trainer_state.json") && e.contains(field),
            "{what}: {e}"
        );
    }
    // The untouched state resumes.
    std::fs::write(&state_path, good.to_string()).unwrap();
    succeeds(&s.train_args(&["--resume"]));
    assert_eq!(logged_steps(&s.out()), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn an_absurd_batch_size_is_refused_naming_the_key() {
    // 2^63 - 1 rows: once the memory estimate wrapped around to a small number and approved.
    let s = Setup::new("absurd", "", "max_steps = 2");
    for set in [
        "train.batch_size=9223372036854775807",
        "train.batch_size=4294967296",
    ] {
        let e = fails(&s.train_args(&["--set", set]));
        assert!(e.contains("train.batch_size"), "{set}: {e}");
        assert!(!s.out().exists(), "{set}");
    }
    // In the file: the line is named too.
    std::fs::write(
        &s.config,
        config_text("out", "", "max_steps = 2")
            .replace("batch_size = 2", "batch_size = 9223372036854775807"),
    )
    .unwrap();
    let e = fails(&s.train_args(&[]));
    let line = std::fs::read_to_string(&s.config)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("batch_size = 9"))
        .unwrap()
        + 1;
    assert!(
        e.contains(&format!("run.toml: line {line}: key `train.batch_size`")),
        "line {line}: {e}"
    );
}

// ---- train: Ctrl-C --------------------------------------------------------------------------------

fn send(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill failed");
}

fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("the run did not end within {limit:?} of the signal");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn ctrl_c_writes_a_checkpoint_says_how_to_resume_and_the_resumed_run_matches() {
    // Dropout, gradient accumulation, evaluations: everything a resume restores. No periodic
    // checkpoint: the one that exists comes from the Ctrl-C.
    let max_steps = 400;
    let s = Setup::new(
        "ctrlc",
        "dropout = 0.1",
        &format!("max_steps = {max_steps}\ngrad_accum = 2\neval_every = 50\nlr = 5e-3\nwarmup_steps = 5\nseed = 9"),
    );
    let out_a = s.dir.join("a");
    let set_a = format!("output_dir={}", out_a.display());
    succeeds(&s.train_args(&["--set", &set_a]));

    let out_b = s.dir.join("b");
    let set_b = format!("output_dir={}", out_b.display());
    let child = bin()
        .args(s.train_args(&["--set", &set_b]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while logged_steps(&out_b).last().is_none_or(|&n| n < 3) {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(1));
    }
    send(&child, libc::SIGINT);
    let r = wait_with_limit(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{stderr}");
    let kept = checkpoint_steps(&out_b);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let step = kept[0];
    assert!((3..max_steps).contains(&step), "{kept:?}");
    // The checkpoint is at the step boundary where the run stopped: no step after it ran.
    assert_eq!(*logged_steps(&out_b).last().unwrap(), step as u64);
    assert!(!out_b.join("adapter").exists());
    let resume = format!(
        "ferrotune train --config {} --set {set_b} --resume",
        s.config.display()
    );
    assert!(
        stderr.contains(&format!("interrupted at step {step} of {max_steps}"))
            && stderr.contains(&format!("checkpoints/step-{step}"))
            && stderr.contains(&resume),
        "{stderr}"
    );
    assert!(!stderr.contains("error"), "{stderr}");

    let r = succeeds(&s.train_args(&["--set", &set_b, "--resume"]));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains(&format!("resuming from step {step} of {max_steps}")),
        "{stderr}"
    );
    let a = std::fs::read(out_a.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out_b.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(
        a == b,
        "the resumed adapter differs from the uninterrupted one"
    );
    assert_eq!(
        logged_steps(&out_b),
        (1..=max_steps as u64).collect::<Vec<_>>()
    );
}

#[test]
fn sigterm_stops_at_a_step_boundary_too() {
    let s = Setup::new("sigterm", "", "max_steps = 400");
    let child = bin()
        .args(s.train_args(&[]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while logged_steps(&s.out()).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
        std::thread::sleep(Duration::from_millis(1));
    }
    send(&child, libc::SIGTERM);
    let r = wait_with_limit(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(143), "{stderr}");
    let kept = checkpoint_steps(&s.out());
    assert_eq!(kept.len(), 1, "{kept:?}: {stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
}

/// `train --config FIFO`: the run blocks reading its config until the test writes it, so that
/// signals land at a known point. Returns the child and the FIFO's write end, opened once the
/// process has opened the read end (so its handlers are installed).
fn train_reading_a_fifo(s: &Setup) -> (Child, std::fs::File) {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = s.dir.join("fifo.toml");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success(), "mkfifo");
    let child = bin()
        .args(["train", "--config", fifo.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let writer = loop {
        // Opening the write end without blocking fails until a reader has it open.
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(_) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "the run never read its config"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    (child, writer)
}

#[test]
fn a_second_ctrl_c_quits_at_once() {
    let s = Setup::new("twice", "", "max_steps = 2");
    let (mut child, _writer) = train_reading_a_fifo(&s);
    send(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "one Ctrl-C ended the run at once"
    );
    send(&child, libc::SIGINT);
    // The config was never written: only the second Ctrl-C can end the run.
    let r = wait_with_limit(child, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("quitting at once"), "{stderr}");
    assert!(!s.out().exists());
}

#[test]
fn ctrl_c_before_training_starts_writes_nothing() {
    let s = Setup::new("early", "", "max_steps = 2");
    let (child, mut writer) = train_reading_a_fifo(&s);
    send(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(100));
    use std::io::Write;
    writer
        .write_all(config_text("out", "", "max_steps = 2").as_bytes())
        .unwrap();
    drop(writer);
    let r = wait_with_limit(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("error: interrupted before training started; nothing was written"),
        "{stderr}"
    );
    assert!(!s.out().exists(), "{stderr}");
}

// ---- train --dry-run --------------------------------------------------------------------------

#[test]
fn dry_run_checks_everything_and_writes_nothing() {
    let s = Setup::new("dry", "dropout = 0.05", "max_steps = 7");
    let before = snapshot(&s.dir);
    let r = succeeds(&s.train_args(&["--dry-run"]));
    let stdout = String::from_utf8_lossy(&r.stdout);
    for want in [
        "method lora",
        "trainable params",
        "memory estimate: weights",
        "train: 10 rows",
        "max_steps: 7",
        &format!("output_dir {}: would be created", s.out().display()),
        "dry run: nothing was written",
    ] {
        assert!(stdout.contains(want), "`{want}` missing: {stdout}");
    }
    assert_eq!(snapshot(&s.dir), before, "a dry run wrote");
    assert!(!s.out().exists());
    // What the run would refuse, the dry run refuses: a target the model does not have, a run
    // that cannot fit, a folder of the user's.
    let e = fails(&s.train_args(&["--dry-run", "--set", "lora.targets=[\"qkv_proj\"]"]));
    assert!(e.contains("lora.targets") && e.contains("qkv_proj"), "{e}");
    let e = fails(&s.train_args(&["--dry-run", "--set", "train.batch_size=10000000"]));
    assert!(
        e.contains("train.batch_size") && e.contains("needs about"),
        "{e}"
    );
    std::fs::create_dir_all(s.out()).unwrap();
    std::fs::write(s.out().join("x"), "mine").unwrap();
    let e = fails(&s.train_args(&["--dry-run"]));
    assert!(e.contains("not a ferrotune run folder"), "{e}");
    // On a stopped run it says where --resume would continue.
    std::fs::remove_dir_all(s.out()).unwrap();
    succeeds(&s.train_args(&["--set", "train.stop_after=3"]));
    let before = snapshot(&s.out());
    let r = succeeds(&s.train_args(&["--dry-run", "--resume"]));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("would resume the run from step 3 of 7"),
        "{stdout}"
    );
    assert_eq!(snapshot(&s.out()), before);
}

// ---- eval --output ------------------------------------------------------------------------------

fn eval_args(s: &Setup, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "eval",
        "--model",
        s.dir.join("model").to_str().unwrap(),
        "--data",
        s.dir.join("dev.jsonl").to_str().unwrap(),
        "--template",
        "{q} =",
        "--completion",
        " {a}",
        "--max-new-tokens",
        "2",
        "--output",
        output.to_str().unwrap(),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

#[test]
fn eval_output_refuses_an_existing_file_and_never_writes_over_its_inputs() {
    let s = Setup::new("evalout", "", "max_steps = 2");
    let data = s.dir.join("dev.jsonl");
    let data_text = std::fs::read(&data).unwrap();
    // The data file itself, directly, through `..`, and through a symbolic link: never, even
    // with --overwrite.
    std::os::unix::fs::symlink(&data, s.dir.join("link.jsonl")).unwrap();
    for out in [
        data.clone(),
        s.dir.join("model/../dev.jsonl"),
        s.dir.join("link.jsonl"),
    ] {
        let e = fails(&eval_args(&s, &out, &["--overwrite"]));
        assert!(e.contains("--output is the --data file"), "{e}");
        assert_eq!(std::fs::read(&data).unwrap(), data_text);
    }
    // A file of the model folder.
    let model_cfg = s.dir.join("model/config.json");
    let cfg_text = std::fs::read(&model_cfg).unwrap();
    let e = fails(&eval_args(&s, &model_cfg, &["--overwrite"]));
    assert!(e.contains("--output is inside the --model"), "{e}");
    assert_eq!(std::fs::read(&model_cfg).unwrap(), cfg_text);
    // An adapter's file.
    succeeds(&s.train_args(&[]));
    let adapter = s.out().join("adapter");
    let weights = adapter.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let mut args = eval_args(&s, &weights, &["--overwrite"]);
    args.extend(["--adapter".to_string(), adapter.display().to_string()]);
    let e = fails(&args);
    assert!(e.contains("inside an --adapter folder"), "{e}");
    assert_eq!(std::fs::read(&weights).unwrap(), bytes);

    // An existing file of the user's: only with --overwrite.
    let preds = s.dir.join("preds.jsonl");
    std::fs::write(&preds, "mine\n").unwrap();
    let e = fails(&eval_args(&s, &preds, &[]));
    assert!(
        e.contains("preds.jsonl") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&preds).unwrap(), "mine\n");
    succeeds(&eval_args(&s, &preds, &["--overwrite"]));
    let text = std::fs::read_to_string(&preds).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_ok()));
    // A new file needs no flag.
    let fresh = s.dir.join("new.jsonl");
    succeeds(&eval_args(&s, &fresh, &[]));
    assert!(fresh.exists());
}

// ---- convert --out, merge --out -------------------------------------------------------------------

fn convert_args(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "convert".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// A folder `convert` wrote: its marker lists exactly the files in it, and the model loads.
fn assert_complete_hf_folder(dir: &Path) {
    let marker: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(".ferrotune")).unwrap()).unwrap();
    let mut listed: Vec<String> = marker["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut present: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != ".ferrotune")
        .collect();
    present.sort();
    assert_eq!(listed, present);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(present.contains(&f.to_string()), "{f} missing: {present:?}");
    }
}

#[test]
fn convert_out_refuses_a_users_folder_and_the_input_and_appears_whole() {
    let dir = tmp("convert");
    let model = tiny_model(&dir);
    let model_before = snapshot(&model);
    // The input model's folder, or a folder holding it: never.
    for out in [model.clone(), dir.clone()] {
        let e = fails(&convert_args(&model, &out, &["--overwrite"]));
        assert!(e.contains("--out") && e.contains("the --model"), "{e}");
    }
    let e = fails(&convert_args(&model, Path::new("."), &["--overwrite"]));
    assert!(e.contains("current directory"), "{e}");
    assert_eq!(snapshot(&model), model_before);

    // A new folder: written whole, with the marker.
    let out = dir.join("hf");
    succeeds(&convert_args(&model, &out, &[]));
    assert_complete_hf_folder(&out);
    // Written by ferrotune and untouched since: replaced without a flag.
    succeeds(&convert_args(&model, &out, &["--out-dtype", "bf16"]));
    assert_complete_hf_folder(&out);
    // The user added a file: only with --overwrite, which replaces the folder.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = fails(&convert_args(&model, &out, &[]));
    assert!(e.contains("notes.txt") && e.contains("--overwrite"), "{e}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    // A folder of the user's: the same.
    let users = dir.join("users");
    std::fs::create_dir_all(&users).unwrap();
    std::fs::write(users.join("config.json"), "{}").unwrap();
    let e = fails(&convert_args(&model, &users, &[]));
    assert!(e.contains("not written by ferrotune"), "{e}");
    assert_eq!(
        std::fs::read_to_string(users.join("config.json")).unwrap(),
        "{}"
    );
    succeeds(&convert_args(&model, &users, &["--overwrite"]));
    assert_complete_hf_folder(&users);

    // A kill at any moment leaves the old folder or a complete new one, never half of one.
    let killed = dir.join("killed");
    for delay_ms in [0u64, 2, 5, 10, 20, 40, 80, 160] {
        let mut child = bin()
            .args(convert_args(&model, &killed, &["--overwrite"]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        if killed.exists() {
            assert_complete_hf_folder(&killed);
        }
    }
    // What the kills left beside it (a temporary folder) does not stop the next run.
    succeeds(&convert_args(&model, &killed, &["--overwrite"]));
    assert_complete_hf_folder(&killed);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
}

#[test]
fn merge_out_never_writes_into_its_inputs() {
    let s = Setup::new("merge", "", "max_steps = 2");
    succeeds(&s.train_args(&[]));
    let model = s.dir.join("model");
    let adapter = s.out().join("adapter");
    let (model_before, adapter_before) = (snapshot(&model), snapshot(&adapter));
    for out in [&adapter, &model, &s.out()] {
        let e = fails(&[
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--overwrite",
        ]);
        assert!(e.contains("--out") && e.contains("an input"), "{e}");
    }
    assert_eq!(snapshot(&model), model_before);
    assert_eq!(snapshot(&adapter), adapter_before);
    // --check-text is an input too: an --out folder holding it is refused even with --overwrite
    let holder = s.dir.join("holder");
    std::fs::create_dir_all(&holder).unwrap();
    let check = holder.join("check.txt");
    std::fs::write(&check, "The quick brown fox jumps over the lazy dog.").unwrap();
    let e = fails(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--check-text",
        check.to_str().unwrap(),
        "--out",
        holder.to_str().unwrap(),
        "--overwrite",
    ]);
    assert!(e.contains("--check-text") && e.contains("an input"), "{e}");
    assert!(check.is_file());
    let merged = s.dir.join("merged");
    merge(&model, &adapter, &merged);
    assert_complete_hf_folder(&merged);
}
