//! `hf:org/name[@revision]` through the hf-hub crate (files land in the usual HF cache,
//! `$HF_HOME/hub`, so Python tools share them).
use super::ModelSource;
use crate::{Error, Result};
use std::path::PathBuf;

pub fn download(spec: &str) -> Result<ModelSource> {
    let (repo_part, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    let parts: Vec<&str> = repo_part.split('/').collect();
    if parts.len() < 2 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(Error::msg(format!(
            "--model hf:{spec}: expected hf:org/name[@revision] or hf:org/name/file.gguf"
        )));
    }
    check_spec(spec, &parts, &revision)?;
    let repo_id = format!("{}/{}", parts[0], parts[1]);
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::msg(format!("hf:{spec}: cannot start the Hub client: {e}")))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_id.clone(),
        hf_hub::RepoType::Model,
        revision,
    ));
    let mut get = |f: &str| {
        repo.get(f)
            .map_err(|e| crate::error::first_line(&e.to_string()))
    };
    if parts.len() > 2 {
        let file = parts[2..].join("/");
        return Ok(ModelSource::Gguf(
            get(&file).map_err(|e| download_error(spec, &file, &e))?,
        ));
    }
    Ok(ModelSource::HfDir(fetch_hf_folder(spec, &mut get)?))
}

/// The Hub's own rules for the parts of `hf:org/name[/file][@revision]`, checked before any
/// request: an org or name of letters, digits, `-`, `_` and `.` (not `.` or `..`), a file path
/// without empty, `.` or `..` components, a revision without `..`. The parts become paths of
/// the local cache, so nothing may climb out of it.
fn check_spec(spec: &str, parts: &[&str], revision: &str) -> Result<()> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let bad = |what: String| Err(Error::msg(format!("--model hf:{spec}: {what}")));
    for (what, s) in [("org", parts[0]), ("name", parts[1])] {
        if !name_ok(s) {
            return bad(format!(
                "`{}` is not a Hub {what} (letters, digits, `-`, `_` and `.`)",
                s.escape_debug()
            ));
        }
    }
    if parts[2..]
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == ".." || c.chars().any(char::is_control))
    {
        return bad(format!(
            "the file path `{}` must be a plain relative path (no empty, `.` or `..` parts)",
            parts[2..].join("/").escape_debug()
        ));
    }
    if revision.is_empty()
        || revision.contains("..")
        || revision.starts_with('/')
        || revision
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return bad(format!("`{}` is not a revision", revision.escape_debug()));
    }
    Ok(())
}

/// `hf:org/name[@revision]`'s config.json alone (what `plan` reads; no weights, no tokenizer):
/// the cache folder holding it.
pub fn download_config(spec: &str) -> Result<ModelSource> {
    let (repo_part, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    let parts: Vec<&str> = repo_part.split('/').collect();
    if parts.len() != 2 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(Error::msg(format!(
            "--model hf:{spec}: expected hf:org/name[@revision] or hf:org/name/file.gguf"
        )));
    }
    check_spec(spec, &parts, &revision)?;
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| Error::msg(format!("hf:{spec}: cannot start the Hub client: {e}")))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_part.to_string(),
        hf_hub::RepoType::Model,
        revision,
    ));
    let config = repo.get("config.json").map_err(|e| {
        download_error(
            spec,
            "config.json",
            &crate::error::first_line(&e.to_string()),
        )
    })?;
    Ok(ModelSource::HfDir(
        config
            .parent()
            .ok_or_else(|| Error::msg("hub cache path has no parent"))?
            .to_path_buf(),
    ))
}

/// Files of an HF model folder fetched when the repository has them: what
/// `Tokenizer::from_hf_dir` reads besides tokenizer.json (`chat_template.jinja` is where
/// transformers >= 4.43 saves the chat template).
pub const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn download_error(spec: &str, file: &str, why: &str) -> Error {
    Error::msg(format!("hf:{spec}: cannot download `{file}`: {why}"))
}

/// Fetch an HF model folder through `get` (a file name -> its local path, or why not; a file
/// the repository lacks is an error too): config.json and tokenizer.json (or spiece.model
/// where the repository has no tokenizer.json), each of
/// [`OPTIONAL_FILES`] the repository has, and the weights, that is the shards
/// `model.safetensors.index.json` lists (names that would leave the folder are refused) or
/// `model.safetensors`. Returns the local folder.
fn fetch_hf_folder(
    spec: &str,
    get: &mut dyn FnMut(&str) -> std::result::Result<PathBuf, String>,
) -> Result<PathBuf> {
    let mut fetch = |f: &str| get(f).map_err(|e| download_error(spec, f, &e));
    let config = fetch("config.json")?;
    // A T5 repository may hold only its SentencePiece model; the tokenizer loader reads
    // spiece.model when there is no tokenizer.json.
    if let Err(json_err) = get("tokenizer.json") {
        get("spiece.model").map_err(|_| {
            download_error(
                spec,
                "tokenizer.json",
                &format!("{json_err} (and there is no spiece.model either)"),
            )
        })?;
    }
    let mut fetch = |f: &str| get(f).map_err(|e| download_error(spec, f, &e));
    for optional in OPTIONAL_FILES {
        let _ = fetch(optional);
    }
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let text = crate::fsutil::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                // The name becomes a path in the local cache: it must not climb out of it.
                super::weights::check_relative_name(&s).map_err(|e| Error::file(&index, e))?;
                fetch(&s)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    Ok(config
        .parent()
        .ok_or_else(|| Error::msg("hub cache path has no parent"))?
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    #[test]
    fn malformed_hub_specs_are_one_line_errors() {
        for spec in ["", "org", "org/", "/name"] {
            let e = super::download(spec).unwrap_err().to_string();
            assert!(e.contains("expected hf:org/name"), "{spec}: {e}");
            assert_eq!(e.lines().count(), 1);
        }
    }

    /// Offline (no network here): the failure names the repo and the file it tried.
    #[test]
    fn unreachable_hub_names_the_file() {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let home = std::env::temp_dir().join(format!("ferrotune-hf-home-{}", std::process::id()));
        std::env::set_var("HF_HOME", &home);
        let e = super::download("no-such-org/no-such-model")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no-such-org/no-such-model") && e.contains("config.json"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(home);
    }

    /// A stand-in for the Hub: `remote` holds the repository's files; fetching copies one into
    /// `local` (the cache folder) and records its name.
    fn fake_hub<'a>(
        remote: &Path,
        local: &Path,
        fetched: &'a mut Vec<String>,
    ) -> impl FnMut(&str) -> Result<PathBuf, String> + 'a {
        let (remote, local) = (remote.to_path_buf(), local.to_path_buf());
        move |f: &str| {
            let from = remote.join(f);
            if !from.is_file() {
                return Err("404 Not Found".into());
            }
            let to = local.join(f);
            std::fs::copy(&from, &to).map_err(|e| e.to_string())?;
            fetched.push(f.to_string());
            Ok(to)
        }
    }

    fn repo_with(files: &[(&str, &str)]) -> (PathBuf, PathBuf) {
        // One folder per call: tests run in parallel.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("ferrotune-hub-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (remote, local) = (root.join("remote"), root.join("local"));
        std::fs::create_dir_all(&remote).unwrap();
        std::fs::create_dir_all(&local).unwrap();
        for (name, text) in files {
            std::fs::write(remote.join(name), text).unwrap();
        }
        (remote, local)
    }

    #[test]
    fn hf_folder_fetch_includes_chat_template_jinja_when_the_repo_has_it() {
        let base = [
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("tokenizer_config.json", "{}"),
            ("model.safetensors", ""),
        ];
        let (remote, local) = repo_with(&base);
        let mut fetched = Vec::new();
        let dir = super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched));
        assert_eq!(dir.unwrap(), local);
        assert!(
            !fetched.iter().any(|f| f == "chat_template.jinja"),
            "{fetched:?}"
        );

        let mut with_template = base.to_vec();
        with_template.push(("chat_template.jinja", "{{ messages }}"));
        let (remote, local) = repo_with(&with_template);
        let mut fetched = Vec::new();
        super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched)).unwrap();
        assert!(
            fetched.iter().any(|f| f == "chat_template.jinja"),
            "{fetched:?}"
        );
        assert!(local.join("chat_template.jinja").is_file());
        assert!(
            fetched.iter().any(|f| f == "model.safetensors"),
            "{fetched:?}"
        );
    }

    #[test]
    fn hf_folder_fetch_takes_spiece_model_when_there_is_no_tokenizer_json() {
        let (remote, local) = repo_with(&[
            ("config.json", "{}"),
            ("spiece.model", "x"),
            ("model.safetensors", ""),
        ]);
        let mut fetched = Vec::new();
        let dir = super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched));
        assert_eq!(dir.unwrap(), local);
        assert!(local.join("spiece.model").is_file(), "{fetched:?}");
        // With a tokenizer.json, spiece.model is not needed.
        let (remote, local) = repo_with(&[
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("spiece.model", "x"),
            ("model.safetensors", ""),
        ]);
        let mut fetched = Vec::new();
        super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched)).unwrap();
        assert!(!fetched.iter().any(|f| f == "spiece.model"), "{fetched:?}");
        // Neither: one line naming tokenizer.json and spiece.model.
        let (remote, local) = repo_with(&[("config.json", "{}"), ("model.safetensors", "")]);
        let mut fetched = Vec::new();
        let e = super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("spiece.model") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn hf_folder_fetch_gets_the_indexed_shards_and_refuses_escaping_names() {
        let index = r#"{"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors", "c": "model-00001.safetensors"}}"#;
        let (remote, local) = repo_with(&[
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("model.safetensors.index.json", index),
            ("model-00001.safetensors", ""),
            ("model-00002.safetensors", ""),
        ]);
        let mut fetched = Vec::new();
        super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched)).unwrap();
        let shards: Vec<&String> = fetched.iter().filter(|f| f.starts_with("model-")).collect();
        assert_eq!(
            shards,
            ["model-00001.safetensors", "model-00002.safetensors"]
        );

        for bad in ["../x.safetensors", "/etc/x.safetensors"] {
            let index = format!(r#"{{"weight_map": {{"a": "{bad}"}}}}"#);
            let (remote, local) = repo_with(&[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("model.safetensors.index.json", &index),
            ]);
            let mut fetched = Vec::new();
            let e = super::fetch_hf_folder("o/n", &mut fake_hub(&remote, &local, &mut fetched))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("model.safetensors.index.json") && e.contains(bad) && !e.contains('\n'),
                "{e}"
            );
            assert!(!fetched.iter().any(|f| f == bad), "{fetched:?}");
        }
    }
}
