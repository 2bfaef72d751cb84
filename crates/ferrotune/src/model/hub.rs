//! `hf:org/name[@revision]` through the hf-hub crate (files land in the usual HF cache,
//! `$HF_HOME/hub`, so Python tools share them).
use super::ModelSource;
use crate::{Error, Result};

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
    let fetch = |f: &str| {
        repo.get(f).map_err(|e| {
            Error::msg(format!(
                "hf:{spec}: cannot download `{f}`: {}",
                crate::error::first_line(&e.to_string())
            ))
        })
    };
    if parts.len() > 2 {
        let file = parts[2..].join("/");
        return Ok(ModelSource::Gguf(fetch(&file)?));
    }
    let config = fetch("config.json")?;
    fetch("tokenizer.json")?;
    for optional in [
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
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
                fetch(&s)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    let dir = config
        .parent()
        .ok_or_else(|| Error::msg("hub cache path has no parent"))?
        .to_path_buf();
    Ok(ModelSource::HfDir(dir))
}

#[cfg(test)]
mod tests {
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
}
