//! Write a loaded model as a Hugging Face folder (config.json, model.safetensors,
//! tokenizer.json, tokenizer_config.json, generation_config.json) that transformers loads.
//! Quantized weights are dequantized to f32. Every file is written atomically.
use super::LoadedModel;
use crate::nn::EmbeddingWeight;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Write `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::file(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))
}

/// Every weight of the model under its HF name, as f32 (or `dtype`).
pub fn state_dict(lm: &LoadedModel, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let m = &lm.model;
    let mut sd = HashMap::new();
    let emb = match m.embed_tokens.weight() {
        EmbeddingWeight::Frozen(t) => t.clone(),
        EmbeddingWeight::Trainable(v) => v.as_tensor().clone(),
        EmbeddingWeight::Quantized(q) => q.dequantize()?,
    };
    sd.insert(
        "model.embed_tokens.weight".to_string(),
        emb.to_dtype(dtype)?,
    );
    for lin in m.linears() {
        if lin.name() == "lm_head" && m.cfg.tie_word_embeddings {
            continue;
        }
        sd.insert(
            format!("{}.weight", lin.name()),
            lin.weight().to_dense_f32()?.to_dtype(dtype)?,
        );
        if let Some(b) = lin.bias() {
            sd.insert(format!("{}.bias", lin.name()), b.to_dtype(dtype)?);
        }
    }
    for (i, l) in m.layers.iter().enumerate() {
        sd.insert(
            format!("model.layers.{i}.input_layernorm.weight"),
            l.input_layernorm.weight().to_dtype(dtype)?,
        );
        sd.insert(
            format!("model.layers.{i}.post_attention_layernorm.weight"),
            l.post_attention_layernorm.weight().to_dtype(dtype)?,
        );
    }
    sd.insert(
        "model.norm.weight".to_string(),
        m.norm.weight().to_dtype(dtype)?,
    );
    Ok(sd)
}

pub fn write_hf_folder(lm: &LoadedModel, dir: &Path) -> Result<()> {
    write_hf_folder_dtype(lm, dir, DType::F32)
}

pub fn write_hf_folder_dtype(lm: &LoadedModel, dir: &Path, dtype: DType) -> Result<()> {
    // First, so a config that cannot be written fails before any file is.
    let mut cfg = lm.model.cfg.to_hf_json()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let sd = state_dict(lm, dtype)?;
    let st_tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&sd, &st_tmp).map_err(|e| Error::file(&st_tmp, e))?;
    std::fs::rename(&st_tmp, dir.join("model.safetensors")).map_err(|e| Error::file(dir, e))?;

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

    let tok = &lm.tokenizer;
    let tok_json = tok
        .inner()
        .to_string(true)
        .map_err(|e| Error::msg(format!("cannot serialize the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), tok_json.as_bytes())?;
    // The source's BOS behaviour: a folder that dropped (or added) BOS would encode prompts
    // differently from the model it was written from.
    let mut tcfg = serde_json::json!({ "model_max_length": lm.model.cfg.max_position_embeddings, "add_bos_token": tok.add_bos() });
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
    let mut gen = serde_json::json!({});
    if let Some(b) = lm.model.cfg.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    let eos: Vec<u32> = if tok.eos_ids().is_empty() {
        lm.model.cfg.eos_token_ids.clone()
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
