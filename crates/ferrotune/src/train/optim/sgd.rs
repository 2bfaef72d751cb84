//! SGD with momentum: `torch.optim.SGD`'s update. Per parameter `p` with gradient `g`:
//! ```text
//! g ← g + weight_decay · p                        (L2, as torch: added to the gradient)
//! b ← g at the first update, then momentum · b + (1 − dampening) · g
//! g ← g + momentum · b  (nesterov)   or   g ← b
//! p ← p − lr · g
//! ```
//! With `momentum = 0` there is no buffer and no state besides the update count.
use super::{ParamGroup, ParamSettings};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// `[train.sgd]`: torch.optim.SGD's keys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub dampening: f64,
    #[serde(default)]
    pub nesterov: bool,
    /// Set from `[train] weight_decay`.
    #[serde(skip)]
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

impl SgdConfig {
    /// torch's own checks: Nesterov needs momentum and no dampening.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("momentum {} is not in [0, 1)", self.momentum));
        }
        if !(0.0..=1.0).contains(&self.dampening) {
            return Err(format!("dampening {} is not in [0, 1]", self.dampening));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err("nesterov = true needs momentum > 0 and dampening = 0".into());
        }
        Ok(())
    }
}

pub struct Sgd {
    pub(super) group: ParamGroup,
    /// The momentum buffers (empty without momentum).
    buf: Vec<Tensor>,
    cfg: SgdConfig,
}

impl Sgd {
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: SgdConfig,
        settings: Vec<ParamSettings>,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| Error::msg(format!("sgd: {e}")))?;
        let buf = if cfg.momentum != 0.0 {
            params
                .iter()
                .map(|(_, v)| Tensor::zeros(v.shape(), DType::F32, v.device()))
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Sgd {
            group: ParamGroup::new(params, settings),
            buf,
            cfg,
        })
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let first = self.group.t == 0;
        self.group.begin_step(grads, super::OptimizerKind::Sgd)?;
        let c = self.cfg;
        for (i, (_, p)) in self.group.params.iter().enumerate() {
            let lr = lr * self.group.settings[i].lr_scale;
            let w = p.as_tensor().detach().to_dtype(DType::F32)?;
            let mut g = grads[i].to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 && self.group.settings[i].decay {
                g = (g + (&w * c.weight_decay)?)?;
            }
            if c.momentum != 0.0 {
                let b = if first {
                    g.clone()
                } else {
                    ((&self.buf[i] * c.momentum)? + (&g * (1.0 - c.dampening))?)?
                };
                g = if c.nesterov {
                    (g + (&b * c.momentum)?)?
                } else {
                    b.clone()
                };
                self.buf[i] = b;
            }
            let w = (w - (g * lr)?)?;
            p.set(&w.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// `momentum_buffer.<name>` (with momentum) and `step`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd = HashMap::new();
        for (i, b) in self.buf.iter().enumerate() {
            sd.insert(
                format!("momentum_buffer.{}", self.group.params[i].0),
                b.clone(),
            );
        }
        self.group.write_state(path, sd)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut r = self.group.state_reader(path)?;
        let mut buf = Vec::new();
        if self.cfg.momentum != 0.0 {
            for (name, p) in &self.group.params {
                buf.push(r.take(&format!("momentum_buffer.{name}"), p.dims(), DType::F32)?);
            }
        }
        let step = r.finish_step()?;
        self.buf = buf;
        self.group.t = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SgdConfig;

    #[test]
    fn dampening_outside_0_1_or_nan_is_refused() {
        for d in [f64::NAN, -1.0, 1.5] {
            let c = SgdConfig {
                momentum: 0.9,
                dampening: d,
                ..Default::default()
            };
            assert!(c.validate().unwrap_err().contains("dampening"), "{d}");
        }
        let ok = SgdConfig {
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
    }
}
