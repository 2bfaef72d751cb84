//! A task's documents: local files (`dataset_path: json | csv | parquet` with
//! `dataset_kwargs.data_files`, as `datasets.load_dataset` reads them) or a hub dataset fetched
//! as Parquet (the hub's `refs/convert/parquet` branch) through hf-hub.
use super::task::{DataFiles, TaskConfig};
use crate::data::{read_rows, Format};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

pub type Doc = Map<String, Value>;

/// Documents of one split, with the file each came from (for messages).
#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    pub docs: Vec<Doc>,
    pub files: Vec<PathBuf>,
}

/// Where a relative data path may be: the working directory (lm-eval's rule), then the task
/// file's folder and each folder above it (so a task folder works from anywhere).
fn candidates(task_file: &Path, rel: &str) -> Vec<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute() {
        return vec![p.to_path_buf()];
    }
    let mut out = vec![p.to_path_buf()];
    let mut dir = task_file.parent();
    while let Some(d) = dir {
        if d.as_os_str().is_empty() {
            break;
        }
        out.push(d.join(p));
        dir = d.parent();
    }
    out
}

fn locate(t: &TaskConfig, rel: &str) -> Result<PathBuf> {
    let cands = candidates(&t.file, rel);
    if let Some(found) = cands.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    // there, but neither a file nor a folder: a device is refused as such (a pipe is read)
    if let Some(other) = cands.iter().find(|c| c.exists() && !c.is_dir()) {
        crate::fsutil::input_size_limit(other)?;
        return Ok(other.clone());
    }
    if let Some(dir) = cands.iter().find(|c| c.is_dir()) {
        return Err(Error::key(
            t.file.display().to_string(),
            "dataset_kwargs.data_files",
            format!("`{rel}` is a folder ({}), not a data file", dir.display()),
        ));
    }
    let looked: Vec<String> = cands.iter().map(|c| c.display().to_string()).collect();
    Err(Error::key(
        t.file.display().to_string(),
        "dataset_kwargs.data_files",
        format!("`{rel}` not found; looked in: {}", looked.join(", ")),
    ))
}

/// The files of `split` named by `data_files` (a single file or list means split `train`, as
/// in `datasets`).
fn split_files(t: &TaskConfig, split: &str) -> Result<Option<Vec<String>>> {
    let files = t.dataset_kwargs.files(&t.file.display().to_string())?;
    let Some(files) = files else {
        return Err(Error::key(
            t.file.display().to_string(),
            "dataset_kwargs.data_files",
            format!(
                "missing: `dataset_path: {}` reads local files named here",
                t.dataset_path
            ),
        ));
    };
    Ok(match &files {
        DataFiles::One(f) => (split == "train").then(|| vec![f.clone()]),
        DataFiles::Many(v) => (split == "train").then(|| v.clone()),
        DataFiles::Splits(m) => m.get(split).map(|f| f.to_vec()),
    })
}

fn local_format(t: &TaskConfig, path: &Path) -> Result<Format> {
    let sep = t
        .dataset_kwargs
        .delimiter
        .as_deref()
        .or(t.dataset_kwargs.sep.as_deref());
    Ok(match t.dataset_path.as_str() {
        "json" => match Format::from_path(path) {
            Ok(Format::Json) => Format::Json,
            _ => Format::Jsonl,
        },
        "csv" => match sep {
            Some("\t") => Format::Tsv,
            Some(",") => Format::Csv,
            Some(other) => {
                return Err(Error::key(
                    t.file.display().to_string(),
                    "dataset_kwargs.delimiter",
                    format!("{other:?}: expected \",\" or \"\\t\""),
                ))
            }
            None => match Format::from_path(path) {
                Ok(Format::Tsv) => Format::Tsv,
                _ => Format::Csv,
            },
        },
        "parquet" => Format::Parquet,
        _ => Format::from_path(path)?,
    })
}

/// Pandas reads a CSV column whose every cell is an integer (or a number) as numbers; lm-eval
/// then indexes choices with them. Do the same, column by column.
fn infer_csv_types(docs: &mut [Doc]) {
    let Some(first) = docs.first() else { return };
    let cols: Vec<String> = first.keys().cloned().collect();
    for c in cols {
        let cells = || docs.iter().map(|d| d.get(&c).and_then(Value::as_str));
        if cells().all(|s| s.is_some_and(|s| s.trim().parse::<i64>().is_ok())) {
            for d in docs.iter_mut() {
                if let Some(n) = d
                    .get(&c)
                    .and_then(Value::as_str)
                    .and_then(|s| s.trim().parse::<i64>().ok())
                {
                    d.insert(c.clone(), Value::from(n));
                }
            }
        } else if cells()
            .all(|s| s.is_some_and(|s| s.trim().parse::<f64>().is_ok_and(f64::is_finite)))
        {
            for d in docs.iter_mut() {
                if let Some(x) = d
                    .get(&c)
                    .and_then(Value::as_str)
                    .and_then(|s| s.trim().parse::<f64>().ok())
                {
                    if let Some(n) = serde_json::Number::from_f64(x) {
                        d.insert(c.clone(), Value::Number(n));
                    }
                }
            }
        }
    }
}

/// Load one split of a task; `Ok(None)` when the task names no such split.
pub fn load_split(t: &TaskConfig, split: &str) -> Result<Split> {
    match t.dataset_path.as_str() {
        "json" | "csv" | "parquet" | "text" => {
            let names = split_files(t, split)?.ok_or_else(|| {
                Error::key(
                    t.file.display().to_string(),
                    "dataset_kwargs.data_files",
                    format!("no files for split `{split}` (the split a training_split / validation_split / test_split / fewshot_split key names)"),
                )
            })?;
            let mut docs = Vec::new();
            let mut files = Vec::new();
            for n in names {
                let path = locate(t, &n)?;
                let format = local_format(t, &path)?;
                let rows = read_rows(&path, Some(format))?;
                let mut part: Vec<Doc> = rows.rows.into_iter().map(|r| r.fields).collect();
                if matches!(format, Format::Csv | Format::Tsv) {
                    infer_csv_types(&mut part);
                }
                docs.extend(part);
                files.push(path);
            }
            Ok(Split {
                name: split.to_string(),
                docs,
                files,
            })
        }
        id => load_hub_split(t, id, split),
    }
}

/// A hub dataset's split as the hub's own Parquet conversion (`refs/convert/parquet`:
/// `<config>/<split>/NNNN.parquet`), downloaded into the hf-hub cache.
fn load_hub_split(t: &TaskConfig, id: &str, split: &str) -> Result<Split> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let src = t.file.display().to_string();
    if id.split('/').count() > 2 || id.contains("..") {
        return Err(Error::key(
            &src,
            "dataset_path",
            format!("`{id}`: expected json, csv, parquet or a hub id org/name"),
        ));
    }
    let config = t.dataset_name.clone().unwrap_or_else(|| "default".into());
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| Error::key(&src, "dataset_path", format!("hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Dataset,
        "refs/convert/parquet".to_string(),
    ));
    let info = repo.info().map_err(|e| {
        Error::key(
            &src,
            "dataset_path",
            format!("hub dataset `{id}` (its Parquet conversion): {e}"),
        )
    })?;
    let prefix = format!("{config}/{split}/");
    let mut names: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| f.starts_with(&prefix) && f.ends_with(".parquet"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::key(
            &src,
            "dataset_name",
            format!("hub dataset `{id}` has no Parquet files under `{prefix}` (check dataset_name and the split names)"),
        ));
    }
    let mut docs = Vec::new();
    let mut files = Vec::new();
    for n in names {
        let path = repo.get(&n).map_err(|e| {
            Error::key(
                &src,
                "dataset_path",
                format!("hub dataset `{id}`, file {n}: {e}"),
            )
        })?;
        let rows = read_rows(&path, Some(Format::Parquet))?;
        docs.extend(rows.rows.into_iter().map(|r| r.fields));
        files.push(path);
    }
    Ok(Split {
        name: split.to_string(),
        docs,
        files,
    })
}

/// The files a task reads from disk (its YAML and the local data files that exist): outputs
/// must never overwrite them.
pub fn input_files(t: &TaskConfig) -> Vec<PathBuf> {
    let mut out = vec![t.file.clone()];
    if let Ok(Some(files)) = t.dataset_kwargs.files(&t.file.display().to_string()) {
        let names: Vec<String> = match files {
            DataFiles::One(f) => vec![f],
            DataFiles::Many(v) => v,
            DataFiles::Splits(m) => m.values().flat_map(|f| f.to_vec()).collect(),
        };
        out.extend(names.iter().filter_map(|n| locate(t, n).ok()));
    }
    out
}

/// A task name as a file-name part (`samples_<task>.jsonl`): letters, digits, `.`, `_`, `-`.
pub fn file_stem(task: &str) -> String {
    task.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// The documents scored: the test split, else validation (lm-eval's `eval_docs`).
pub fn eval_split_name(t: &TaskConfig) -> Result<&str> {
    t.test_split
        .as_deref()
        .or(t.validation_split.as_deref())
        .ok_or_else(|| {
            Error::key(
                t.file.display().to_string(),
                "test_split",
                "missing: a task needs a test_split or validation_split to score",
            )
        })
}

/// The split few-shot examples come from: `fewshot_config.split` / `fewshot_split`, else
/// training, else validation, else test (lm-eval's order).
pub fn fewshot_split_name(t: &TaskConfig) -> Option<&str> {
    t.fewshot
        .split
        .as_deref()
        .or(t.fewshot_split.as_deref())
        .or(t.training_split.as_deref())
        .or(t.validation_split.as_deref())
        .or(t.test_split.as_deref())
}
