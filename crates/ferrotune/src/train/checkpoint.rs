//! Checkpoints: `output_dir/checkpoints/step-N/` holds the adapter (PEFT files), the optimizer
//! state, and `trainer_state.json` (step, data cursor, RNG state, counters). A checkpoint is
//! written into a temporary folder and renamed into place, so a run killed at any moment leaves
//! either the complete checkpoint or none; [`latest`] only sees complete ones.
use crate::data::DataCursor;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";

/// Random state beyond the data cursor. LoRA dropout masks are a function of the run's seed
/// and how many training forward passes each adapter has seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// Training forward passes so far (micro-batches), i.e. dropout masks drawn per adapter.
    pub dropout_calls: u64,
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub step: usize,
    pub max_steps: usize,
    pub method: String,
    /// The next training batch.
    pub data_cursor: DataCursor,
    /// Epochs done, fractional.
    pub epoch: f64,
    pub rng: RngState,
    /// Non-padding tokens processed (prompt and completion).
    pub train_tokens: u64,
    /// Tokens the loss was computed on.
    pub loss_tokens: u64,
    /// Seconds spent in training steps (not evaluation or saving), over all sessions.
    pub train_time_s: f64,
    pub last_train_loss: Option<f64>,
    pub initial_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Multi-task runs: the last validation loss of each task (`None`: no tokens to score).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub last_val_loss_by_task: std::collections::BTreeMap<String, Option<f64>>,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<usize>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: usize,
    /// Checked on resume: the batches would differ if these changed.
    pub train_examples: usize,
    pub batches_per_epoch: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Ranks of the session that saved it: a step took `grad_accum × world_size` micro-batches
    /// (a resume may change the two, not their product).
    #[serde(default = "one")]
    pub world_size: usize,
    /// Seconds rank 0 spent in collectives, over all sessions.
    #[serde(default)]
    pub comm_time_s: f64,
    /// Of which the training waited for (see `Summary::comm_wait_time_s`).
    #[serde(default)]
    pub comm_wait_time_s: f64,
}

fn one() -> usize {
    1
}

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix(PREFIX)?.parse().ok()
}

/// Whether `name`, in the checkpoints folder, is one that [`save`] writes: a checkpoint or the
/// temporary folder of one.
pub fn is_checkpoint_entry(name: &str) -> bool {
    step_of(name).is_some() || name.starts_with(TMP_PREFIX)
}

/// Complete checkpoints, oldest first: (step, folder).
pub fn list(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(output_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| Error::file(&dir, e))? {
        let e = e.map_err(|e| Error::file(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = step_of(&name) {
            if e.path().join(STATE_FILE).exists() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint.
pub fn latest(output_dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(list(output_dir)?.pop())
}

/// Remove temporary folders left by a run killed while saving.
pub fn remove_partial(output_dir: &Path) -> Result<()> {
    let dir = checkpoints_dir(output_dir);
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(&dir).map_err(|e| Error::file(&dir, e))? {
        let e = e.map_err(|e| Error::file(&dir, e))?;
        if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            std::fs::remove_dir_all(e.path()).map_err(|err| Error::file(e.path(), err))?;
        }
    }
    Ok(())
}

/// Write checkpoint `step`: `fill` writes the files into a temporary folder, which is then
/// renamed to `step-N` (replacing an older one of the same step). Returns the final folder.
pub fn save(
    output_dir: &Path,
    step: usize,
    state: &TrainerState,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    begin(output_dir, step)?;
    commit(output_dir, step, state, fill)
}

/// The unfinished folder of the checkpoint of `step` (what [`begin`] creates).
pub fn pending_dir(output_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(output_dir).join(format!("{TMP_PREFIX}{PREFIX}{step}"))
}

/// Create the empty unfinished folder of the checkpoint of `step` (a leftover one is removed):
/// files go there (from every rank of a ZeRO run) until [`commit`] makes it final.
pub fn begin(output_dir: &Path, step: usize) -> Result<PathBuf> {
    let dir = checkpoints_dir(output_dir);
    std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
    let tmp = pending_dir(output_dir, step);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, e))?;
    Ok(tmp)
}

/// `fill` the unfinished folder of [`begin`], add the state, and rename it into place.
pub fn commit(
    output_dir: &Path,
    step: usize,
    state: &TrainerState,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(output_dir);
    let tmp = pending_dir(output_dir, step);
    fill(&tmp)?;
    let json = serde_json::to_string_pretty(state).expect("the state always serializes");
    let state_path = tmp.join(STATE_FILE);
    std::fs::write(&state_path, json).map_err(|e| Error::file(&state_path, e))?;
    let fin = dir.join(format!("{PREFIX}{step}"));
    if fin.exists() {
        // Replacing a checkpoint of the same step (a resumed run saving it again): move the old
        // one aside first so that some complete copy exists at every moment.
        let old = dir.join(format!("{TMP_PREFIX}old-{PREFIX}{step}"));
        std::fs::rename(&fin, &old).map_err(|e| Error::file(&fin, e))?;
        std::fs::rename(&tmp, &fin).map_err(|e| Error::file(&fin, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::file(&old, e))?;
    } else {
        std::fs::rename(&tmp, &fin).map_err(|e| Error::file(&fin, e))?;
    }
    Ok(fin)
}

/// Delete the oldest checkpoints so that at most `keep` remain.
pub fn prune(output_dir: &Path, keep: usize) -> Result<()> {
    let all = list(output_dir)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(|e| Error::file(p, e))?;
        }
    }
    Ok(())
}

pub fn read_state(checkpoint: &Path) -> Result<TrainerState> {
    let p = checkpoint.join(STATE_FILE);
    let text = crate::fsutil::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("invalid trainer state: {e}")))
}

/// What the run about to resume is: a checkpoint's state must agree with it.
#[derive(Debug, Clone)]
pub struct RunShape<'a> {
    pub max_steps: usize,
    pub method: &'a str,
    pub seed: u64,
    pub train_examples: usize,
    pub batches_per_epoch: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Ranks of this run (`grad_accum` is per rank).
    pub world_size: usize,
    /// With packing an epoch's number of batches varies, so the data cursor is only bounded.
    pub packing: bool,
}

/// Check the state read from `checkpoint` (folder `step-N`) against the run and against itself
/// before anything is restored from it: a hand-edited or corrupt `trainer_state.json` is a
/// one-line error naming the file and the field, not a hang or a wrong run.
pub fn validate_state(checkpoint: &Path, s: &TrainerState, run: &RunShape) -> Result<()> {
    let path = checkpoint.join(STATE_FILE);
    let field =
        |name: &str, what: String| Err(Error::file(&path, format!("field `{name}`: {what}")));
    for (name, saved, now) in [
        ("batch_size", s.batch_size, run.batch_size),
        ("train_examples", s.train_examples, run.train_examples),
        (
            "batches_per_epoch",
            s.batches_per_epoch,
            run.batches_per_epoch,
        ),
    ] {
        if saved != now {
            return field(
                name,
                format!("cannot resume: {saved} in the checkpoint but {now} in this run (the data or batch settings changed)"),
            );
        }
    }
    // The data cursor is global: any world size resumes it, if a step still takes as many
    // micro-batches.
    if s.world_size == 0 || s.grad_accum == 0 {
        return field(
            "world_size",
            "and grad_accum must be at least 1".to_string(),
        );
    }
    let Some(per_step) = s.grad_accum.checked_mul(s.world_size) else {
        return field(
            "world_size",
            format!(
                "{} ranks of grad_accum {} overflow",
                s.world_size, s.grad_accum
            ),
        );
    };
    let now = run.grad_accum * run.world_size;
    if per_step != now {
        let hint = if per_step.is_multiple_of(run.world_size) {
            format!("set train.grad_accum = {}", per_step / run.world_size)
        } else {
            format!("run on a number of ranks that divides {per_step}")
        };
        return field(
            "grad_accum",
            format!(
                "cannot resume: the checkpoint's steps took {per_step} micro-batches (grad_accum {} x {} ranks) but this run's take {now} (grad_accum {} x {} ranks): {hint}",
                s.grad_accum, s.world_size, run.grad_accum, run.world_size
            ),
        );
    }
    if s.method != run.method {
        return field(
            "method",
            format!(
                "cannot resume: `{}` in the checkpoint but `{}` in this run",
                s.method, run.method
            ),
        );
    }
    if s.rng.seed != run.seed {
        return field(
            "rng.seed",
            format!(
                "cannot resume: {} in the checkpoint but train.seed is {}",
                s.rng.seed, run.seed
            ),
        );
    }
    let folder_step = checkpoint
        .file_name()
        .and_then(|n| step_of(&n.to_string_lossy()));
    if folder_step.is_some_and(|f| f != s.step) {
        return field(
            "step",
            format!("is {} but the folder is {}", s.step, checkpoint.display()),
        );
    }
    if s.step > run.max_steps {
        return field(
            "step",
            format!("{} is past the run's max_steps {}", s.step, run.max_steps),
        );
    }
    // Every step draws grad_accum micro-batches (on each rank); each training forward pass
    // draws one dropout mask per adapter (a micro-batch without loss tokens is skipped).
    let Some(micro) = s.step.checked_mul(per_step) else {
        return field(
            "step",
            format!("{} steps of {per_step} micro-batches overflow", s.step),
        );
    };
    if s.rng.dropout_calls > micro as u64 {
        return field(
            "rng.dropout_calls",
            format!(
                "{} is more than the {micro} micro-batches of {} steps of {per_step}",
                s.rng.dropout_calls, s.step
            ),
        );
    }
    let cursor = s.data_cursor;
    let drawn = cursor
        .epoch
        .checked_mul(s.batches_per_epoch)
        .and_then(|n| n.checked_add(cursor.index));
    let consistent = if run.packing {
        cursor.epoch <= micro && cursor.index <= micro
    } else {
        cursor.index <= s.batches_per_epoch && drawn == Some(micro)
    };
    if !consistent {
        return field(
            "data_cursor",
            format!(
                "epoch {} batch {} does not follow from {micro} micro-batches of {} per epoch",
                cursor.epoch, cursor.index, s.batches_per_epoch
            ),
        );
    }
    if !(s.epoch.is_finite() && s.epoch >= 0.0) {
        return field("epoch", format!("{} is not a number of epochs", s.epoch));
    }
    if !(s.train_time_s.is_finite() && s.train_time_s >= 0.0) {
        return field(
            "train_time_s",
            format!("{} is not a duration", s.train_time_s),
        );
    }
    if s.loss_tokens > s.train_tokens {
        return field(
            "loss_tokens",
            format!(
                "{} is more than train_tokens {}",
                s.loss_tokens, s.train_tokens
            ),
        );
    }
    if s.best_step.is_some_and(|b| b > s.step) {
        return field(
            "best_step",
            format!(
                "{} is after the checkpoint's step {}",
                s.best_step.unwrap_or(0),
                s.step
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            step,
            max_steps: 10,
            method: "lora".into(),
            data_cursor: DataCursor {
                epoch: 0,
                index: step,
            },
            epoch: 0.0,
            rng: RngState {
                seed: 1,
                dropout_calls: step as u64,
            },
            train_tokens: 0,
            loss_tokens: 0,
            train_time_s: 0.0,
            last_train_loss: None,
            initial_val_loss: None,
            last_val_loss: None,
            last_val_loss_by_task: Default::default(),
            best_val_loss: None,
            best_step: None,
            evals_since_best: 0,
            train_examples: 1,
            batches_per_epoch: 1,
            batch_size: 1,
            grad_accum: 1,
            world_size: 1,
            comm_time_s: 0.0,
            comm_wait_time_s: 0.0,
        }
    }

    #[test]
    fn save_list_prune_and_ignore_partial_folders() {
        let out = std::env::temp_dir().join(format!("ferrotune-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        for s in [2, 4, 6] {
            save(&out, s, &state(s), |d| {
                std::fs::write(d.join("x"), s.to_string()).map_err(|e| Error::file(d, e))
            })
            .unwrap();
        }
        // A folder left by a kill during a save, and one without a state file: both ignored.
        std::fs::create_dir_all(checkpoints_dir(&out).join(".tmp-step-8")).unwrap();
        std::fs::create_dir_all(checkpoints_dir(&out).join("step-9")).unwrap();
        let (step, p) = latest(&out).unwrap().unwrap();
        assert_eq!(step, 6);
        assert_eq!(read_state(&p).unwrap(), state(6));
        // A failing fill leaves the previous checkpoints as they were.
        assert!(save(&out, 7, &state(7), |_| Err(Error::msg("disk full"))).is_err());
        assert_eq!(latest(&out).unwrap().unwrap().0, 6);
        remove_partial(&out).unwrap();
        assert!(!checkpoints_dir(&out).join(".tmp-step-8").exists());
        // Saving the same step again replaces it.
        save(&out, 6, &state(6), |d| {
            std::fs::write(d.join("x"), "again").map_err(|e| Error::file(d, e))
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(checkpoints_dir(&out).join("step-6/x")).unwrap(),
            "again"
        );
        prune(&out, 2).unwrap();
        let steps: Vec<usize> = list(&out).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![4, 6]);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
