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

/// [`write_hf_folder_dtype`] for a model and its tokenizer (a trained model of a run).
pub fn write_model_folder(
    model: &dyn Model,
    tok: &crate::tokenizer::Tokenizer,
    dir: &Path,
    dtype: DType,
) -> Result<()> {
    // First, so a config that cannot be written fails before any file is.
    let mut cfg = model.hf_config()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let sd = model.state_dict(dtype)?;
    write_safetensors(&dir.join("model.safetensors"), &sd)?;

    cfg["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap().as_bytes(),
    )?;

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
