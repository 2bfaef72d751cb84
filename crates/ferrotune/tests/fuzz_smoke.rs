//! The fuzz targets of `ferrotune::fuzzing`, run briefly in `cargo test`:
//! - every target on its seeds (each must be accepted), then on a fixed number of deterministic
//!   mutants of them (`FERROTUNE_FUZZ_ITERS` raises the count);
//! - every file of `tests/fuzz/regressions/<target>/` (inputs that once crashed) is replayed.
//!
//! Inputs run in a child process (this test binary again, test `fuzz_child`), so that an abort
//! (e.g. an allocation the child refuses: over 2 GiB, as libFuzzer's default limit) or a hang
//! (no progress for a minute) is caught like a panic. The parent names the target, the input's
//! index and the file it saved the input to, then resumes after it, so one run lists every crash.
//!
//! Inputs under `tests/fuzz/regressions/<target>/pending/` crash in code another change owns;
//! they are skipped (and listed) when met, and reported as fixed once they no longer crash.
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrotune::fuzzing::{self, Target, TARGETS};

/// Refuses single allocations over `ALLOC_LIMIT` (set in the child only): the process then
/// aborts with "memory allocation of N bytes failed", which the parent reports as a crash.
struct LimitedAlloc;

static ALLOC_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: LimitedAlloc = LimitedAlloc;

const ALLOC_LIMIT_BYTES: usize = 2 << 30;
/// An input that runs this long without finishing is a hang.
const HANG_SECS: u64 = 60;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn regressions_dir() -> PathBuf {
    repo().join("tests/fuzz/regressions")
}

// ------------------------------------------------------------------------ targets for self-tests

fn on_boom(data: &[u8], what: fn()) -> bool {
    if data.windows(4).any(|w| w == b"boom") {
        what();
    }
    true
}
fn selftest_panic(d: &[u8]) -> bool {
    on_boom(d, || panic!("deliberate panic"))
}
fn selftest_abort(d: &[u8]) -> bool {
    on_boom(d, || std::process::abort())
}
fn selftest_alloc(d: &[u8]) -> bool {
    on_boom(d, || {
        let v = vec![1u8; 1 << 40];
        std::hint::black_box(&v);
    })
}
fn selftest_hang(d: &[u8]) -> bool {
    on_boom(d, || loop {
        std::thread::sleep(Duration::from_millis(50));
    })
}
fn selftest_seeds() -> Vec<Vec<u8>> {
    vec![b"boom".to_vec(), b"fine".to_vec()]
}
fn no_fields(_: &[u8]) -> Vec<fuzzing::Field> {
    Vec::new()
}

const SELFTEST: &[Target] = &[
    Target {
        name: "selftest_panic",
        run: selftest_panic,
        seeds: selftest_seeds,
        fields: no_fields,
        smoke_iterations: 40,
    },
    Target {
        name: "selftest_abort",
        run: selftest_abort,
        seeds: selftest_seeds,
        fields: no_fields,
        smoke_iterations: 0,
    },
    Target {
        name: "selftest_alloc",
        run: selftest_alloc,
        seeds: selftest_seeds,
        fields: no_fields,
        smoke_iterations: 0,
    },
    Target {
        name: "selftest_hang",
        run: selftest_hang,
        seeds: selftest_seeds,
        fields: no_fields,
        smoke_iterations: 0,
    },
];

fn lookup(name: &str) -> &'static Target {
    TARGETS
        .iter()
        .chain(SELFTEST)
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no fuzz target `{name}`"))
}

// ------------------------------------------------------------------------ the child

/// The child half: runs the inputs the parent's environment names, writing the index of each
/// before running it (`at I ACCEPTED`) and `done ACCEPTED` at the end.
#[test]
#[ignore = "run by the other tests of this file, in a child process"]
fn fuzz_child() {
    let Ok(name) = std::env::var("FUZZ_CHILD_TARGET") else {
        panic!("fuzz_child is started by the fuzz smoke tests: run `cargo test --release -p ferrotune --test fuzz_smoke`");
    };
    let target = lookup(&name);
    let progress = PathBuf::from(std::env::var("FUZZ_CHILD_PROGRESS").unwrap());
    let from: usize = std::env::var("FUZZ_CHILD_FROM").unwrap().parse().unwrap();
    let files: Vec<PathBuf> = std::env::var("FUZZ_CHILD_FILES")
        .map(|s| {
            s.split('\n')
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let to: usize = match std::env::var("FUZZ_CHILD_TO") {
        Ok(n) => n.parse().unwrap(),
        Err(_) => files.len(),
    };
    let seeds = if files.is_empty() {
        (target.seeds)()
    } else {
        Vec::new()
    };
    ALLOC_LIMIT.store(ALLOC_LIMIT_BYTES, Ordering::Relaxed);
    let mut accepted = 0;
    for i in from..to {
        std::fs::write(&progress, format!("at {i} {accepted}")).unwrap();
        let input = if files.is_empty() {
            fuzzing::smoke_input(target, &seeds, i)
        } else {
            std::fs::read(&files[i]).unwrap()
        };
        if (target.run)(&input) {
            accepted += 1;
        }
    }
    std::fs::write(&progress, format!("done {accepted}")).unwrap();
}

// ------------------------------------------------------------------------ the parent

enum Inputs {
    /// Mutants 0..n of the target's seeds.
    Smoke(usize),
    /// These files.
    Files(Vec<PathBuf>),
}

#[derive(Debug)]
struct Crash {
    index: usize,
    /// Where the input is: the saved copy of a mutant, or the replayed file.
    input: PathBuf,
    /// Panic message, abort reason or "hang", from the child's output.
    why: String,
}

#[derive(Debug, Default)]
struct Report {
    ran: usize,
    accepted: usize,
    crashes: Vec<Crash>,
    /// Crashes whose input is a file of the target's `pending/` folder.
    pending: Vec<Crash>,
}

fn pending_inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = regressions_dir().join(target).join("pending");
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .map(|p| {
                    let b = std::fs::read(&p).unwrap();
                    (p, b)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The interesting lines of a dead child's output: the panic message or abort reason.
fn why(output: &str, status: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| {
            l.contains("panicked at")
                || l.contains("memory allocation")
                || l.contains("overflow")
                || l.contains("fatal runtime")
        })
        .collect();
    let mut s = lines.join(" | ");
    if let Some(i) = output.lines().position(|l| l.contains("panicked at")) {
        if let Some(msg) = output.lines().nth(i + 1) {
            s = format!("{s}: {msg}");
        }
    }
    if s.is_empty() {
        s = output.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    }
    format!("{status}: {s}")
}

/// Run `inputs` of `target` in child processes, restarting after each crash.
fn run_job(target: &Target, inputs: Inputs, hang: Duration) -> Report {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-smoke")
        .join(target.name);
    std::fs::create_dir_all(&work).unwrap();
    // Several tests may run jobs of one target at once: each job has its own files.
    static JOBS: AtomicUsize = AtomicUsize::new(0);
    let job = format!(
        "{}-{}",
        std::process::id(),
        JOBS.fetch_add(1, Ordering::Relaxed)
    );
    let progress = work.join(format!("progress-{job}"));
    let log = work.join(format!("child-{job}.log"));
    let (total, files) = match &inputs {
        Inputs::Smoke(n) => (*n, Vec::new()),
        Inputs::Files(f) => (f.len(), f.clone()),
    };
    let seeds = match &inputs {
        Inputs::Smoke(_) => (target.seeds)(),
        Inputs::Files(_) => Vec::new(),
    };
    let pending = pending_inputs(target.name);
    let mut report = Report::default();
    let mut from = 0;
    while from < total {
        let _ = std::fs::remove_file(&progress);
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "fuzz_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FUZZ_CHILD_TARGET", target.name)
        .env("FUZZ_CHILD_PROGRESS", &progress)
        .env("FUZZ_CHILD_FROM", from.to_string())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
        match &inputs {
            Inputs::Smoke(n) => {
                cmd.env("FUZZ_CHILD_TO", n.to_string());
            }
            Inputs::Files(f) => {
                let list: Vec<String> = f.iter().map(|p| p.display().to_string()).collect();
                cmd.env("FUZZ_CHILD_FILES", list.join("\n"));
            }
        }
        let mut child = cmd.spawn().expect("starting the fuzz child process");
        let mut last = String::new();
        let mut since = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break format!("{s}");
            }
            let now = std::fs::read_to_string(&progress).unwrap_or_default();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > hang {
                let _ = child.kill();
                let _ = child.wait();
                break format!("hang: no progress for {} s", hang.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let state = std::fs::read_to_string(&progress).unwrap_or_default();
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        let words: Vec<&str> = state.split_whitespace().collect();
        match words.as_slice() {
            ["done", accepted] => {
                report.accepted += accepted.parse::<usize>().unwrap();
                report.ran += total - from;
                break;
            }
            ["at", i, accepted] => {
                let i: usize = i.parse().unwrap();
                report.accepted += accepted.parse::<usize>().unwrap();
                report.ran += i + 1 - from;
                let bytes = match &inputs {
                    Inputs::Smoke(_) => fuzzing::smoke_input(target, &seeds, i),
                    Inputs::Files(_) => std::fs::read(&files[i]).unwrap(),
                };
                let input = match &inputs {
                    Inputs::Files(_) => files[i].clone(),
                    Inputs::Smoke(_) => {
                        let p = work.join(format!("crash-{i:05}"));
                        std::fs::write(&p, &bytes).unwrap();
                        p
                    }
                };
                let crash = Crash {
                    index: i,
                    input,
                    why: why(&output, &status),
                };
                if pending.iter().any(|(_, b)| *b == bytes) {
                    report.pending.push(crash);
                } else {
                    report.crashes.push(crash);
                }
                from = i + 1;
            }
            _ => panic!(
                "{}: the fuzz child died before running an input ({status}):\n{output}",
                target.name
            ),
        }
    }
    let _ = std::fs::remove_file(&progress);
    report
}

fn iterations(target: &Target) -> usize {
    match std::env::var("FERROTUNE_FUZZ_ITERS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("FERROTUNE_FUZZ_ITERS={n:?} is not a number")),
        Err(_) => target.smoke_iterations,
    }
}

fn crash_list(target: &str, crashes: &[Crash]) -> String {
    crashes
        .iter()
        .map(|c| {
            format!(
                "  {target} input {} ({}): {}",
                c.index,
                c.input.display(),
                c.why
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Seeds accepted in-process, then the smoke run; fails listing every crash.
fn smoke(name: &str) {
    let target = lookup(name);
    let seeds = (target.seeds)();
    assert!(!seeds.is_empty(), "{name}: no seeds");
    for (i, s) in seeds.iter().enumerate() {
        assert!(
            (target.run)(s),
            "{name}: seed {i} is not accepted; mutants of it would only test error paths"
        );
    }
    let n = iterations(target);
    let r = run_job(target, Inputs::Smoke(n), Duration::from_secs(HANG_SECS));
    eprintln!(
        "{name}: {} inputs, {} accepted, {} crashes, {} pending",
        r.ran,
        r.accepted,
        r.crashes.len(),
        r.pending.len()
    );
    if !r.pending.is_empty() {
        eprintln!(
            "{name}: pending crashes (tests/fuzz/regressions/{name}/pending/):\n{}",
            crash_list(name, &r.pending)
        );
    }
    assert_eq!(r.ran, n);
    assert!(
        r.crashes.is_empty(),
        "{name}: {} of {n} inputs crashed (each saved; to keep one as a regression test, copy \
         it to tests/fuzz/regressions/{name}/):\n{}",
        r.crashes.len(),
        crash_list(name, &r.crashes)
    );
}

#[test]
fn gguf_header() {
    smoke("gguf_header");
}

#[test]
fn gguf_tokenizer() {
    smoke("gguf_tokenizer");
}

#[test]
fn gguf_model() {
    smoke("gguf_model");
}

#[test]
fn hf_model() {
    smoke("hf_model");
}

#[test]
fn hf_tokenizer() {
    smoke("hf_tokenizer");
}

#[test]
fn train_config() {
    smoke("train_config");
}

#[test]
fn data_rows() {
    smoke("data_rows");
}

#[test]
fn every_target_has_a_smoke_test() {
    let src = std::fs::read_to_string(file!()).unwrap_or_else(|_| {
        std::fs::read_to_string(repo().join("crates/ferrotune/tests/fuzz_smoke.rs")).unwrap()
    });
    for t in TARGETS {
        assert!(
            src.contains(&format!("smoke(\"{}\")", t.name)),
            "no smoke test for target {}",
            t.name
        );
    }
}

/// Every regression input is replayed and must not crash; pending ones are run too, to say
/// which have been fixed.
#[test]
fn regressions() {
    let dir = regressions_dir();
    let mut replayed = 0;
    let mut failures = Vec::new();
    let mut fixed = Vec::new();
    let mut still_pending = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for sub in names {
        let name = sub.file_name().unwrap().to_string_lossy().into_owned();
        let target = TARGETS
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{}: no fuzz target named `{name}`", sub.display()));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if !files.is_empty() {
            replayed += files.len();
            let r = run_job(target, Inputs::Files(files), Duration::from_secs(HANG_SECS));
            failures.extend(
                r.crashes
                    .iter()
                    .chain(&r.pending)
                    .map(|c| format!("  {}: {}", c.input.display(), c.why)),
            );
        }
        let pending: Vec<PathBuf> = pending_inputs(&name).into_iter().map(|p| p.0).collect();
        if !pending.is_empty() {
            let r = run_job(
                target,
                Inputs::Files(pending.clone()),
                Duration::from_secs(HANG_SECS),
            );
            let crashed: HashSet<usize> = r.crashes.iter().map(|c| c.index).collect();
            for (i, p) in pending.iter().enumerate() {
                if crashed.contains(&i) {
                    still_pending.push(p.display().to_string());
                } else {
                    fixed.push(p.display().to_string());
                }
            }
        }
    }
    if !still_pending.is_empty() {
        eprintln!(
            "pending regressions (crash in code another change fixes):\n  {}",
            still_pending.join("\n  ")
        );
    }
    if !fixed.is_empty() {
        eprintln!(
            "pending regressions that no longer crash (move them up out of pending/):\n  {}",
            fixed.join("\n  ")
        );
    }
    assert!(replayed > 0, "no regression inputs under {}", dir.display());
    assert!(
        failures.is_empty(),
        "regression inputs crash again:\n{}",
        failures.join("\n")
    );
}

// ------------------------------------------------------------------------ the harness can fail

fn boom_files(tag: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("fuzz-smoke")
        .join(format!("selftest-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    [&b"fine"[..], b"boom", b"also fine", b"boom again"]
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let p = dir.join(format!("{i}"));
            std::fs::write(&p, b).unwrap();
            p
        })
        .collect()
}

/// The harness reports each crashing input (and only those) with its cause, and goes on after it.
fn assert_caught(name: &str, hang: Duration, cause: &str) {
    let files = boom_files(name);
    let r = run_job(lookup(name), Inputs::Files(files.clone()), hang);
    let idx: Vec<usize> = r.crashes.iter().map(|c| c.index).collect();
    assert_eq!(idx, vec![1, 3], "{name}: {r:?}");
    assert_eq!(r.ran, 4, "{name}: {r:?}");
    assert_eq!(r.accepted, 2, "{name}: {r:?}");
    for c in &r.crashes {
        assert_eq!(c.input, files[c.index]);
        assert!(c.why.contains(cause), "{name}: {:?} lacks {cause:?}", c.why);
    }
}

#[test]
fn harness_catches_a_panic() {
    assert_caught(
        "selftest_panic",
        Duration::from_secs(HANG_SECS),
        "deliberate panic",
    );
}

#[test]
fn harness_catches_an_abort() {
    assert_caught("selftest_abort", Duration::from_secs(HANG_SECS), "signal");
}

#[test]
fn harness_catches_a_huge_allocation() {
    assert_caught(
        "selftest_alloc",
        Duration::from_secs(HANG_SECS),
        "memory allocation of 1099511627776 bytes failed",
    );
}

#[test]
fn harness_catches_a_hang() {
    assert_caught("selftest_hang", Duration::from_secs(2), "hang");
}

#[test]
fn smoke_run_saves_crashing_mutants() {
    let t = lookup("selftest_panic");
    let r = run_job(
        t,
        Inputs::Smoke(t.smoke_iterations),
        Duration::from_secs(HANG_SECS),
    );
    assert_eq!(r.ran, t.smoke_iterations);
    assert!(!r.crashes.is_empty() && r.accepted > 0, "{r:?}");
    for c in &r.crashes {
        let saved = std::fs::read(&c.input).unwrap();
        let seeds = (t.seeds)();
        assert_eq!(saved, fuzzing::smoke_input(t, &seeds, c.index));
        assert!(saved.windows(4).any(|w| w == b"boom"));
        assert!(Path::new(&c.input).starts_with(env!("CARGO_TARGET_TMPDIR")));
    }
}
