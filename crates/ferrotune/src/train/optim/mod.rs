//! The optimizers a run chooses with `[train] optimizer`, each in its own file and each the
//! update of the reference implementation users compare with:
//!
//! - [`adamw`]: `torch.optim.AdamW` (decoupled weight decay); the default.
//! - [`sgd`]: `torch.optim.SGD` with `momentum`, `dampening`, `nesterov` (L2 weight decay, as
//!   torch adds it to the gradient).
//! - [`adafactor`]: transformers' `Adafactor` (factored second moments for parameters of two or
//!   more dimensions, `scale_parameter`, `relative_step`, `warmup_init`, `clip_threshold`,
//!   `decay_rate`, `beta1`).
//! - [`adamw_8bit`]: bitsandbytes' `AdamW8bit`: both moments blockwise-quantized to 8 bits
//!   (blocks of 256 values, one f32 absmax each, bnb's dynamic quantization maps).
//!
//! Every optimizer takes, per parameter, an lr scale (LoRA+ trains `lora_B` faster; 1 for the
//! rest) and whether weight decay applies ([`decays`]: not to biases and norm weights, as HF
//! Trainer's `get_decay_parameter_names`). Its state is saved as safetensors in a checkpoint
//! and restored exactly (a resumed run ends bit for bit where an uninterrupted one does).
//! Gradient clipping by global norm is here too.
pub mod adafactor;
pub mod adamw;
pub mod adamw_8bit;
pub mod sgd;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adamw_8bit::{AdamW8bit, AdamW8bitConfig};
pub use sgd::{Sgd, SgdConfig};

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// `[train] optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Sgd,
    Adafactor,
    #[serde(rename = "adamw_8bit")]
    AdamW8bit,
}

impl OptimizerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adafactor => "adafactor",
            OptimizerKind::AdamW8bit => "adamw_8bit",
        }
    }
}

/// How the optimizer treats one parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSettings {
    /// Multiplies the learning rate (LoRA+'s ratio for `lora_B`; 1 otherwise).
    pub lr_scale: f64,
    /// Whether weight decay applies ([`decays`]).
    pub decay: bool,
}

impl Default for ParamSettings {
    fn default() -> Self {
        ParamSettings {
            lr_scale: 1.0,
            decay: true,
        }
    }
}

/// Whether weight decay applies to a parameter, by its name, as HF Trainer's
/// `get_decay_parameter_names`: not to biases, nor to the weights of LayerNorm / RMSNorm
/// layers (`*LayerNorm.weight`, `*layer_norm.weight`, `*_layernorm.weight`, `model.norm.weight`,
/// `final_layer_norm.weight`, ...). Decaying a norm's gain towards 0 shrinks the activations
/// it scales, which is not the regularisation weight decay is for.
pub fn decays(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.contains("bias") {
        return false;
    }
    // The module path without the tensor's own name (`weight`).
    let module = n.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
    let last = module.rsplit('.').next().unwrap_or("");
    !(last.contains("layernorm")
        || last.contains("layer_norm")
        || last.contains("rmsnorm")
        || last == "norm"
        || last.ends_with("_norm"))
}

/// Every optimizer's settings; [`OptimizerConfig::kind`] picks the one used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub adamw: AdamWConfig,
    pub sgd: SgdConfig,
    pub adafactor: AdafactorConfig,
    pub adamw_8bit: AdamW8bitConfig,
}

/// An optimizer over named parameters.
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
    Adafactor(Adafactor),
    /// Boxed: it holds its two 256-entry code tables.
    AdamW8bit(Box<AdamW8bit>),
}

impl Optimizer {
    /// A fresh optimizer of `cfg.kind` over `params` (the names key the saved state), with
    /// `settings[i]` for `params[i]`.
    pub fn new(
        cfg: &OptimizerConfig,
        params: Vec<(String, Var)>,
        settings: Vec<ParamSettings>,
    ) -> Result<Self> {
        if settings.len() != params.len() {
            return Err(Error::msg(format!(
                "optimizer: {} parameter settings for {} parameters",
                settings.len(),
                params.len()
            )));
        }
        Ok(match cfg.kind {
            OptimizerKind::Adamw => {
                Optimizer::AdamW(AdamW::with_settings(params, cfg.adamw, settings)?)
            }
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(params, cfg.sgd, settings)?),
            OptimizerKind::Adafactor => {
                Optimizer::Adafactor(Adafactor::new(params, cfg.adafactor, settings)?)
            }
            OptimizerKind::AdamW8bit => {
                Optimizer::AdamW8bit(Box::new(AdamW8bit::new(params, cfg.adamw_8bit, settings)?))
            }
        })
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            Optimizer::AdamW(_) => OptimizerKind::Adamw,
            Optimizer::Sgd(_) => OptimizerKind::Sgd,
            Optimizer::Adafactor(_) => OptimizerKind::Adafactor,
            Optimizer::AdamW8bit(_) => OptimizerKind::AdamW8bit,
        }
    }

    fn group(&self) -> &ParamGroup {
        match self {
            Optimizer::AdamW(o) => &o.group,
            Optimizer::Sgd(o) => &o.group,
            Optimizer::Adafactor(o) => &o.group,
            Optimizer::AdamW8bit(o) => &o.group,
        }
    }

    fn group_mut(&mut self) -> &mut ParamGroup {
        match self {
            Optimizer::AdamW(o) => &mut o.group,
            Optimizer::Sgd(o) => &mut o.group,
            Optimizer::Adafactor(o) => &mut o.group,
            Optimizer::AdamW8bit(o) => &mut o.group,
        }
    }

    /// This optimizer updates one rank's share of a ZeRO run: loading state reads only its
    /// parameters' entries from a file (or the shards) that may hold others' too.
    pub fn mark_shard(&mut self) {
        self.group_mut().shard = true;
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.group().params
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.group().t
    }

    /// One update with `grads[i]` the gradient of `params()[i]` and `lr` the schedule's
    /// learning rate (each parameter's lr scale applies on top).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        check_grads(grads.len(), self.params().len(), self.kind())?;
        match self {
            Optimizer::AdamW(o) => o.step(grads, lr),
            Optimizer::Sgd(o) => o.step(grads, lr),
            Optimizer::Adafactor(o) => o.step(grads, lr),
            Optimizer::AdamW8bit(o) => o.step(grads, lr),
        }
    }

    /// Write the state to a safetensors file (the checkpoint's `optimizer.safetensors`).
    pub fn save(&self, path: &Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.save(path),
            Optimizer::Sgd(o) => o.save(path),
            Optimizer::Adafactor(o) => o.save(path),
            Optimizer::AdamW8bit(o) => o.save(path),
        }
    }

    /// Restore what [`Optimizer::save`] wrote; the parameters and the optimizer must be the
    /// same (a one-line error naming the file and the first key that does not fit).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.load(path),
            Optimizer::Sgd(o) => o.load(path),
            Optimizer::Adafactor(o) => o.load(path),
            Optimizer::AdamW8bit(o) => o.load(path),
        }
    }
}

/// What every optimizer keeps besides its own state: the named parameters (the names key the
/// saved state), each one's settings, and the number of updates done.
pub(crate) struct ParamGroup {
    pub params: Vec<(String, Var)>,
    pub settings: Vec<ParamSettings>,
    /// Updates done so far.
    pub t: u64,
    /// A shard of a ZeRO run: a state file may hold other ranks' parameters too (a whole-run
    /// file, or every rank's shard), and only this group's are read.
    pub shard: bool,
}

impl ParamGroup {
    pub fn new(params: Vec<(String, Var)>, settings: Vec<ParamSettings>) -> Self {
        ParamGroup {
            params,
            settings,
            t: 0,
            shard: false,
        }
    }

    /// Start an update: one gradient per parameter, then count the step.
    pub fn begin_step(&mut self, grads: &[Tensor], kind: OptimizerKind) -> Result<()> {
        check_grads(grads.len(), self.params.len(), kind)?;
        self.t += 1;
        Ok(())
    }

    /// Write the optimizer's state tensors `sd` with the update count.
    pub fn write_state(&self, path: &Path, sd: HashMap<String, Tensor>) -> Result<()> {
        write_state(path, sd, self.t, &device_of(&self.params))
    }

    /// Open a state file (or, where it is absent, the ZeRO shards beside it: see
    /// [`StateReader::open`]) for reading onto the parameters' device; a shard group reads only
    /// its own parameters' entries.
    pub fn state_reader<'a>(&self, path: &'a Path) -> Result<StateReader<'a>> {
        let keep: Option<std::collections::HashSet<&str>> = self
            .shard
            .then(|| self.params.iter().map(|(n, _)| n.as_str()).collect());
        StateReader::open(path, &device_of(&self.params), keep.as_ref())
    }
}

pub(crate) fn check_grads(grads: usize, params: usize, kind: OptimizerKind) -> Result<()> {
    if grads != params {
        return Err(Error::msg(format!(
            "{}: {grads} gradients for {params} parameters",
            kind.as_str()
        )));
    }
    Ok(())
}

/// The device of the first parameter (CPU when there is none).
pub(crate) fn device_of(params: &[(String, Var)]) -> Device {
    params
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu)
}

/// Write an optimizer's state tensors and its update count (`step`, i64).
pub(crate) fn write_state(
    path: &Path,
    mut sd: HashMap<String, Tensor>,
    step: u64,
    dev: &Device,
) -> Result<()> {
    sd.insert("step".into(), Tensor::new(&[step as i64], dev)?);
    crate::fsutil::write_safetensors(path, &sd)
}

/// The state file being read back: each key is taken once, with its shape checked; keys left
/// over belong to no parameter.
pub(crate) struct StateReader<'a> {
    path: &'a Path,
    sd: HashMap<String, Tensor>,
}

/// The ZeRO shard of rank `rank` (0-based) of `world` for the state file `path`
/// (`optimizer.safetensors` → `optimizer-00001-of-00002.safetensors`, Hugging Face's shard
/// naming).
pub fn shard_path(path: &Path, rank: usize, world: usize) -> std::path::PathBuf {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("optimizer");
    path.with_file_name(format!("{stem}-{:05}-of-{world:05}.safetensors", rank + 1))
}

/// The shards of `path` that exist, in rank order: all `world` of one world size, else an
/// error naming the first missing one; none when there are none.
fn shard_set(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{stem}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut world = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if let Some((_, w)) = rest.split_once("-of-") {
            if let Ok(w) = w.parse::<usize>() {
                world = Some(world.map_or(w, |x: usize| x.max(w)));
            }
        }
    }
    let Some(world) = world.filter(|&w| w > 0) else {
        return Ok(Vec::new());
    };
    // The world size comes from a file name: stop at the first missing shard, so that a name
    // claiming 10^18 shards costs one check, not a list of 10^18 paths.
    let mut all = Vec::new();
    for r in 0..world {
        let p = shard_path(path, r, world);
        if !p.is_file() {
            return Err(Error::file(
                &p,
                format!(
                    "a ZeRO optimizer shard of {world} is missing (the checkpoint is incomplete)"
                ),
            ));
        }
        all.push(p);
    }
    Ok(all)
}

/// Whether the state key `key` (`<kind>.<parameter name>`, or `step`) is to be read.
fn wanted(key: &str, keep: Option<&std::collections::HashSet<&str>>) -> bool {
    match keep {
        None => true,
        Some(k) => key == "step" || key.split_once('.').is_some_and(|(_, n)| k.contains(n)),
    }
}

impl<'a> StateReader<'a> {
    /// Read `path`, or where it does not exist, the ZeRO shards a sharded run wrote beside it
    /// ([`shard_path`]: every rank's, merged by name, so a run resumes at any world size).
    /// With `keep`, only the entries of those parameters are read (the rest stay on disk).
    pub fn open(
        path: &'a Path,
        dev: &Device,
        keep: Option<&std::collections::HashSet<&str>>,
    ) -> Result<Self> {
        let files = if path.exists() {
            vec![path.to_path_buf()]
        } else {
            let shards = shard_set(path)?;
            if shards.is_empty() {
                return Err(Error::file(
                    path,
                    "no optimizer state (the checkpoint is incomplete)",
                ));
            }
            shards
        };
        let mut sd = HashMap::new();
        let mut step: Option<(Tensor, &std::path::PathBuf)> = None;
        for f in &files {
            let fe =
                |e: candle_core::Error| Error::file(f, crate::error::first_line(&e.to_string()));
            crate::fsutil::check_regular(f)?;
            // SAFETY: the file is mapped read-only and not modified while mapped (a checkpoint
            // folder is complete and never rewritten in place).
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(fe)?;
            for (name, _) in st.tensors() {
                if !wanted(&name, keep) {
                    continue;
                }
                let t = st.load(&name, dev).map_err(fe)?;
                if name == "step" {
                    // every shard holds the update count: they must agree
                    if let Some((s0, f0)) = &step {
                        let (a, b) = (s0.to_vec1::<i64>()?, t.to_vec1::<i64>()?);
                        if a != b {
                            return Err(Error::file(
                                f,
                                format!(
                                    "optimizer `step` is {b:?}, but {} says {a:?}",
                                    f0.display()
                                ),
                            ));
                        }
                        continue;
                    }
                    step = Some((t.clone(), f));
                }
                sd.insert(name, t);
            }
        }
        Ok(StateReader { path, sd })
    }

    /// The tensor `key` with shape `shape`, as `dtype`.
    pub fn take(&mut self, key: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.sd.remove(key).ok_or_else(|| {
            Error::file(
                self.path,
                format!("optimizer state `{key}` is missing (train.optimizer or the trained parameters changed?)"),
            )
        })?;
        if t.dims() != shape {
            return Err(Error::file(
                self.path,
                format!(
                    "optimizer state `{key}` has shape {:?}, expected {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// The saved update count.
    pub fn step(&mut self) -> Result<u64> {
        let s = self.take("step", &[1], DType::I64)?.to_vec1::<i64>()?[0];
        if s < 0 {
            return Err(Error::file(
                self.path,
                format!("optimizer state `step` is {s}"),
            ));
        }
        Ok(s as u64)
    }

    /// The saved update count, once every key has been taken ([`Self::finish`]).
    pub fn finish_step(mut self) -> Result<u64> {
        let step = self.step()?;
        self.finish()?;
        Ok(step)
    }

    /// Fails on a key no parameter took.
    pub fn finish(self) -> Result<()> {
        if let Some(k) = self.sd.keys().min() {
            return Err(Error::file(
                self.path,
                format!(
                    "optimizer state `{k}` belongs to no parameter (train.optimizer or the trained parameters changed?)"
                ),
            ));
        }
        Ok(())
    }
}

/// sqrt(Σ g²) over all gradients, in f64.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// The name of the first parameter holding a NaN or an infinity, if any (the sum of its
/// values is not finite).
pub fn first_non_finite(params: &[(String, Var)]) -> Result<Option<String>> {
    for (name, v) in params {
        let sum = v
            .as_tensor()
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !sum.is_finite() {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// Scale the gradients so their global norm is at most `max_norm` (torch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm before
/// clipping. `max_norm = 0` only measures.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// f32 temporaries of a parameter's size alive while one update of it runs (the new moments
/// before the old ones are dropped, each step of the arithmetic, and the allocator's retained
/// blocks): what the memory estimate adds for the largest parameter. Measured as peak RSS minus
/// the rest of the estimate on full fine-tuning of SmolLM2-135M, whose largest tensor is the
/// tied 49152 x 576 embedding (`bench/full_ft_memory.sh`): AdamW 7.5, Adafactor 5.6, 8-bit
/// AdamW 4.9 (plain f32 vectors of the gradient, the weight and both decoded moments), SGD
/// without momentum 1.4.
pub fn step_temporaries(cfg: &OptimizerConfig) -> u64 {
    match cfg.kind {
        OptimizerKind::Adamw => 7,
        OptimizerKind::Adafactor | OptimizerKind::AdamW8bit => 5,
        OptimizerKind::Sgd if cfg.sgd.momentum != 0.0 => 2,
        OptimizerKind::Sgd => 1,
    }
}

/// Bytes of optimizer state (beyond the parameter and its gradient) each optimizer keeps for
/// `shapes`: AdamW 8 per value (two f32 moments); SGD 4 with momentum, else 0; Adafactor a row
/// and a column vector per matrix (4 B each entry) and 4 per value of vectors, plus 4 per value
/// with `beta1`; 8-bit AdamW 2 per value plus two f32 absmax per block of 256 (tensors under
/// `min_8bit_size` keep f32 moments, 8 per value).
pub fn state_bytes(cfg: &OptimizerConfig, shapes: &[Vec<usize>]) -> u64 {
    let mut total = 0u64;
    for s in shapes {
        let n: u64 = s.iter().map(|&d| d as u64).product();
        total = total.saturating_add(match cfg.kind {
            OptimizerKind::Adamw => n.saturating_mul(8),
            OptimizerKind::Sgd => {
                if cfg.sgd.momentum != 0.0 {
                    n.saturating_mul(4)
                } else {
                    0
                }
            }
            OptimizerKind::Adafactor => {
                let second = if s.len() >= 2 {
                    let last = s[s.len() - 1] as u64;
                    let rows = n / last.max(1);
                    let cols = n / (s[s.len() - 2] as u64).max(1);
                    rows.saturating_add(cols).saturating_mul(4)
                } else {
                    n.saturating_mul(4)
                };
                let first = if cfg.adafactor.beta1.is_some() {
                    n.saturating_mul(4)
                } else {
                    0
                };
                second.saturating_add(first)
            }
            OptimizerKind::AdamW8bit => {
                if (n as usize) < cfg.adamw_8bit.min_8bit_size {
                    n.saturating_mul(8)
                } else {
                    let blocks = n.div_ceil(adamw_8bit::BLOCK_SIZE as u64);
                    n.saturating_mul(2).saturating_add(blocks.saturating_mul(8))
                }
            }
        });
    }
    total
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_shard_name_claiming_a_huge_world_is_a_missing_shard_not_an_allocation() {
        let dir = crate::data::testutil::TempDir::new("optim-shards");
        let whole = dir.path("optimizer.safetensors");
        std::fs::write(
            dir.path("optimizer-00001-of-999999999999999999.safetensors"),
            b"x",
        )
        .unwrap();
        let e = StateReader::open(&whole, &Device::Cpu, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("optimizer-00002-of-999999999999999999") && e.contains("is missing"),
            "{e}"
        );
        // No shard and no file: one line naming the file.
        std::fs::remove_file(dir.path("optimizer-00001-of-999999999999999999.safetensors"))
            .unwrap();
        let e = StateReader::open(&whole, &Device::Cpu, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("optimizer.safetensors") && e.contains("no optimizer state"),
            "{e}"
        );
    }
    use super::*;

    #[test]
    fn decay_skips_biases_and_norm_weights_of_every_family() {
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "shared.weight",
            "classifier.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        ] {
            assert!(decays(name), "{name} decays");
        }
        for name in [
            "encoder.layer.0.attention.self.query.bias",
            "classifier.bias",
            "embeddings.LayerNorm.weight",
            "encoder.layer.3.output.LayerNorm.weight",
            "model.layers.7.input_layernorm.weight",
            "model.layers.7.post_attention_layernorm.weight",
            "model.norm.weight",
            "encoder.block.0.layer.0.layer_norm.weight",
            "decoder.final_layer_norm.weight",
        ] {
            assert!(!decays(name), "{name} does not decay");
        }
    }

    #[test]
    fn state_bytes_per_optimizer() {
        let shapes = vec![vec![512, 1024], vec![1024]];
        let n = 512 * 1024 + 1024;
        let mut cfg = OptimizerConfig::default();
        assert_eq!(state_bytes(&cfg, &shapes), 8 * n);
        cfg.kind = OptimizerKind::Sgd;
        assert_eq!(state_bytes(&cfg, &shapes), 0, "no momentum: no state");
        cfg.sgd.momentum = 0.9;
        assert_eq!(state_bytes(&cfg, &shapes), 4 * n);
        cfg.kind = OptimizerKind::Adafactor;
        assert_eq!(state_bytes(&cfg, &shapes), 4 * (512 + 1024) + 4 * 1024);
        cfg.adafactor.beta1 = Some(0.9);
        assert_eq!(
            state_bytes(&cfg, &shapes),
            4 * (512 + 1024) + 4 * 1024 + 4 * n
        );
        cfg.kind = OptimizerKind::AdamW8bit;
        // The matrix: 2 B a value and 8 B a block of 256; the vector (< 4096): f32 moments.
        assert_eq!(
            state_bytes(&cfg, &shapes),
            2 * 512 * 1024 + 8 * (512 * 1024 / 256) + 8 * 1024
        );
    }
}
