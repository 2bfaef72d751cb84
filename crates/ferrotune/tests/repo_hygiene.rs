//! Repository hygiene that a fresh clone on another machine depends on:
//! - no tracked text file names an absolute path of one machine (a workspace, a home folder, a
//!   virtualenv): commands say `.venv/bin/python` or `$PYTHON`, tests find their inputs relative
//!   to the repository;
//! - the reference environment, the model cache and build outputs stay out of git;
//! - no test skips itself when its input is missing (it fails and names the command that creates
//!   the input instead).
//!
//! Runs `git ls-files` in the repository, so it needs git and a checkout (CI has both).
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn git(args: &[&str]) -> std::process::Output {
    Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("git {}: {e} (this test needs git on PATH)", args.join(" ")))
}

fn tracked_files() -> Vec<String> {
    let out = git(&["ls-files", "-z"]);
    assert!(
        out.status.success(),
        "git ls-files failed ({}): this test needs a git checkout of the repository",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let files: Vec<String> = out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f == "Cargo.toml"),
        "git ls-files listed no Cargo.toml: not the ferrotune repository?"
    );
    files
}

/// A tracked file's text, or None for a binary file (a NUL byte, or not UTF-8) and for a tracked
/// file deleted from the working tree (it is on its way out of the repository).
fn text_of(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// First path segments that place a path on one machine: home folders, workspaces, mounts.
/// (System paths that are the same everywhere, such as /usr/bin/env, /proc/self/status or
/// /dev/null, are not listed.)
const MACHINE_ROOTS: &[&str] = &[
    "home",
    "Users",
    "root",
    "work",
    "workspace",
    "workspaces",
    "mnt",
    "media",
    "srv",
    "opt",
    "scratch",
    "nfs",
    "Volumes",
    "private",
];

/// Characters after which a `/` starts a path (rather than continuing a relative path such as
/// `$root/.venv` or `a/b`, or a URL's path).
fn starts_a_path(prev: Option<char>) -> bool {
    match prev {
        None => true,
        Some(c) => c.is_whitespace() || "\"'`([{<>=,:;|".contains(c),
    }
}

/// The absolute paths of one machine in `text`, with their 1-based line numbers.
fn machine_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        for i in 0..chars.len() {
            // Windows: a drive letter, then one of the home or workspace folders.
            if i + 2 < chars.len()
                && chars[i].is_ascii_alphabetic()
                && chars[i + 1] == ':'
                && (chars[i + 2] == '\\' || chars[i + 2] == '/')
                && starts_a_path(i.checked_sub(1).map(|j| chars[j]))
            {
                let rest: String = chars[i + 3..].iter().collect();
                let rest = rest.trim_start_matches(['\\', '/']);
                if ["Users", "home", "work"].iter().any(|r| {
                    rest.starts_with(&format!("{r}\\")) || rest.starts_with(&format!("{r}/"))
                }) {
                    found.push((n + 1, path_at(&chars, i)));
                }
            }
            if chars[i] != '/' || !starts_a_path(i.checked_sub(1).map(|j| chars[j])) {
                continue;
            }
            // `//` starts a comment or a URL's authority, not a path.
            if chars.get(i + 1) == Some(&'/') {
                continue;
            }
            let path = path_at(&chars, i);
            let segments: Vec<&str> = path.split('/').skip(1).collect();
            let on_machine_root = segments.len() >= 2
                && !segments[1].is_empty()
                && MACHINE_ROOTS.contains(&segments[0]);
            // A virtualenv or site-packages below some absolute folder (not the first segment:
            // `/.venv/` in .gitignore means the repository's own folder).
            let in_python_env = segments.iter().skip(1).any(|s| {
                *s == "site-packages" || s.ends_with("venv") || *s == "envs" || *s == "conda"
            });
            if on_machine_root || in_python_env {
                found.push((n + 1, path));
            }
        }
    }
    found
}

/// The path that starts at `chars[i]`: up to whitespace, a quote or a closing bracket.
fn path_at(chars: &[char], i: usize) -> String {
    chars[i..]
        .iter()
        .take_while(|c| !c.is_whitespace() && !"\"'`)]}<>,;|".contains(**c))
        .collect()
}

#[test]
fn machine_path_scanner_finds_what_it_must_and_only_that() {
    // Built with format! so that this file itself holds none of the paths it tests.
    let must = [
        format!("python at /{}/alice/venv/bin/python", "home"),
        format!("`/{}/main/.cache/models/x.gguf`", "work"),
        format!("PathBuf::from(\"/{}/shared/data\")", "work"),
        format!("PY=/{}/cache/venv/bin/python", "work"),
        format!("see /{}/bob/src", "Users"),
        format!("/{}/.cargo/bin/cargo", "root"),
        format!("{}:\\{}\\carol\\repo", "C", "Users"),
        format!("/usr/local/lib/python3.11/{}/torch", "site-packages"),
        format!("/usr/local/my{}/bin/python", "venv"),
    ];
    for text in &must {
        assert_eq!(machine_paths(text).len(), 1, "not found in {text:?}");
    }
    let fine = [
        "/.venv/",
        ".venv/bin/python bench/decode_vs_llamacpp.py",
        "\"$root/.venv/bin/python\"",
        "#!/usr/bin/env bash",
        "open(\"/proc/self/status\")",
        "> /dev/null",
        "https://github.com/org/repo/work/x",
        "// a comment about /tmp",
        "../shared/data/dialogsum",
        "crates/ferrotune/tests/work/x.rs",
        "a ratio 1/2 and /work alone",
        "$FERROTUNE_CACHE/models/smollm2",
    ];
    for text in fine {
        assert!(
            machine_paths(text).is_empty(),
            "false positive in {text:?}: {:?}",
            machine_paths(text)
        );
    }
    assert_eq!(
        machine_paths(&format!("ok\nstill ok\nx /{}/me/y", "home")),
        vec![(3, format!("/{}/me/y", "home"))]
    );
}

/// No tracked text file names an absolute path of one machine.
#[test]
fn no_tracked_file_holds_an_absolute_machine_path() {
    let root = repo();
    let mut offenders = Vec::new();
    let mut scanned = 0;
    for file in tracked_files() {
        let Some(text) = text_of(&root.join(&file)) else {
            continue;
        };
        scanned += 1;
        for (line, path) in machine_paths(&text) {
            offenders.push(format!("{file}:{line}: {path}"));
        }
    }
    assert!(scanned > 50, "only {scanned} text files scanned");
    assert!(
        offenders.is_empty(),
        "{} absolute paths of one machine in tracked files (use a path relative to the \
         repository, `.venv/bin/python` or `$PYTHON`):\n{}",
        offenders.len(),
        offenders.join("\n")
    );
}

/// The reference environment, the model cache and build outputs are git-ignored, so a fresh
/// clone never carries one machine's copies.
#[test]
fn environment_cache_and_builds_are_ignored() {
    // `.cache` and `.venv` may be symlinks to shared copies, so their own names are checked.
    for path in [".venv", ".cache", "target/release/x"] {
        let out = git(&["check-ignore", "-q", "--no-index", path]);
        assert!(
            out.status.success(),
            "{path} is not git-ignored (.gitignore)"
        );
    }
}

/// Lines (1-based) of `text` that announce a skipped test: the word inside a string literal
/// (an odd number of quotes before it), not in a comment about skipping something else.
fn skip_notes(text: &str) -> Vec<usize> {
    let word = ["skip", "ping"].concat();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lower = line.to_lowercase();
        if lower
            .match_indices(&word)
            .any(|(at, _)| lower[..at].matches('"').count() % 2 == 1)
        {
            lines.push(n + 1);
        }
    }
    lines
}

#[test]
fn skip_note_finder_finds_what_it_must_and_only_that() {
    let word = ["Skip", "ping"].concat();
    let text = format!(
        "// {word} blank lines is fine here\n\
         println!(\"note: {word}, the model is absent\");\n\
         let x = \"a\"; // {word} x\n\
         \"{word} from_real_gguf_tensor: {{}} not found\",\n"
    );
    assert_eq!(skip_notes(&text), vec![2, 4]);
}

/// No test skips itself: a test whose input is missing fails and names the command that creates
/// it (scripts/fetch-models.sh for the models), or its input is a committed fixture.
#[test]
fn no_test_skips_when_its_input_is_missing() {
    let root = repo();
    let mut offenders = Vec::new();
    for file in tracked_files() {
        let is_test_code = file.ends_with(".rs")
            && (file.contains("/tests/")
                || file.ends_with("tests.rs")
                || file.ends_with("testutil.rs"));
        if !is_test_code {
            continue;
        }
        let text = text_of(&root.join(&file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for n in skip_notes(&text) {
            offenders.push(format!("{file}:{n}: {}", lines[n - 1].trim()));
        }
    }
    assert!(
        offenders.is_empty(),
        "tests that skip instead of failing (fail and name the command that creates the \
         input):\n{}",
        offenders.join("\n")
    );
}
