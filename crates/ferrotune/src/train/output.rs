//! The run folder (`output_dir`): ferrotune creates it (or takes an empty one) and marks it as
//! a run with [`crate::fsutil::MARKER_FILE`]. A folder that holds anything else is never used;
//! a run folder that already holds a run needs `--resume` (continue it) or `--overwrite` (start
//! again, removing only the files a run writes).
use super::{checkpoint, report, ADAPTER_DIR, CONFIG_FILE, LABELS_FILE, MODEL_DIR, SUMMARY_FILE};
use crate::fsutil::{self, DirState, Input, Marker, MARKER_FILE};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The marker kind of run folders.
pub const RUN_KIND: &str = "run";

/// What `output_dir` is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunFolder {
    /// Absent, empty, or a run folder holding only its marker: a run starts there from scratch.
    Fresh,
    /// A run folder with files of a run in it. `legacy`: written before run folders had a
    /// marker, recognised by a complete checkpoint.
    Run { legacy: bool },
}

/// The entries a run writes directly under `output_dir` (besides the marker).
const RUN_ENTRIES: &[&str] = &[
    CONFIG_FILE,
    SUMMARY_FILE,
    report::METRICS_FILE,
    report::PLOT_FILE,
    ADAPTER_DIR,
    MODEL_DIR,
    "checkpoints",
];

/// The paths a run writes or, with `--overwrite`, removes.
pub fn run_outputs(out: &Path) -> Vec<PathBuf> {
    RUN_ENTRIES
        .iter()
        .map(|e| out.join(e))
        .chain([out.join(MARKER_FILE)])
        .collect()
}

/// Classify `out`; `blame` turns a refusal into the config's error (file, line, `output_dir`).
pub fn inspect(out: &Path, blame: impl Fn(String) -> Error) -> Result<RunFolder> {
    match fsutil::dir_state(out)? {
        DirState::Missing | DirState::Empty => Ok(RunFolder::Fresh),
        DirState::NotADir => Err(blame(format!(
            "{} exists and is not a folder",
            out.display()
        ))),
        DirState::Holds { entries, marker } => match marker {
            Some(m) if m.kind == RUN_KIND => {
                if entries.iter().all(|e| e == MARKER_FILE) {
                    Ok(RunFolder::Fresh)
                } else {
                    Ok(RunFolder::Run { legacy: false })
                }
            }
            _ if is_legacy_run(out) => Ok(RunFolder::Run { legacy: true }),
            _ => {
                let shown = entries
                    .iter()
                    .take(3)
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let more = if entries.len() > 3 { ", ..." } else { "" };
                Err(blame(format!(
                    "{} is not empty and is not a ferrotune run folder (it holds {shown}{more}); nothing in it is written over: choose a new or empty folder",
                    out.display()
                )))
            }
        },
    }
}

/// A run folder from before markers: it holds a complete checkpoint whose state parses.
fn is_legacy_run(out: &Path) -> bool {
    checkpoint::latest(out)
        .ok()
        .flatten()
        .is_some_and(|(_, dir)| checkpoint::read_state(&dir).is_ok())
}

/// Refuse a run whose inputs (config, data, model) are files the run writes or removes.
pub fn check_inputs(out: &Path, inputs: &[Input]) -> Result<()> {
    for p in run_outputs(out) {
        for i in inputs {
            // An input inside the run folder is fine unless the run writes that very path (or
            // a folder holding it).
            if fsutil::resolve(&i.path).starts_with(fsutil::resolve(&p)) {
                return Err(Error::file(
                    &i.path,
                    format!(
                        "{} is a file the run writes in output_dir {} ({}); it is never written over: move it, or choose another output_dir",
                        i.what,
                        out.display(),
                        p.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Create `out` (or take the empty folder) and mark it as a run folder.
pub fn create(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    if fsutil::read_marker(out).is_none_or(|m| m.kind != RUN_KIND) {
        fsutil::write_marker(out, &Marker::new(RUN_KIND, Vec::new()))?;
    }
    Ok(())
}

/// `--overwrite`: remove what a run wrote in `out` and nothing else: its files, the adapter's
/// files, the checkpoints, the temporary files a kill left behind. The marker stays; a folder
/// that still holds something of the user's stays too.
pub fn remove_run_files(out: &Path) -> Result<()> {
    let rm = |p: &Path| -> Result<()> {
        match std::fs::symlink_metadata(p) {
            Err(_) => Ok(()),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| Error::file(p, e)),
            Ok(_) => std::fs::remove_file(p).map_err(|e| Error::file(p, e)),
        }
    };
    // Remove `dir` if nothing is left in it.
    let rmdir_if_empty = |dir: &Path| -> Result<()> {
        if fsutil::dir_state(dir)? == DirState::Empty {
            std::fs::remove_dir(dir).map_err(|e| Error::file(dir, e))?;
        }
        Ok(())
    };
    // Files written atomically leave `NAME.tmp` or `.NAME.PID.tmp` when a kill catches them.
    let with_temporaries = |dir: &Path, names: &[&str]| -> Result<()> {
        for n in names {
            rm(&dir.join(n))?;
        }
        if !dir.is_dir() {
            return Ok(());
        }
        for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
            let e = e.map_err(|e| Error::file(dir, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            let ours = names.iter().any(|n| {
                name == format!("{n}.tmp")
                    || (name.starts_with(&format!(".{n}.")) && name.ends_with(".tmp"))
            });
            if ours {
                rm(&e.path())?;
            }
        }
        Ok(())
    };
    with_temporaries(
        out,
        &[
            CONFIG_FILE,
            SUMMARY_FILE,
            report::METRICS_FILE,
            report::PLOT_FILE,
        ],
    )?;
    let adapter = out.join(ADAPTER_DIR);
    if adapter.is_dir() {
        with_temporaries(
            &adapter,
            &[
                crate::peft::format::WEIGHTS_FILE,
                crate::peft::format::CONFIG_FILE,
                LABELS_FILE,
            ],
        )?;
        rmdir_if_empty(&adapter)?;
    }
    let model = out.join(MODEL_DIR);
    if model.is_dir() {
        with_temporaries(
            &model,
            &[
                "model.safetensors",
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "generation_config.json",
            ],
        )?;
        rmdir_if_empty(&model)?;
    }
    let ckpts = checkpoint::checkpoints_dir(out);
    if ckpts.is_dir() {
        for e in std::fs::read_dir(&ckpts).map_err(|e| Error::file(&ckpts, e))? {
            let e = e.map_err(|e| Error::file(&ckpts, e))?;
            if checkpoint::is_checkpoint_entry(&e.file_name().to_string_lossy()) {
                rm(&e.path())?;
            }
        }
        rmdir_if_empty(&ckpts)?;
    }
    Ok(())
}
