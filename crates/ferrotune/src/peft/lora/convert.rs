//! A PiSSA / OLoRA adapter for the ORIGINAL base, as PEFT's
//! `save_pretrained(path_initial_model_for_weight_conversion=...)` writes it
//! (`LoraModel.subtract_mutated_init`).
//!
//! Training ran on the residual base `W_res = W − s·B₀A₀` and ended at `W_res + s·BA`; on the
//! original base that is `W + s·(BA − B₀A₀) = W + s·[B | −B₀][A ; A₀]`: a plain LoRA adapter of
//! rank 2r with the same scaling, hence PEFT's config edits: `init_lora_weights: true`, `r` and
//! every `rank_pattern` value doubled, `lora_alpha` doubled (times √2 with rsLoRA, whose
//! scaling is alpha/√r) and every `alpha_pattern` value doubled. PEFT refuses rsLoRA with rank
//! or alpha patterns here (doubling a pattern's alpha would change its rsLoRA scaling), and so
//! do we; DoRA is refused too (PEFT's conversion drops the magnitudes). Unlike PEFT, whose
//! converted state dict holds only `lora_A` / `lora_B`, the `modules_to_save` copies (a
//! classifier) are kept: the base change does not touch them.
//!
//! The run folder's `adapter/` is this converted adapter, so `--adapter` works on the model the
//! user named. Checkpoints keep the unconverted adapter plus (A₀, B₀) (see
//! [`init_tensors`] / [`restore_init`]), so a resumed run continues exactly.
use super::config::{InitLoraWeights, LoraConfig};
use super::model::as_lora;
use crate::model::Model;
use crate::nn::{LinearAdapter, LinearWeight};
use crate::peft::format::KEY_PREFIX;
use crate::peft::modules_to_save::as_saved_module;
use crate::peft::{adapter_params, no_such_adapter};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Why `cfg` cannot be converted for the original base; `None` when it can. Checked before
/// training starts, so a run never fails at its end.
pub fn conversion_blocker(cfg: &LoraConfig) -> Option<String> {
    if cfg.use_rslora && (!cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty()) {
        return Some(
            "use_rslora with rank_pattern or alpha_pattern cannot be converted into a LoRA adapter for the original base (PEFT refuses it too)".into(),
        );
    }
    if cfg.use_dora {
        return Some(
            "use_dora cannot be converted into a LoRA adapter for the original base (PEFT's conversion drops the magnitudes)".into(),
        );
    }
    None
}

/// The config PEFT writes for the converted adapter.
pub fn converted_config(cfg: &LoraConfig) -> Result<LoraConfig> {
    if let Some(why) = conversion_blocker(cfg) {
        return Err(Error::key("LoRA config", "init_lora_weights", why));
    }
    let mut c = cfg.clone();
    c.init_lora_weights = InitLoraWeights::Bool(true);
    // PEFT ignores (and warns about) a loftq_config beside any other init
    c.extra.remove("loftq_config");
    c.r *= 2;
    c.lora_alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
    for v in c.rank_pattern.values_mut() {
        *v *= 2;
    }
    for v in c.alpha_pattern.values_mut() {
        *v *= 2.0;
    }
    Ok(c)
}

/// The converted state dict (PEFT key names): `A' = [A ; A₀]`, `B' = [B | −B₀]` for every
/// module of `adapter_name`, and the `modules_to_save` tensors as they are. Every LoRA layer
/// of the adapter must carry its (A₀, B₀).
pub fn converted_tensors(model: &dyn Model, adapter_name: &str) -> Result<HashMap<String, Tensor>> {
    let params = adapter_params(model, adapter_name);
    if params.is_empty() {
        return Err(no_such_adapter(model, adapter_name));
    }
    let mut sd: HashMap<String, Tensor> = params
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor().detach().to_dtype(DType::F32)?.contiguous()?;
            Ok((format!("{KEY_PREFIX}{n}"), t))
        })
        .collect::<Result<_>>()?;
    for lin in model.linears() {
        for (n, a) in lin.adapters() {
            if n != adapter_name || as_saved_module(a).is_some() {
                continue;
            }
            let l = as_lora(a).ok_or_else(|| {
                Error::msg(format!(
                    "adapter `{adapter_name}` on {} is not LoRA",
                    lin.name()
                ))
            })?;
            let (a0, b0) = l.mutated_init().ok_or_else(|| {
                Error::msg(format!(
                    "adapter `{adapter_name}` on {} has no PiSSA / OLoRA initial weights to convert against",
                    lin.name()
                ))
            })?;
            let a = l.a().as_tensor().detach().to_dtype(DType::F32)?;
            let b = l.b().as_tensor().detach().to_dtype(DType::F32)?;
            let a2 = Tensor::cat(&[&a, &a0.to_dtype(DType::F32)?], 0)?;
            let b2 = Tensor::cat(&[&b, &b0.to_dtype(DType::F32)?.neg()?], 1)?;
            let key = |part: &str| format!("{KEY_PREFIX}{}.{part}.weight", lin.name());
            sd.insert(key("lora_A"), a2.contiguous()?);
            sd.insert(key("lora_B"), b2.contiguous()?);
        }
    }
    Ok(sd)
}

/// Write `adapter_name` (made with PiSSA / OLoRA, config `cfg`) into `dir` converted for the
/// original base: PEFT's files, loadable with `--adapter` / `PeftModel.from_pretrained` on the
/// model the run started from.
pub fn save_converted(
    model: &dyn Model,
    adapter_name: &str,
    cfg: &LoraConfig,
    dir: &Path,
) -> Result<()> {
    let converted = converted_config(cfg)?;
    let sd = converted_tensors(model, adapter_name)?;
    crate::peft::format::save_adapter_with(model, &converted, &sd, dir)
}

/// (A₀, B₀) of every LoRA layer of `adapter_name` that has them, keyed as PEFT keys the
/// adapter's own tensors (`base_model.model.<module>.lora_A.weight`).
pub fn init_tensors(model: &dyn Model, adapter_name: &str) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for lin in model.linears() {
        for (n, a) in lin.adapters() {
            let Some((a0, b0)) = (n == adapter_name)
                .then(|| as_lora(a))
                .flatten()
                .and_then(|l| l.mutated_init())
            else {
                continue;
            };
            out.insert(format!("{KEY_PREFIX}{}.lora_A.weight", lin.name()), a0);
            out.insert(format!("{KEY_PREFIX}{}.lora_B.weight", lin.name()), b0);
        }
    }
    out
}

/// Put the (A₀, B₀) of `tensors` (from [`init_tensors`], read back from `path`) into the
/// layers of `adapter_name`. Where they differ from the ones this attach computed (another
/// build's rounding), the base is moved to match them: `W_res += s·(B₀A₀ − B₀'A₀')`, so the
/// residual and the conversion use the checkpoint's init. Equal ones change nothing (the
/// usual case: the init is deterministic). A missing or misshapen tensor is an error naming it.
pub fn restore_init(
    model: &mut dyn Model,
    adapter_name: &str,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    for lin in model.linears_mut() {
        let mut delta = None;
        for (n, a) in lin.adapters() {
            let Some(l) = (n == adapter_name).then(|| as_lora(a)).flatten() else {
                continue;
            };
            let Some((a0, b0)) = l.mutated_init() else {
                continue;
            };
            let mut take = |part: &str, want: &Tensor| -> Result<Tensor> {
                let key = format!("{KEY_PREFIX}{}.{part}.weight", lin.name());
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::file(path, format!("tensor `{key}` is missing")))?;
                if t.dims() != want.dims() {
                    return Err(Error::file(
                        path,
                        format!(
                            "tensor `{key}` has shape {:?}, the adapter {:?} (the [lora] settings changed?)",
                            t.dims(),
                            want.dims()
                        ),
                    ));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(want.device())?)
            };
            let (a1, b1) = (take("lora_A", &a0)?, take("lora_B", &b0)?);
            let same = |x: &Tensor, y: &Tensor| -> Result<bool> {
                Ok(x.flatten_all()?.to_vec1::<f32>()? == y.flatten_all()?.to_vec1::<f32>()?)
            };
            if same(&a0, &a1)? && same(&b0, &b1)? {
                continue;
            }
            let d = ((b0.matmul(&a0)? - b1.matmul(&a1)?)? * l.scale())?;
            l.set_mutated_init(a1, b1);
            delta = Some(d);
        }
        if let Some(d) = delta {
            add_to_base(lin, &d)?;
        }
    }
    if let Some(k) = tensors.keys().min() {
        return Err(Error::file(
            path,
            format!(
                "tensor `{k}` belongs to no PiSSA / OLoRA module (the [lora] settings changed?)"
            ),
        ));
    }
    Ok(())
}

/// Give the base weights back the `s·B₀A₀` a PiSSA / OLoRA attach took out (to f32 rounding):
/// what removing such an adapter after a failed load must do.
pub fn undo_mutated_init(model: &mut dyn Model, adapter_name: &str) -> Result<()> {
    for lin in model.linears_mut() {
        let mut delta = None;
        for (n, a) in lin.adapters() {
            if let Some(l) = (n == adapter_name).then(|| as_lora(a)).flatten() {
                if let Some((a0, b0)) = l.mutated_init() {
                    delta = Some((b0.matmul(&a0)? * l.scale())?);
                }
            }
        }
        if let Some(d) = delta {
            add_to_base(lin, &d)?;
        }
    }
    Ok(())
}

fn add_to_base(lin: &mut crate::nn::Linear, delta: &Tensor) -> Result<()> {
    match lin.weight() {
        LinearWeight::Frozen(w) => {
            let dt = w.dtype();
            let sum = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?;
            lin.set_weight(LinearWeight::Frozen(sum.to_dtype(dt)?));
        }
        LinearWeight::Trainable(v) => {
            let sum = (v.as_tensor().detach() + delta.to_dtype(v.dtype())?)?;
            v.set(&sum)?;
        }
        LinearWeight::Quantized(q) => {
            let sum = (q.dequantize()? + delta)?;
            lin.set_weight(LinearWeight::Frozen(sum));
        }
    }
    Ok(())
}

/// Whether `a` is a LoRA layer made by a base-changing init.
pub fn has_mutated_init(a: &dyn LinearAdapter) -> bool {
    as_lora(a).is_some_and(|l| l.mutated_init().is_some())
}
