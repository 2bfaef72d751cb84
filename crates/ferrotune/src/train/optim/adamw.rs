//! AdamW with decoupled weight decay (Loshchilov & Hutter; torch.optim.AdamW's update, no
//! amsgrad), and its state as safetensors.
//!
//! Per parameter `p` with gradient `g`, at update `t` with learning rate `lr`:
//! ```text
//! p ← p · (1 − lr · weight_decay)
//! m ← β1 m + (1 − β1) g            v ← β2 v + (1 − β2) g²
//! p ← p − lr / (1 − β1ᵗ) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps)
//! ```
//! `lr` is the schedule's times the parameter's lr scale; parameters that do not decay
//! ([`super::decays`]) skip the first line. The state is kept in f32 whatever the parameter
//! dtype (trained weights are f32 master copies anyway).
use super::{ParamGroup, ParamSettings};
use crate::Result;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub(super) group: ParamGroup,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    cfg: AdamWConfig,
}

impl AdamW {
    /// A fresh optimizer over named parameters (the names key the saved state), every one
    /// decayed at the schedule's lr.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let settings = vec![ParamSettings::default(); params.len()];
        Self::with_settings(params, cfg, settings)
    }

    /// [`AdamW::new`] with an lr scale and a weight-decay switch per parameter.
    pub fn with_settings(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        settings: Vec<ParamSettings>,
    ) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            group: ParamGroup::new(params, settings),
            m,
            v,
            cfg,
        })
    }

    /// Scale the learning rate of `params()[i]` by `scales[i]` from now on.
    pub fn set_lr_scales(&mut self, scales: Vec<f64>) {
        for (s, k) in self.group.settings.iter_mut().zip(scales) {
            s.lr_scale = k;
        }
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.group.params
    }

    /// Updates done so far.
    pub fn step_count(&self) -> u64 {
        self.group.t
    }

    /// One update with `grads[i]` the gradient of `params()[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.group.begin_step(grads, super::OptimizerKind::Adamw)?;
        let [b1, b2] = self.cfg.betas;
        let bc1 = 1.0 - b1.powi(self.group.t as i32);
        let bc2 = 1.0 - b2.powi(self.group.t as i32);
        let bc2_sqrt = bc2.sqrt();
        for (i, (_, p)) in self.group.params.iter().enumerate() {
            let lr = lr * self.group.settings[i].lr_scale;
            let step_size = lr / bc1;
            let g = grads[i].to_dtype(DType::F32)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
            let mut w = p.as_tensor().detach().to_dtype(DType::F32)?;
            if self.cfg.weight_decay != 0.0 && self.group.settings[i].decay {
                w = (w * (1.0 - lr * self.cfg.weight_decay))?;
            }
            let w = (w - ((&m / &denom)? * step_size)?)?;
            p.set(&w.to_dtype(p.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Write `m.<name>`, `v.<name>` and `step` (i64) to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut sd: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.group.params.iter().enumerate() {
            sd.insert(format!("m.{name}"), self.m[i].clone());
            sd.insert(format!("v.{name}"), self.v[i].clone());
        }
        self.group.write_state(path, sd)
    }

    /// Restore what [`AdamW::save`] wrote; the parameters must be the same (names and shapes).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut r = self.group.state_reader(path)?;
        let mut m = Vec::new();
        let mut v = Vec::new();
        for (name, p) in &self.group.params {
            m.push(r.take(&format!("m.{name}"), p.dims(), DType::F32)?);
            v.push(r.take(&format!("v.{name}"), p.dims(), DType::F32)?);
        }
        let step = r.finish_step()?;
        self.m = m;
        self.v = v;
        self.group.t = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{clip_grad_norm, global_norm};
    use super::*;
    use candle_core::Device;

    /// AdamW written out in plain f64 loops, the torch.optim.AdamW algorithm.
    fn reference(p0: &[f64], grads: &[Vec<f64>], lr: f64, cfg: AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        let [b1, b2] = cfg.betas;
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * cfg.weight_decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + cfg.eps;
                p[i] -= lr * mh / denom;
            }
        }
        p
    }

    #[test]
    fn matches_the_reference_update_and_state_round_trips() {
        let cfg = AdamWConfig {
            betas: [0.8, 0.95],
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let p0: Vec<f64> = (0..6).map(|i| (i as f64 - 2.5) * 0.3).collect();
        let grads: Vec<Vec<f64>> = (0..5)
            .map(|s| (0..6).map(|i| ((i * 7 + s * 3) % 5) as f64 - 2.0).collect())
            .collect();
        let lr = 0.05;
        let want = reference(&p0, &grads, lr, cfg);
        let dev = Device::Cpu;
        let var = Var::from_tensor(
            &Tensor::from_vec(
                p0.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                (2, 3),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        let g = |s: usize| {
            Tensor::from_vec(
                grads[s].iter().map(|&x| x as f32).collect::<Vec<_>>(),
                (2, 3),
                &dev,
            )
            .unwrap()
        };
        for s in 0..3 {
            opt.step(&[g(s)], lr).unwrap();
        }
        // Save after 3 updates, continue in a fresh optimizer: same result as going on.
        let dir = std::env::temp_dir().join(format!("ferrotune-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("opt.safetensors");
        opt.save(&path).unwrap();
        let var2 = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
        let mut opt2 = AdamW::new(vec![("w".into(), var2.clone())], cfg).unwrap();
        opt2.load(&path).unwrap();
        assert_eq!(opt2.step_count(), 3);
        for s in 3..5 {
            opt.step(&[g(s)], lr).unwrap();
            opt2.step(&[g(s)], lr).unwrap();
        }
        let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got2: Vec<f32> = var2.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, got2);
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Loading state of other parameters is an error naming the key.
        let other = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        let mut opt3 = AdamW::new(vec![("u".into(), other)], cfg).unwrap();
        let e = opt3.load(&path).unwrap_err().to_string();
        assert!(e.contains("`m.u` is missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// LoRA+: a parameter with lr scale k follows the reference update at k · lr, the others
    /// the plain one.
    #[test]
    fn per_parameter_lr_scales_multiply_the_rate() {
        let cfg = AdamWConfig {
            betas: [0.9, 0.99],
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let p0: Vec<f64> = vec![0.5, -0.25, 1.0];
        let grads: Vec<Vec<f64>> = (0..4)
            .map(|s| (0..3).map(|i| ((i * 5 + s * 2) % 7) as f64 - 3.0).collect())
            .collect();
        let lr = 0.01;
        let dev = Device::Cpu;
        let mk = || {
            let t = Tensor::from_vec(p0.iter().map(|&x| x as f32).collect::<Vec<_>>(), 3, &dev);
            Var::from_tensor(&t.unwrap()).unwrap()
        };
        let (a, b) = (mk(), mk());
        let mut opt =
            AdamW::new(vec![("a".into(), a.clone()), ("b".into(), b.clone())], cfg).unwrap();
        opt.set_lr_scales(vec![1.0, 4.0]);
        for g in &grads {
            let g =
                Tensor::from_vec(g.iter().map(|&x| x as f32).collect::<Vec<_>>(), 3, &dev).unwrap();
            opt.step(&[g.clone(), g], lr).unwrap();
        }
        for (var, k) in [(a, 1.0), (b, 4.0)] {
            let want = reference(&p0, &grads, k * lr, cfg);
            let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            for (x, y) in got.iter().zip(&want) {
                assert!((*x as f64 - y).abs() < 1e-6, "scale {k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = Device::Cpu;
        let mut g = vec![
            Tensor::new(&[3.0f32, 0.0], &dev).unwrap(),
            Tensor::new(&[0.0f32, 4.0], &dev).unwrap(),
        ];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        assert!((global_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        let before = global_norm(&g).unwrap();
        clip_grad_norm(&mut g, 10.0).unwrap();
        assert_eq!(global_norm(&g).unwrap(), before, "below the max: untouched");
    }
}
