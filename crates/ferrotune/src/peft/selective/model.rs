//! Choosing the trained parameters, saving the changed tensors, and putting them onto a base.
use super::config::{Rules, SelectiveConfig, CONFIG_FILE, PEFT_TYPE, WEIGHTS_FILE};
use crate::fsutil::{write_atomic, write_safetensors};
use crate::model::Model;
use crate::nn::{EmbeddingWeight, LinearWeight};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Make the parameters `cfg` selects trainable and return them by HF name; everything else
/// stays frozen (no gradient). `modules` alone keeps the model's own module selection.
pub fn select(model: &mut dyn Model, cfg: &SelectiveConfig) -> Result<Vec<(String, Var)>> {
    if cfg.modules_only() {
        return model.make_trainable(cfg.modules.as_deref());
    }
    let rules = Rules::new(cfg)?;
    let all = model.make_trainable(None)?;
    if cfg.bitfit && !all.iter().any(|(n, _)| n.ends_with("bias")) {
        freeze_all(model);
        return Err(Error::msg(format!(
            "[selective] bitfit = true: {} has no biases to train (BitFit needs a family with them, such as BERT); select by regex or layers instead",
            model.describe()
        )));
    }
    let kept: Vec<(String, Var)> = all.into_iter().filter(|(n, _)| rules.selects(n)).collect();
    let keep: HashSet<_> = kept.iter().map(|(_, v)| v.as_tensor().id()).collect();
    freeze_except(model, &keep);
    Ok(kept)
}

/// Turn every trainable linear / embedding weight and linear bias not in `keep` back into a
/// plain tensor (same values), so no gradient is computed for it.
fn freeze_except(model: &mut dyn Model, keep: &HashSet<candle_core::TensorId>) {
    for lin in model.linears_mut() {
        if let LinearWeight::Trainable(v) = lin.weight() {
            if !keep.contains(&v.as_tensor().id()) {
                let t = v.as_tensor().detach();
                lin.set_weight(LinearWeight::Frozen(t));
            }
        }
        if let Some(b) = lin.bias() {
            if !keep.contains(&b.id()) {
                let t = b.detach();
                lin.set_bias(Some(t));
            }
        }
    }
    for e in model.embeddings_mut() {
        if let EmbeddingWeight::Trainable(v) = e.weight() {
            if !keep.contains(&v.as_tensor().id()) {
                let t = v.as_tensor().detach();
                e.set_weight(EmbeddingWeight::Frozen(t));
            }
        }
    }
}

fn freeze_all(model: &mut dyn Model) {
    freeze_except(model, &HashSet::new())
}

/// Write the trained tensors (`vars`, f32, by HF name) as [`WEIGHTS_FILE`] and the rules with
/// the base model and the tensor names as [`CONFIG_FILE`] in `dir`.
pub fn save(
    model: &dyn Model,
    vars: &[(String, Var)],
    cfg: &SelectiveConfig,
    base_model: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    let mut json = serde_json::to_value(cfg).expect("the config always serializes");
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    json["peft_type"] = PEFT_TYPE.into();
    json["base_model_name_or_path"] = base_model.into();
    json["task_type"] = model.task_type().as_peft().into();
    json["tensors"] = names.into();
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&json)
            .expect("JSON")
            .as_bytes(),
    )
}

/// Whether `dir` holds a selective run's changed tensors.
pub fn is_selective_dir(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file()
}

/// Put the changed tensors in `dir` onto `model` (its weights become those of the trained
/// model; nothing is attached, so there is nothing to disable). Every tensor must be a
/// parameter of the model with the same shape, checked from the file's header before any is
/// read. Returns the number of tensors set.
pub fn apply(model: &mut dyn Model, dir: &Path) -> Result<usize> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = crate::fsutil::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
    if v.get("peft_type").and_then(|t| t.as_str()) != Some(PEFT_TYPE) {
        return Err(Error::key(
            cfg_path.display().to_string(),
            "peft_type",
            format!("must be \"{PEFT_TYPE}\""),
        ));
    }
    let path = dir.join(WEIGHTS_FILE);
    let shapes = crate::peft::format::header_shapes(&path)?;
    // Every parameter by HF name (a dense model: its weights become f32 variables here, and
    // are frozen again below).
    let params = model.make_trainable(None).map_err(|e| {
        Error::file(
            &path,
            format!(
                "cannot put full weights onto this base ({}); load it dense (--dequantize)",
                crate::error::first_line(&e.to_string())
            ),
        )
    })?;
    let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    for name in &names {
        let Some(var) = by_name.get(name.as_str()) else {
            freeze_all(model);
            return Err(Error::file(
                &path,
                format!("tensor `{name}` is no parameter of {}", model.describe()),
            ));
        };
        if var.dims() != shapes[*name].as_slice() {
            let want = var.dims().to_vec();
            freeze_all(model);
            return Err(Error::file(
                &path,
                format!(
                    "tensor `{name}` has shape {:?}, the model's {want:?}",
                    shapes[*name]
                ),
            ));
        }
    }
    let tensors = crate::peft::format::load_finite(&path, model.device())?;
    for (name, t) in &tensors {
        by_name[name.as_str()].set(&t.to_dtype(DType::F32)?)?;
    }
    freeze_all(model);
    Ok(tensors.len())
}
