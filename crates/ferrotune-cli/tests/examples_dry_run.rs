//! Every training config under `examples/` parses and dry-runs as written: the data is read and
//! tokenized, the model loaded, the targets resolved and the memory estimated, and nothing is
//! written. The examples read the model that `scripts/fetch-models.sh` fetches into `.cache/`
//! and the data sets in `../shared/data` beside the repository; a missing one fails the test
//! naming what provides it. A hub model (`hf:...`) cannot be fetched here: a local fixture of
//! the same architecture stands in for it ([`HUB_STAND_INS`]), so the config, the data, the
//! task and the targets are still checked against a model of that family.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// Hub models the examples name, and the fixture (from the repository root) that stands in for
/// each in the dry run: same family and architecture, tiny random weights.
const HUB_STAND_INS: &[(&str, &str)] = &[
    // T5 v1.1 / FLAN-T5: gated-GELU, untied head.
    ("hf:google/flan-t5-base", "tests/fixtures/t5/t5-v1_1"),
];

/// Local models that only the reference environment makes (`scripts/convert-smollm2-hf.sh`:
/// transformers writes the shipped GGUF as an f32 HF folder), with the GGUF they are made from.
/// Where one is missing (CI has no reference environment), `ferrotune convert` writes the same
/// GGUF as an f32 HF folder into a temporary directory, which stands in for it.
const REFERENCE_STAND_INS: &[(&str, &str)] = &[(
    ".cache/models/smollm2-hf",
    ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)];

/// The stand-in folder for reference-made model `rel` (written once per test process).
fn reference_stand_in(rel: &str, gguf: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ferrotune-examples-stand-in-{}-{}",
        std::process::id(),
        rel.replace('/', "_")
    ));
    if !dir.join("config.json").exists() {
        let r = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["convert", "--model"])
            .arg(repo().join(gguf))
            .arg("--out")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "converting {gguf} to stand in for {rel}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    dir
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

/// Every file under `dir` with its size and modification time (empty if `dir` is absent).
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    fn walk(d: &Path, out: &mut BTreeMap<PathBuf, (u64, SystemTime)>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk(&p, out);
            }
            out.insert(p, (m.len(), m.modified().unwrap()));
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

#[test]
fn every_example_config_parses_and_dry_runs_without_writing() {
    let mut configs = Vec::new();
    toml_files(&repo().join("examples"), &mut configs);
    configs.sort();
    assert!(!configs.is_empty(), "no configs under examples/");
    for config in &configs {
        // The base config of `ferrotune compare` holds several methods' sections, which is
        // allowed when `--set method=...` picks one, as each compared run does: dry-run it so.
        let compare_base = config
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("-compare"));
        let set: Vec<String> = if compare_base {
            let raw: toml::Table =
                toml::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
            let method = raw.get("method").and_then(|m| m.as_str()).unwrap_or("lora");
            vec![format!("method=\"{method}\"")]
        } else {
            Vec::new()
        };
        let c = ferrotune::train::load_config(config, &set)
            .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let model = Path::new(&c.config.model);
        let stand_in = REFERENCE_STAND_INS
            .iter()
            .find(|(rel, _)| model.ends_with(rel) && !model.exists())
            .map(|(rel, gguf)| reference_stand_in(rel, gguf));
        assert!(
            c.config.model.starts_with("hf:") || model.exists() || stand_in.is_some(),
            "{}: the model {} is missing: run scripts/fetch-models.sh",
            config.display(),
            model.display()
        );
        let d = &c.config.data;
        let task_files = d
            .tasks
            .iter()
            .flat_map(|t| std::iter::once(&t.train).chain(&t.validation));
        for p in [&d.train, &d.validation, &d.test]
            .into_iter()
            .flatten()
            .chain(task_files)
        {
            let p = c.base_dir.join(p);
            assert!(
                p.exists(),
                "{}: {} is missing: the examples read the data sets in ../shared/data beside the repository",
                config.display(),
                p.display()
            );
        }
        let out = &c.config.output_dir;
        let before = listing(out);
        let existed = out.exists();
        let mut args = vec![
            "train".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--dry-run".into(),
        ];
        for kv in &set {
            args.push("--set".into());
            args.push(kv.clone());
        }
        // A checkout where the example already ran: the dry run of continuing it.
        if existed {
            args.push("--resume".into());
        }
        if c.config.model.starts_with("hf:") {
            let (_, local) = HUB_STAND_INS
                .iter()
                .find(|(hub, _)| *hub == c.config.model)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: no stand-in for {} in HUB_STAND_INS (add a fixture of its architecture)",
                        config.display(),
                        c.config.model
                    )
                });
            args.push("--set".into());
            args.push(format!("model={}", repo().join(local).display()));
        }
        if let Some(dir) = &stand_in {
            args.push("--set".into());
            args.push(format!("model={}", dir.display()));
        }
        let r = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(&args)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr),
        );
        assert!(r.status.success(), "{args:?} failed: {stderr}");
        let finished = stderr.contains("already finished");
        if !finished {
            for want in [
                "memory estimate: weights",
                "trainable params",
                "train: ",
                "validation: ",
                "dry run: nothing was written",
            ] {
                assert!(
                    stdout.contains(want),
                    "{}: `{want}` missing from the dry run: {stdout}",
                    config.display()
                );
            }
        }
        assert_eq!(
            out.exists(),
            existed,
            "{}: the dry run created {}",
            config.display(),
            out.display()
        );
        assert_eq!(
            listing(out),
            before,
            "{}: the dry run wrote into {}",
            config.display(),
            out.display()
        );
        if let Some(dir) = &stand_in {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
