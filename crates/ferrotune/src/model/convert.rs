//! Write a loaded model as a Hugging Face folder (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json, and generation_config.json for models that generate)
//! that transformers loads.
//! Quantized weights are dequantized to f32. Every file is written atomically
//! ([`crate::fsutil`]). The weights and the config come from the family ([`Model::state_dict`],
//! [`Model::hf_config`]), so every family converts the same way.
use super::{LoadedModel, Model};
use crate::fsutil::{write_atomic, write_safetensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Every weight of the model under its HF name, as `dtype`.
pub fn state_dict(lm: &LoadedModel, dtype: DType) -> Result<HashMap<String, Tensor>> {
    lm.model.state_dict(dtype)
}

pub fn write_hf_folder(lm: &LoadedModel, dir: &Path) -> Result<()> {
    write_hf_folder_dtype(lm, dir, DType::F32)
}

pub fn write_hf_folder_dtype(lm: &LoadedModel, dir: &Path, dtype: DType) -> Result<()> {
    write_model_folder(&*lm.model, &lm.tokenizer, dir, dtype)
}

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// transformers' `convert_file_size_to_int`: `"5GB"` (10^9), `"500MB"`, `"2GiB"` (2^30),
/// `"100KB"`, or a plain number of bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let up = t.to_ascii_uppercase();
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| up.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((up.clone(), 1));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"5GB\", \"500MB\" or \"2GiB\""))?;
    if !(v.is_finite() && v >= 1.0) {
        return Err(format!("`{s}` must be at least 1 byte"));
    }
    Ok((v * mult as f64) as u64)
}

/// [`write_hf_folder_dtype`] for a model and its tokenizer (a trained model of a run).
pub fn write_model_folder(
    model: &dyn Model,
    tok: &crate::tokenizer::Tokenizer,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    write_model_folder_sharded(model, tok, dir, dtype, DEFAULT_MAX_SHARD_BYTES)
}

/// Split tensors into shards of at most `max_bytes` as huggingface_hub's
/// `split_state_dict_into_shards` does (in name order: a tensor that does not fit the current
/// shard starts the next; one larger than `max_bytes` gets a shard of its own).
pub fn plan_shards(sizes: &[(String, u64)], max_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut current_bytes = 0u64;
    for (name, bytes) in sizes {
        if *bytes > max_bytes {
            shards.push(vec![name.clone()]);
            continue;
        }
        if !current.is_empty() && current_bytes + bytes > max_bytes {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(name.clone());
        current_bytes += bytes;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Write the weights as `model.safetensors`, or, when they exceed `max_bytes`, as
/// `model-00001-of-0000N.safetensors` shards with `model.safetensors.index.json`
/// (`{"metadata": {"total_size"}, "weight_map": {name: file}}`), as transformers'
/// `save_pretrained(max_shard_size=...)` writes them.
pub fn write_weights_sharded(
    dir: &Path,
    sd: &HashMap<String, Tensor>,
    max_bytes: u64,
) -> Result<usize> {
    let mut sizes: Vec<(String, u64)> = sd
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                (t.elem_count() * t.dtype().size_in_bytes()) as u64,
            )
        })
        .collect();
    sizes.sort();
    let shards = plan_shards(&sizes, max_bytes);
    // A folder written before with another layout must not keep stale files beside this one.
    let index_path = dir.join("model.safetensors.index.json");
    for e in std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        let stale = name == "model.safetensors.index.json"
            || name == "model.safetensors"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if stale {
            std::fs::remove_file(e.path()).map_err(|err| Error::file(e.path(), err))?;
        }
    }
    if shards.len() <= 1 {
        write_safetensors(&dir.join("model.safetensors"), sd)?;
        return Ok(1);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let part: HashMap<String, Tensor> =
            names.iter().map(|k| (k.clone(), sd[k].clone())).collect();
        write_safetensors(&dir.join(&file), &part)?;
        for k in names {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    let total: u64 = sizes.iter().map(|(_, b)| b).sum();
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    write_atomic(
        &index_path,
        serde_json::to_string_pretty(&index).unwrap().as_bytes(),
    )?;
    Ok(n)
}

/// [`write_model_folder`] with the weights split into shards of at most `max_shard_bytes`.
pub fn write_model_folder_sharded(
    model: &dyn Model,
    tok: &crate::tokenizer::Tokenizer,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    // First, so a config that cannot be written fails before any file is.
    let mut cfg = model.hf_config()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let sd = model.state_dict(dtype)?;
    write_weights_sharded(dir, &sd, max_shard_bytes)?;

    cfg["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    let cfg_text = serde_json::to_string_pretty(&cfg)
        .map_err(|e| Error::msg(format!("cannot serialize config.json: {e}")))?;
    write_atomic(&dir.join("config.json"), cfg_text.as_bytes())?;
    write_folder_extras(model, tok, dir, &cfg)
}

/// The files of an HF folder besides its config and weights: tokenizer.json,
/// tokenizer_config.json and, for a model that generates, generation_config.json (from `cfg`,
/// the config.json written).
pub fn write_folder_extras(
    model: &dyn Model,
    tok: &crate::tokenizer::Tokenizer,
    dir: &Path,
    cfg: &serde_json::Value,
) -> Result<()> {
    let tok_json = tok
        .inner()
        .to_string(true)
        .map_err(|e| Error::msg(format!("cannot serialize the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    // The source's BOS behaviour: a folder that dropped (or added) BOS would encode prompts
    // differently from the model it was written from.
    let mut tcfg = serde_json::json!({ "add_bos_token": tok.add_bos() });
    if let Some(n) = model.context_length() {
        tcfg["model_max_length"] = n.into();
    }
    if let Some(t) = tok.chat_template() {
        tcfg["chat_template"] = t.source().into();
    }
    if let Some(b) = tok.bos_token() {
        tcfg["bos_token"] = b.into();
    }
    if let Some(e) = tok.eos_token() {
        tcfg["eos_token"] = e.into();
    }
    if let Some(u) = tok.unk_token() {
        tcfg["unk_token"] = u.into();
    }
    if let Some(p) = tok.pad_id().and_then(|id| tok.inner().id_to_token(id)) {
        tcfg["pad_token"] = p.into();
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tcfg).unwrap().as_bytes(),
    )?;
    // An encoder does not generate: transformers writes no generation_config.json for it.
    if model.kind() == super::ArchitectureKind::Encoder {
        return Ok(());
    }
    // generation_config.json: the config's special tokens, the tokenizer's EOS ids first.
    let mut gen = serde_json::json!({});
    for key in ["bos_token_id", "decoder_start_token_id", "pad_token_id"] {
        if let Some(v) = cfg.get(key).filter(|v| !v.is_null()) {
            if key == "bos_token_id" || model.kind() == super::ArchitectureKind::EncoderDecoder {
                gen[key] = v.clone();
            }
        }
    }
    let eos: Vec<u32> = if tok.eos_ids().is_empty() {
        match cfg.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|e| e as u32).into_iter().collect()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|e| e.as_u64().map(|e| e as u32))
                .collect(),
            _ => Vec::new(),
        }
    } else {
        tok.eos_ids().to_vec()
    };
    if !eos.is_empty() {
        gen["eos_token_id"] = if eos.len() == 1 {
            eos[0].into()
        } else {
            eos.into()
        };
    }
    write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&gen).unwrap().as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shard_plans_as_transformers() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100kb").unwrap(), 100_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0GB").is_err());
        let sizes: Vec<(String, u64)> = [("a", 40), ("b", 50), ("c", 200), ("d", 30), ("e", 70)]
            .iter()
            .map(|(n, b)| (n.to_string(), *b))
            .collect();
        // huggingface_hub's split: a tensor over the limit gets its own shard at once, ahead
        // of the shard still being filled.
        assert_eq!(
            plan_shards(&sizes, 100),
            vec![vec!["c"], vec!["a", "b"], vec!["d", "e"]]
        );
        assert_eq!(plan_shards(&sizes, 1000).len(), 1);
    }
}
