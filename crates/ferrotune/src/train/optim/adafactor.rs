//! Adafactor (Shazeer & Stern 2018) as transformers' `Adafactor` computes it. Per parameter
//! `p` (RMS(x) = ‖x‖₂ / sqrt(numel)) at update `t`:
//! ```text
//! lr_t  = lr, or min(warmup_init ? 1e-6 t : 1e-2, 1/sqrt(t)) with relative_step;
//!         times max(eps2, RMS(p)) with scale_parameter
//! β2_t  = 1 − t^decay_rate
//! u     = g² + eps1
//! 2-D and up (factored): R ← β2_t R + (1 − β2_t) mean_lastdim(u)
//!                       C ← β2_t C + (1 − β2_t) mean_secondlastdim(u)
//!                       u = g · rsqrt(R / mean(R)) ⊗ rsqrt(C)
//! 1-D:                  V ← β2_t V + (1 − β2_t) u;   u = g · rsqrt(V)
//! u ← u / max(1, RMS(u) / clip_threshold) · lr_t
//! with beta1: m ← beta1 m + (1 − beta1) u;  u = m
//! p ← p − weight_decay · lr_t · p − u
//! ```
//! The factored second moment keeps one row and one column vector per matrix instead of a
//! full copy: the T5 standard, and far leaner than AdamW for large models.
use super::{ParamGroup, ParamSettings};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// `[train.adafactor]`: transformers' `Adafactor` keys. The defaults are HF Trainer's
/// (`optim = "adafactor"`: `scale_parameter = false`, `relative_step = false`), so the run's
/// `lr` and schedule apply; `relative_step = true` is Adafactor's own schedule (lr unused).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdafactorConfig {
    /// (eps1 added to g², eps2 the floor of the parameter scale).
    #[serde(default = "default_eps")]
    pub eps: [f64; 2],
    #[serde(default = "one")]
    pub clip_threshold: f64,
    #[serde(default = "default_decay_rate")]
    pub decay_rate: f64,
    /// First moment (none by default: Adafactor's memory saving).
    #[serde(default)]
    pub beta1: Option<f64>,
    #[serde(default)]
    pub scale_parameter: bool,
    #[serde(default)]
    pub relative_step: bool,
    #[serde(default)]
    pub warmup_init: bool,
    /// Set from `[train] weight_decay`.
    #[serde(skip)]
    pub weight_decay: f64,
}

fn default_eps() -> [f64; 2] {
    [1e-30, 1e-3]
}
fn one() -> f64 {
    1.0
}
fn default_decay_rate() -> f64 {
    -0.8
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        toml::Value::Table(toml::Table::new())
            .try_into()
            .expect("every [train.adafactor] key has a default")
    }
}

impl AdafactorConfig {
    /// transformers' own checks.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.warmup_init && !self.relative_step {
            return Err("warmup_init = true needs relative_step = true".into());
        }
        if let Some(b) = self.beta1 {
            if !(0.0..1.0).contains(&b) {
                return Err(format!("beta1 {b} is not in [0, 1)"));
            }
        }
        // Written so that NaN fails each test.
        if !(self.clip_threshold > 0.0 && self.clip_threshold.is_finite()) {
            return Err(format!(
                "clip_threshold {} must be positive",
                self.clip_threshold
            ));
        }
        // beta2 at step t is 1 - t^decay_rate: in [0, 1) and rising to 1 only when negative.
        if !(self.decay_rate < 0.0 && self.decay_rate.is_finite()) {
            return Err(format!(
                "decay_rate {} must be negative (transformers' default -0.8)",
                self.decay_rate
            ));
        }
        if !self.eps.iter().all(|e| *e >= 0.0 && e.is_finite()) {
            return Err(format!(
                "eps {:?} must be two finite values >= 0 (default [1e-30, 1e-3])",
                self.eps
            ));
        }
        Ok(())
    }
}

/// One parameter's second-moment state.
enum Second {
    /// Row and column statistics of a parameter with two or more dimensions.
    Factored {
        row: Tensor,
        col: Tensor,
    },
    Full(Tensor),
}

pub struct Adafactor {
    pub(super) group: ParamGroup,
    second: Vec<Second>,
    /// With beta1.
    exp_avg: Vec<Tensor>,
    cfg: AdafactorConfig,
}

/// The shapes of the row and column statistics of a parameter of shape `dims` (2-D and up).
fn factored_shapes(dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let n = dims.len();
    let row = dims[..n - 1].to_vec();
    let mut col = dims[..n - 2].to_vec();
    col.push(dims[n - 1]);
    (row, col)
}

/// RMS of a tensor: ‖x‖₂ / sqrt(numel), in f64.
fn rms(t: &Tensor) -> Result<f64> {
    let n = t.elem_count().max(1) as f64;
    let ss = t
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(ss.sqrt() / n.sqrt())
}

impl Adafactor {
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: AdafactorConfig,
        settings: Vec<ParamSettings>,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| Error::msg(format!("adafactor: {e}")))?;
        let mut second = Vec::new();
        let mut exp_avg = Vec::new();
        for (_, v) in &params {
            let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, v.device());
            second.push(if v.rank() >= 2 {
                let (r, c) = factored_shapes(v.dims());
                Second::Factored {
                    row: z(&r)?,
                    col: z(&c)?,
                }
            } else {
                Second::Full(z(v.dims())?)
            });
            if cfg.beta1.is_some() {
                exp_avg.push(z(v.dims())?);
            }
        }
        Ok(Adafactor {
            group: ParamGroup::new(params, settings),
            second,
            exp_avg,
            cfg,
        })
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.group
            .begin_step(grads, super::OptimizerKind::Adafactor)?;
        let c = self.cfg;
        let t = self.group.t as f64;
        let beta2t = 1.0 - t.powf(c.decay_rate);
        for (i, (_, p)) in self.group.params.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            let w = p.as_tensor().detach().to_dtype(DType::F32)?;
            let mut rel = lr;
            if c.relative_step {
                let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
                rel = min_step.min(1.0 / t.sqrt());
            }
            rel *= self.group.settings[i].lr_scale;
            let scale = if c.scale_parameter {
                c.eps[1].max(rms(&w)?)
            } else {
                1.0
            };
            let lr_t = scale * rel;
            let u = (g.sqr()? + c.eps[0])?;
            let mut update = match &mut self.second[i] {
                Second::Factored { row, col } => {
                    *row = ((&*row * beta2t)? + (u.mean(D::Minus1)? * (1.0 - beta2t))?)?;
                    *col = ((&*col * beta2t)? + (u.mean(D::Minus2)? * (1.0 - beta2t))?)?;
                    let r = row
                        .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                        .sqrt()?
                        .recip()?;
                    let r = r.unsqueeze(r.rank())?;
                    let cf = col.unsqueeze(col.rank() - 1)?.sqrt()?.recip()?;
                    r.broadcast_mul(&cf)?.mul(&g)?
                }
                Second::Full(v) => {
                    *v = ((&*v * beta2t)? + (u * (1.0 - beta2t))?)?;
                    v.sqrt()?.recip()?.mul(&g)?
                }
            };
            let clip = (rms(&update)? / c.clip_threshold).max(1.0);
            update = ((update / clip)? * lr_t)?;
            if let Some(b1) = c.beta1 {
                let m = ((&self.exp_avg[i] * b1)? + (&update * (1.0 - b1))?)?;
                self.exp_avg[i] = m.clone();
                update = m;
            }
            let mut w = w;
            if c.weight_decay != 0.0 && self.group.settings[i].decay {
                w = (&w + (&w * (-c.weight_decay * lr_t))?)?;
            }
            let w = (w - update)?;
            p.set(&w.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// transformers' state names: `exp_avg_sq_row.<name>` / `exp_avg_sq_col.<name>` (factored)
    /// or `exp_avg_sq.<name>`, `exp_avg.<name>` with beta1, and `step`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd = HashMap::new();
        for (i, (name, _)) in self.group.params.iter().enumerate() {
            match &self.second[i] {
                Second::Factored { row, col } => {
                    sd.insert(format!("exp_avg_sq_row.{name}"), row.clone());
                    sd.insert(format!("exp_avg_sq_col.{name}"), col.clone());
                }
                Second::Full(v) => {
                    sd.insert(format!("exp_avg_sq.{name}"), v.clone());
                }
            }
            if let Some(m) = self.exp_avg.get(i) {
                sd.insert(format!("exp_avg.{name}"), m.clone());
            }
        }
        self.group.write_state(path, sd)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut r = self.group.state_reader(path)?;
        let mut second = Vec::new();
        let mut exp_avg = Vec::new();
        for (name, p) in &self.group.params {
            second.push(if p.rank() >= 2 {
                let (rs, cs) = factored_shapes(p.dims());
                Second::Factored {
                    row: r.take(&format!("exp_avg_sq_row.{name}"), &rs, DType::F32)?,
                    col: r.take(&format!("exp_avg_sq_col.{name}"), &cs, DType::F32)?,
                }
            } else {
                Second::Full(r.take(&format!("exp_avg_sq.{name}"), p.dims(), DType::F32)?)
            });
            if self.cfg.beta1.is_some() {
                exp_avg.push(r.take(&format!("exp_avg.{name}"), p.dims(), DType::F32)?);
            }
        }
        let step = r.finish_step()?;
        self.second = second;
        self.exp_avg = exp_avg;
        self.group.t = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::AdafactorConfig;

    /// NaN, infinite and out-of-range settings are refused before a run (they used to pass and
    /// stop the run later with a NaN loss blamed on the lr).
    #[test]
    fn out_of_range_settings_are_refused() {
        assert!(AdafactorConfig::default().validate().is_ok());
        let bad = [
            AdafactorConfig {
                clip_threshold: f64::NAN,
                ..Default::default()
            },
            AdafactorConfig {
                clip_threshold: f64::INFINITY,
                ..Default::default()
            },
            AdafactorConfig {
                decay_rate: 0.5,
                ..Default::default()
            },
            AdafactorConfig {
                decay_rate: f64::NAN,
                ..Default::default()
            },
            AdafactorConfig {
                eps: [f64::NAN, 1e-3],
                ..Default::default()
            },
            AdafactorConfig {
                eps: [1e-30, -1.0],
                ..Default::default()
            },
        ];
        for c in bad {
            let e = c.validate().unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
