//! lm-evaluation-harness task files (YAML): the subset `ferrotune bench` runs, read with the same
//! defaults as lm-eval's `TaskConfig`, every key checked. A key lm-eval has but we do not run
//! (`process_docs`, `filter_list`, a Python `!function`, …) is refused by name, never ignored:
//! silently dropping one would change the numbers.
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// What lm-eval asks of the model for each document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputType {
    MultipleChoice,
    Loglikelihood,
    LoglikelihoodRolling,
    GenerateUntil,
}

impl OutputType {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputType::MultipleChoice => "multiple_choice",
            OutputType::Loglikelihood => "loglikelihood",
            OutputType::LoglikelihoodRolling => "loglikelihood_rolling",
            OutputType::GenerateUntil => "generate_until",
        }
    }
}

/// One `metric_list` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub metric: String,
    pub aggregation: Option<String>,
    pub higher_is_better: Option<bool>,
    /// exact_match options (lm-eval passes them to the metric).
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub ignore_punctuation: bool,
    #[serde(default)]
    pub ignore_numbers: bool,
    #[serde(default)]
    pub regexes_to_ignore: Vec<String>,
}

/// `fewshot_config`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewshotConfig {
    /// `default` (seeded random, as lm-eval's `Random(1234).sample`) or `first_n`.
    pub sampler: Option<String>,
    pub split: Option<String>,
    pub doc_to_text: Option<Value>,
    pub doc_to_target: Option<Value>,
    pub doc_to_choice: Option<Value>,
    pub fewshot_delimiter: Option<String>,
    pub target_delimiter: Option<String>,
}

/// `generation_kwargs` of a `generate_until` task.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationKwargs {
    /// Stop strings: one, or a list (checked in [`parse_task`], which names the key).
    #[serde(default)]
    pub until: Option<Value>,
    pub max_gen_toks: Option<usize>,
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub do_sample: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
}

impl GenerationKwargs {
    /// The stop strings (`until`: a string or a list of strings, checked at parse time).
    pub fn stops(&self) -> Vec<String> {
        match &self.until {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(v)) => v
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// `dataset_kwargs.data_files`: one file, a list, or files per split.
#[derive(Debug, Clone, PartialEq)]
pub enum DataFiles {
    One(String),
    Many(Vec<String>),
    Splits(std::collections::BTreeMap<String, OneOrMany>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `dataset_kwargs` (what lm-eval hands to `datasets.load_dataset`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetKwargs {
    /// One file, a list, or files per split (parsed by [`DatasetKwargs::files`]).
    pub data_files: Option<Value>,
    /// CSV: the field separator (`delimiter` or pandas' `sep`).
    pub delimiter: Option<String>,
    pub sep: Option<String>,
    /// Accepted for compatibility; nothing runs remote code here.
    pub trust_remote_code: Option<bool>,
}

impl DatasetKwargs {
    /// `data_files` as [`DataFiles`]; `src` names the task file in the error.
    pub fn files(&self, src: &str) -> Result<Option<DataFiles>> {
        let bad = || {
            Error::key(
                src,
                "dataset_kwargs.data_files",
                "expected a file, a list of files, or a mapping of split names to files",
            )
        };
        let list = |v: &Value| -> Option<Vec<String>> {
            match v {
                Value::String(s) => Some(vec![s.clone()]),
                Value::Array(items) => items
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => None,
            }
        };
        Ok(match &self.data_files {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(DataFiles::One(s.clone())),
            Some(v @ Value::Array(_)) => Some(DataFiles::Many(list(v).ok_or_else(bad)?)),
            Some(Value::Object(m)) => {
                let mut splits = std::collections::BTreeMap::new();
                for (k, v) in m {
                    let files = list(v).ok_or_else(|| {
                        Error::key(
                            src,
                            format!("dataset_kwargs.data_files.{k}"),
                            "expected a file or a list of files",
                        )
                    })?;
                    splits.insert(k.clone(), OneOrMany::Many(files));
                }
                Some(DataFiles::Splits(splits))
            }
            Some(_) => return Err(bad()),
        })
    }
}

/// A task, as lm-eval's `TaskConfig` with its defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    pub task: String,
    pub alias: Option<String>,
    /// The YAML file it was read from (messages, relative data paths).
    pub file: PathBuf,
    pub dataset_path: String,
    pub dataset_name: Option<String>,
    pub dataset_kwargs: DatasetKwargs,
    pub training_split: Option<String>,
    pub validation_split: Option<String>,
    pub test_split: Option<String>,
    pub fewshot_split: Option<String>,
    pub doc_to_text: Option<Value>,
    pub doc_to_target: Option<Value>,
    pub doc_to_choice: Option<Value>,
    pub description: String,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub fewshot: FewshotConfig,
    pub num_fewshot: Option<usize>,
    pub output_type: OutputType,
    pub generation_kwargs: Option<GenerationKwargs>,
    pub metric_list: Vec<MetricSpec>,
    pub version: Value,
    /// The YAML as read (with `include`s merged): written to the results' `configs`.
    pub raw: Map<String, Value>,
}

/// The keys of a task file we run. lm-eval keys not here are refused by name.
const TASK_KEYS: &[&str] = &[
    "task",
    "task_alias",
    "tag",
    "include",
    "dataset_path",
    "dataset_name",
    "dataset_kwargs",
    "training_split",
    "validation_split",
    "test_split",
    "fewshot_split",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "description",
    "target_delimiter",
    "fewshot_delimiter",
    "fewshot_config",
    "num_fewshot",
    "output_type",
    "generation_kwargs",
    "metric_list",
    "metadata",
    "should_decontaminate",
    "doc_to_decontamination_query",
    "repeats",
];

/// Keys of a group file (`group:` with a list of tasks).
const GROUP_KEYS: &[&str] = &[
    "group",
    "group_alias",
    "task",
    "aggregate_metric_list",
    "metadata",
    "tag",
];

/// The most `include`s followed from one file (a cycle is an error well before).
const MAX_INCLUDE_DEPTH: usize = 8;

/// A YAML file: a task or a group of tasks.
#[derive(Debug, Clone)]
pub enum TaskFile {
    Task(Box<TaskConfig>),
    Group(GroupConfig),
}

/// A `group:` file: its member tasks, each a task name, a YAML path or an inline task.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group: String,
    pub file: PathBuf,
    pub members: Vec<GroupMember>,
    /// Metrics averaged over the members (`aggregate_metric_list`), weighted by size or not.
    pub aggregate: Vec<(String, bool)>,
}

#[derive(Debug, Clone)]
pub enum GroupMember {
    Name(String),
    Inline(Box<TaskConfig>),
}

/// Deeper nesting of `[` and `{` than a task file has (Jinja's `{{ }}` and `{% %}` count 2).
const MAX_FLOW_NESTING: usize = 1000;

/// The line where `[` / `{` first nest deeper than `limit` (closers lower the count, never
/// below 0; quotes are not parsed, so brackets in strings count too: the limit allows for them).
fn flow_nesting_past(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    for b in text.bytes() {
        match b {
            b'\n' => line += 1,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(line);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// Read a YAML file's mapping, following `include:` (relative to the including file; the
/// including file's keys win, as in lm-eval).
pub fn read_yaml_map(
    path: &Path,
    text: Option<&str>,
    depth: usize,
    chain: &[PathBuf],
) -> Result<Map<String, Value>> {
    if depth > MAX_INCLUDE_DEPTH {
        return Err(Error::file(
            path,
            format!("more than {MAX_INCLUDE_DEPTH} nested `include`s (a cycle?)"),
        ));
    }
    let owned;
    let text = match text {
        Some(t) => t,
        None => {
            owned = read_task_text(path)?;
            owned.as_str()
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, line) in text.lines().enumerate() {
        if let Some(at) = line.find("!function") {
            let key = line[..at].trim().trim_end_matches(':').trim();
            return Err(Error::file(
                path,
                format!(
                    "line {}: key `{key}` is a Python `!function`, which ferrotune cannot run; \
                     express it in Jinja (see tasks/ for examples)",
                    i + 1
                ),
            ));
        }
    }
    // The YAML parser stops at 128 levels, but only after a scan whose time grows with the
    // square of the nesting (400,000 `[` ran for minutes): brackets nested far deeper than any
    // task file are refused first, by line.
    if let Some(line) = flow_nesting_past(text, MAX_FLOW_NESTING) {
        return Err(Error::file(
            path,
            format!("line {line}: brackets nested more than {MAX_FLOW_NESTING} deep; refused"),
        ));
    }
    let yaml: serde_norway::Value = serde_norway::from_str(text)
        .map_err(|e| Error::file(path, format!("invalid YAML: {e}")))?;
    let json = serde_json::to_value(&yaml)
        .map_err(|e| Error::file(path, format!("YAML that is not plain data: {e}")))?;
    let Value::Object(mut map) = json else {
        return Err(Error::file(
            path,
            "expected a mapping of keys (task: ..., dataset_path: ...)",
        ));
    };
    if let Some(inc) = map.remove("include") {
        let Value::String(inc) = inc else {
            return Err(Error::key(
                path.display().to_string(),
                "include",
                "expected a file name",
            ));
        };
        let base_dir = path.parent().unwrap_or(Path::new("."));
        let inc_path = base_dir.join(&inc);
        let mut chain = chain.to_vec();
        chain.push(path.to_path_buf());
        if chain.iter().any(|p| same_file(p, &inc_path)) {
            let names: Vec<String> = chain
                .iter()
                .chain([&inc_path])
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::key(
                path.display().to_string(),
                "include",
                format!("a cycle: {}", names.join(" -> ")),
            ));
        }
        let mut base = match read_yaml_map(&inc_path, None, depth + 1, &chain) {
            Ok(m) => m,
            // An error inside the included file names that file already.
            Err(e @ Error::Key { .. }) => return Err(e),
            Err(e) => {
                return Err(Error::key(
                    path.display().to_string(),
                    "include",
                    crate::error::first_line(&e.to_string()),
                ))
            }
        };
        for (k, v) in map {
            base.insert(k, v);
        }
        map = base;
    }
    Ok(map)
}

/// The largest task file read (lm-eval's are a few kB).
pub const MAX_TASK_FILE_BYTES: u64 = 4 << 20;

/// A task file's text: a regular file of sane size, checked before it is read.
fn read_task_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::file(path, e))?;
    if !meta.is_file() {
        return Err(Error::file(path, "not a regular file"));
    }
    if meta.len() > MAX_TASK_FILE_BYTES {
        return Err(Error::file(
            path,
            format!(
                "{} bytes: a task file is at most {MAX_TASK_FILE_BYTES}",
                meta.len()
            ),
        ));
    }
    std::fs::read_to_string(path).map_err(|e| Error::file(path, e))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Parse a task or group file. `text` is its content when it is not on disk (a shipped task).
pub fn parse_task_file(path: &Path, text: Option<&str>) -> Result<TaskFile> {
    let map = read_yaml_map(path, text, 0, &[])?;
    if map.contains_key("group") {
        return parse_group(path, map).map(TaskFile::Group);
    }
    parse_task(path, map).map(|t| TaskFile::Task(Box::new(t)))
}

/// An inline task of a group's `task:` list, with its `include:` (relative to the group file)
/// applied as in a task file: the member's own keys win. (It was dropped without a word.)
fn inline_member(
    path: &Path,
    i: usize,
    mut member: Map<String, Value>,
) -> Result<Map<String, Value>> {
    let Some(inc) = member.remove("include") else {
        return Ok(member);
    };
    let Value::String(inc) = inc else {
        return Err(Error::key(
            path.display().to_string(),
            format!("task[{i}].include"),
            "expected a file name",
        ));
    };
    let inc_path = path.parent().unwrap_or(Path::new(".")).join(&inc);
    let mut base =
        read_yaml_map(&inc_path, None, 1, &[path.to_path_buf()]).map_err(|e| match e {
            e @ Error::Key { .. } => e,
            e => Error::key(
                path.display().to_string(),
                format!("task[{i}].include"),
                crate::error::first_line(&e.to_string()),
            ),
        })?;
    base.extend(member);
    Ok(base)
}

fn parse_group(path: &Path, map: Map<String, Value>) -> Result<GroupConfig> {
    let src = path.display().to_string();
    for k in map.keys() {
        if !GROUP_KEYS.contains(&k.as_str()) {
            return Err(Error::key(
                &src,
                k,
                format!(
                    "unsupported key in a group file (supported: {})",
                    GROUP_KEYS.join(", ")
                ),
            ));
        }
    }
    let group = match map.get("group") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(Error::key(&src, "group", "expected the group's name")),
    };
    let members = match map.get("task") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(GroupMember::Name(s.clone())),
                Value::Object(m) => inline_member(path, i, m.clone())
                    .and_then(|m| parse_task(path, m))
                    .map(|t| GroupMember::Inline(Box::new(t))),
                _ => Err(Error::key(
                    &src,
                    format!("task[{i}]"),
                    "expected a task name or a task mapping",
                )),
            })
            .collect::<Result<Vec<_>>>()?,
        _ => return Err(Error::key(&src, "task", "expected a list of tasks")),
    };
    let mut aggregate = Vec::new();
    if let Some(v) = map.get("aggregate_metric_list") {
        let Value::Array(items) = v else {
            return Err(Error::key(&src, "aggregate_metric_list", "expected a list"));
        };
        for (i, it) in items.iter().enumerate() {
            let metric = it.get("metric").and_then(Value::as_str).ok_or_else(|| {
                Error::key(
                    &src,
                    format!("aggregate_metric_list[{i}].metric"),
                    "expected a metric name",
                )
            })?;
            if let Some(a) = it.get("aggregation").and_then(Value::as_str) {
                if a != "mean" {
                    return Err(Error::key(
                        &src,
                        format!("aggregate_metric_list[{i}].aggregation"),
                        format!("`{a}`: only `mean` is supported"),
                    ));
                }
            }
            let weight = match it.get("weight_by_size") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(Error::key(
                        &src,
                        format!("aggregate_metric_list[{i}].weight_by_size"),
                        "expected true or false",
                    ))
                }
            };
            if let Some(k) = it.as_object().and_then(|o| {
                o.keys().find(|k| {
                    !["metric", "aggregation", "weight_by_size", "filter_list"]
                        .contains(&k.as_str())
                })
            }) {
                return Err(Error::key(
                    &src,
                    format!("aggregate_metric_list[{i}].{}", crate::error::clipped(k)),
                    "unknown key (known: metric, aggregation, weight_by_size, filter_list)",
                ));
            }
            aggregate.push((metric.to_string(), weight));
        }
    }
    Ok(GroupConfig {
        group,
        file: path.to_path_buf(),
        members,
        aggregate,
    })
}

fn opt_string(src: &str, map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(Error::key(src, key, "expected a string")),
    }
}

/// serde's message without our Rust type names ("expected struct FewshotConfig" reads
/// "expected a mapping of keys").
fn serde_msg(e: &serde_json::Error) -> String {
    let msg = crate::error::first_line(&e.to_string());
    match msg.find("struct ") {
        Some(at) => format!("{}a mapping of keys", &msg[..at]),
        None => msg,
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    src: &str,
    map: &Map<String, Value>,
    key: &str,
) -> Result<Option<T>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| Error::key(src, key, serde_msg(&e))),
    }
}

/// A `doc_to_*` value: a template or field name (string), an index (integer) or a list.
fn doc_to(src: &str, map: &Map<String, Value>, key: &str) -> Result<Option<Value>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v @ (Value::String(_) | Value::Array(_))) => Ok(Some(v.clone())),
        Some(v @ Value::Number(n)) if n.is_u64() => Ok(Some(v.clone())),
        Some(Value::Object(m)) if key == "doc_to_choice" => {
            // lm-eval takes a mapping's values in order.
            Ok(Some(Value::Array(m.values().cloned().collect())))
        }
        Some(_) => Err(Error::key(
            src,
            key,
            "expected a Jinja template, a field name, an index or a list",
        )),
    }
}

pub fn parse_task(path: &Path, map: Map<String, Value>) -> Result<TaskConfig> {
    let src = path.display().to_string();
    for k in map.keys() {
        if !TASK_KEYS.contains(&k.as_str()) {
            let hint = match k.as_str() {
                "process_docs" | "process_results" | "filter_list" | "use_prompt"
                | "gen_prefix" | "doc_to_image" | "doc_to_audio" | "custom_dataset" => {
                    " (an lm-eval key ferrotune does not run)"
                }
                _ => "",
            };
            return Err(Error::key(&src, k, format!("unsupported key{hint}")));
        }
    }
    let task = match map.get("task") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => return Err(Error::key(&src, "task", "expected the task's name")),
        None => {
            return Err(Error::key(
                &src,
                "task",
                "missing: every task file names its task",
            ))
        }
    };
    let dataset_path = opt_string(&src, &map, "dataset_path")?.ok_or_else(|| {
        Error::key(
            &src,
            "dataset_path",
            "missing (json, csv, parquet or a hub id)",
        )
    })?;
    let output_type: OutputType =
        typed(&src, &map, "output_type")?.unwrap_or(OutputType::GenerateUntil);
    let repeats: Option<u64> = typed(&src, &map, "repeats")?;
    if repeats.is_some_and(|r| r != 1) {
        return Err(Error::key(&src, "repeats", "only 1 is supported"));
    }
    let fewshot_delimiter =
        opt_string(&src, &map, "fewshot_delimiter")?.unwrap_or_else(|| "\n\n".into());
    let mut generation_kwargs: Option<GenerationKwargs> = typed(&src, &map, "generation_kwargs")?;
    if output_type == OutputType::GenerateUntil {
        // lm-eval's defaults: greedy, until the few-shot delimiter.
        let g = generation_kwargs.get_or_insert(GenerationKwargs {
            until: None,
            max_gen_toks: None,
            max_new_tokens: None,
            do_sample: false,
            temperature: Some(0.0),
            top_p: None,
            top_k: None,
        });
        match &g.until {
            None | Some(Value::Null) => {
                g.until = Some(Value::from(vec![fewshot_delimiter.clone()]))
            }
            Some(Value::String(_)) => {}
            Some(Value::Array(v)) if v.iter().all(Value::is_string) => {}
            Some(_) => {
                return Err(Error::key(
                    &src,
                    "generation_kwargs.until",
                    "expected a string or a list of strings",
                ))
            }
        }
        let max = g.max_gen_toks.or(g.max_new_tokens).unwrap_or(256);
        if max == 0 || max > crate::generate::MAX_NEW_TOKENS_LIMIT {
            return Err(Error::key(
                &src,
                "generation_kwargs.max_gen_toks",
                format!(
                    "{max}: expected 1 to {}",
                    crate::generate::MAX_NEW_TOKENS_LIMIT
                ),
            ));
        }
        // Sampling values are checked here, by file and key, not after the model has loaded
        // (where they were named as `generation config: key ...`).
        if let Some(x) = g.temperature.filter(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(Error::key(
                &src,
                "generation_kwargs.temperature",
                format!("{}: expected a number >= 0", crate::error::shown(x)),
            ));
        }
        if let Some(p) = g.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(Error::key(
                &src,
                "generation_kwargs.top_p",
                format!("{}: expected a number in (0, 1]", crate::error::shown(p)),
            ));
        }
        if g.top_k == Some(0) {
            return Err(Error::key(
                &src,
                "generation_kwargs.top_k",
                "0: expected at least 1",
            ));
        }
    }
    let metric_list: Vec<MetricSpec> = match map.get("metric_list") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value(v.clone()).map_err(|e| {
                    Error::key(
                        &src,
                        format!("metric_list[{i}]"),
                        format!("{} such as {{metric: acc}}", serde_msg(&e)),
                    )
                })
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(Error::key(
                &src,
                "metric_list",
                "expected a list of {metric: NAME} entries",
            ))
        }
    };
    let metric_list = if metric_list.is_empty() {
        default_metrics(output_type)
    } else {
        metric_list
    };
    for (i, m) in metric_list.iter().enumerate() {
        if !super::metrics::supported(output_type, &m.metric) {
            return Err(Error::key(
                &src,
                format!("metric_list[{i}].metric"),
                format!(
                    "`{}` is not a metric of {} tasks here (supported: {})",
                    m.metric,
                    output_type.as_str(),
                    super::metrics::names(output_type).join(", ")
                ),
            ));
        }
        for r in &m.regexes_to_ignore {
            fancy_regex::Regex::new(r).map_err(|e| {
                Error::key(
                    &src,
                    format!("metric_list[{i}].regexes_to_ignore"),
                    format!("`{r}`: {e}"),
                )
            })?;
        }
    }
    let fewshot: FewshotConfig = typed(&src, &map, "fewshot_config")?.unwrap_or_default();
    if let Some(s) = fewshot.sampler.as_deref() {
        if s != "default" && s != "first_n" {
            return Err(Error::key(
                &src,
                "fewshot_config.sampler",
                format!("`{s}`: expected `default` (seeded random) or `first_n`"),
            ));
        }
    }
    let num_fewshot: Option<usize> = typed(&src, &map, "num_fewshot")?;
    let dataset_kwargs: DatasetKwargs = typed(&src, &map, "dataset_kwargs")?.unwrap_or_default();
    dataset_kwargs.files(&src)?;
    let version = map
        .get("metadata")
        .and_then(|m| m.get("version"))
        .cloned()
        .unwrap_or(Value::from("Yaml"));
    let doc_to_choice = doc_to(&src, &map, "doc_to_choice")?;
    if output_type == OutputType::MultipleChoice && doc_to_choice.is_none() {
        return Err(Error::key(
            &src,
            "doc_to_choice",
            "missing: a multiple_choice task lists its choices",
        ));
    }
    Ok(TaskConfig {
        task,
        alias: opt_string(&src, &map, "task_alias")?,
        file: path.to_path_buf(),
        dataset_path,
        dataset_name: opt_string(&src, &map, "dataset_name")?,
        dataset_kwargs,
        training_split: opt_string(&src, &map, "training_split")?,
        validation_split: opt_string(&src, &map, "validation_split")?,
        test_split: opt_string(&src, &map, "test_split")?,
        fewshot_split: opt_string(&src, &map, "fewshot_split")?,
        doc_to_text: doc_to(&src, &map, "doc_to_text")?,
        doc_to_target: doc_to(&src, &map, "doc_to_target")?,
        doc_to_choice,
        description: opt_string(&src, &map, "description")?.unwrap_or_default(),
        target_delimiter: opt_string(&src, &map, "target_delimiter")?.unwrap_or_else(|| " ".into()),
        fewshot_delimiter,
        fewshot,
        num_fewshot,
        output_type,
        generation_kwargs,
        metric_list,
        version,
        raw: map,
    })
}

/// lm-eval's metrics for a task that lists none.
fn default_metrics(t: OutputType) -> Vec<MetricSpec> {
    let names: &[&str] = match t {
        OutputType::MultipleChoice => &["acc", "acc_norm"],
        OutputType::Loglikelihood => &["perplexity", "acc"],
        OutputType::LoglikelihoodRolling => {
            &["word_perplexity", "byte_perplexity", "bits_per_byte"]
        }
        OutputType::GenerateUntil => &["exact_match"],
    };
    names
        .iter()
        .map(|m| MetricSpec {
            metric: (*m).into(),
            aggregation: None,
            higher_is_better: None,
            ignore_case: false,
            ignore_punctuation: false,
            ignore_numbers: false,
            regexes_to_ignore: Vec::new(),
        })
        .collect()
}

/// Tasks shipped with ferrotune (`tasks/` in the repository), built into the binary.
pub const SHIPPED: &[(&str, &str)] = &[
    ("sst2", include_str!("../../../../tasks/sst2.yaml")),
    (
        "dialogsum",
        include_str!("../../../../tasks/dialogsum.yaml"),
    ),
    (
        "self_instruct",
        include_str!("../../../../tasks/self_instruct.yaml"),
    ),
    (
        "mmlu_abstract_algebra",
        include_str!("../../../../tasks/hub/mmlu_abstract_algebra.yaml"),
    ),
    (
        "hellaswag",
        include_str!("../../../../tasks/hub/hellaswag.yaml"),
    ),
    (
        "arc_easy",
        include_str!("../../../../tasks/hub/arc_easy.yaml"),
    ),
    (
        "arc_challenge",
        include_str!("../../../../tasks/hub/arc_challenge.yaml"),
    ),
    ("boolq", include_str!("../../../../tasks/hub/boolq.yaml")),
    ("piqa", include_str!("../../../../tasks/hub/piqa.yaml")),
    (
        "winogrande",
        include_str!("../../../../tasks/hub/winogrande.yaml"),
    ),
];

/// Where a shipped task's relative paths resolve: the repository's `tasks/` folder when the
/// binary runs from a checkout, else the working directory.
pub fn shipped_path(name: &str) -> PathBuf {
    let sub = if matches!(name, "sst2" | "dialogsum" | "self_instruct") {
        format!("{name}.yaml")
    } else {
        format!("hub/{name}.yaml")
    };
    let repo_tasks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tasks");
    if repo_tasks.is_dir() {
        repo_tasks.join(sub)
    } else {
        Path::new("tasks").join(sub)
    }
}

/// The tasks `--tasks` names: comma-separated YAML files, folders of YAML files, or shipped
/// task names. A group expands to its members (named ones looked up among the files of the
/// group's folder, then the shipped tasks).
pub fn resolve_tasks(spec: &str) -> Result<(Vec<TaskConfig>, Vec<GroupConfig>)> {
    let mut tasks: Vec<TaskConfig> = Vec::new();
    let mut groups = Vec::new();
    let items: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err(Error::key(
            "bench",
            "tasks",
            "expected a task name, YAML file or folder",
        ));
    }
    for item in items {
        let p = Path::new(item);
        let files: Vec<PathBuf> = if p.is_dir() {
            yaml_files(p)?
        } else if p.is_file() {
            vec![p.to_path_buf()]
        } else if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == item) {
            let path = shipped_path(item);
            match parse_task_file(&path, Some(text))? {
                TaskFile::Task(t) => tasks.push(*t),
                TaskFile::Group(g) => groups.push(g),
            }
            continue;
        } else {
            let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
            return Err(Error::key(
                "bench",
                "tasks",
                format!(
                    "`{item}` is not a file, a folder or a shipped task (shipped: {})",
                    names.join(", ")
                ),
            ));
        };
        if files.is_empty() {
            return Err(Error::file(p, "no .yaml task files in this folder"));
        }
        for f in files {
            match parse_task_file(&f, None)? {
                TaskFile::Task(t) => tasks.push(*t),
                TaskFile::Group(g) => groups.push(g),
            }
        }
    }
    // Expand groups: members named by task name resolve among the files beside the group.
    for g in &groups {
        for m in &g.members {
            match m {
                GroupMember::Inline(t) => push_unique(&mut tasks, (**t).clone()),
                GroupMember::Name(name) => {
                    if tasks.iter().any(|t| &t.task == name) {
                        continue;
                    }
                    let t = find_named(g, name)?;
                    push_unique(&mut tasks, t);
                }
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for t in &tasks {
        if !seen.insert(t.task.clone()) {
            return Err(Error::key(
                t.file.display().to_string(),
                "task",
                format!("`{}` is named by two task files", t.task),
            ));
        }
    }
    Ok((tasks, groups))
}

fn push_unique(tasks: &mut Vec<TaskConfig>, t: TaskConfig) {
    if !tasks.iter().any(|x| x.task == t.task) {
        tasks.push(t);
    }
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
        let p = e.map_err(|e| Error::file(dir, e))?.path();
        let ext_ok = p.extension().is_some_and(|x| x == "yaml" || x == "yml");
        if p.is_file() && ext_ok {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn find_named(g: &GroupConfig, name: &str) -> Result<TaskConfig> {
    let dir = g.file.parent().unwrap_or(Path::new("."));
    if let Ok(files) = yaml_files(dir) {
        for f in files {
            if let Ok(TaskFile::Task(t)) = parse_task_file(&f, None) {
                if t.task == name {
                    return Ok(*t);
                }
            }
        }
    }
    if let Some((_, text)) = SHIPPED.iter().find(|(n, _)| *n == name) {
        if let TaskFile::Task(t) = parse_task_file(&shipped_path(name), Some(text))? {
            return Ok(*t);
        }
    }
    Err(Error::key(
        g.file.display().to_string(),
        "task",
        format!(
            "member `{name}`: no task of that name in {} or among the shipped tasks",
            dir.display()
        ),
    ))
}
