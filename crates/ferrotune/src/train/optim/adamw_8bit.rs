//! 8-bit AdamW: bitsandbytes' `AdamW8bit` (Dettmers et al. 2022, "8-bit Optimizers via
//! Block-wise Quantization"). Both moments are stored as one byte per value: each block of
//! [`BLOCK_SIZE`] values keeps its absolute maximum in f32 and every value as the index of the
//! nearest entry of a 256-value code — bnb's dynamic map (`create_dynamic_map`): signed for
//! the first moment, unsigned for the second — applied to value / absmax. An update
//! dequantizes a parameter's blocks, runs AdamW in f32 exactly as bnb's CPU kernel
//! (`optimizer_update_8bit_blockwise`), and quantizes the new moments again. Tensors with
//! fewer than `min_8bit_size` values (bnb: 4096) keep f32 moments, as bnb does.
//!
//! Error: a moment value is off by at most half the gap between two neighbouring codes
//! times its block's absmax; the dynamic code's relative gap is under 1/16 for values within
//! 10× of the absmax and keeps 1/64-ish resolution at each decade (see the tests).
use super::{ParamGroup, ParamSettings};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Values per quantization block (bnb's blocksize for its 8-bit optimizers).
pub const BLOCK_SIZE: usize = 256;

/// `[train.adamw_8bit]`. The betas, eps and weight decay are `[train]`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamW8bitConfig {
    /// Tensors with fewer values keep f32 moments (bnb's `min_8bit_size`).
    #[serde(default = "default_min_8bit_size")]
    pub min_8bit_size: usize,
    #[serde(skip, default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(skip, default = "default_eps")]
    pub eps: f64,
    #[serde(skip)]
    pub weight_decay: f64,
}

fn default_min_8bit_size() -> usize {
    4096
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        AdamW8bitConfig {
            min_8bit_size: default_min_8bit_size(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
        }
    }
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for each
/// decade 10^-6 .. 10^0, the midpoints of an even split of [0.1, 1] (2^i of them, 2^(i+1)
/// unsigned), negated too when signed; plus 0 and 1; sorted. 256 values.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed {
            1usize << i
        } else {
            1usize << (i + 1)
        } + 1;
        // torch.linspace(0.1, 1, items) in f32
        let step = (1.0f32 - 0.1f32) / (items - 1) as f32;
        let b: Vec<f32> = (0..items)
            .map(|k| {
                // torch computes the second half from the end, as start + k*step would drift
                if k < items / 2 {
                    0.1f32 + step * k as f32
                } else {
                    1.0f32 - step * (items - 1 - k) as f32
                }
            })
            .collect();
        let scale = 10f64.powi(i - 6);
        for k in 0..items - 1 {
            let mean = (b[k] + b[k + 1]) / 2.0;
            data.push((scale * mean as f64) as f32);
            if signed {
                data.push((-scale * mean as f64) as f32);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// A blockwise-quantized tensor: one code index per value, one absmax per block.
#[derive(Clone)]
struct Quantized {
    codes: Vec<u8>,
    absmax: Vec<f32>,
}

impl Quantized {
    fn zeros(n: usize) -> Self {
        Quantized {
            codes: vec![0; n],
            absmax: vec![0.0; n.div_ceil(BLOCK_SIZE)],
        }
    }

    fn dequantize(&self, code: &[f32; 256]) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| code[q as usize] * self.absmax[i / BLOCK_SIZE])
            .collect()
    }

    /// bnb's `quantize_blockwise`: per block, x / absmax clamped to [-1, 1], then the nearest
    /// code (the first code whose midpoint with the next is not below the value).
    fn quantize(x: &[f32], bounds: &[f32; 255]) -> Self {
        let mut codes = vec![0u8; x.len()];
        let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK_SIZE));
        for (b, chunk) in x.chunks(BLOCK_SIZE).enumerate() {
            let am = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            absmax.push(am);
            let inv = 1.0 / am.max(1e-38);
            for (j, v) in chunk.iter().enumerate() {
                let s = (v * inv).clamp(-1.0, 1.0);
                codes[b * BLOCK_SIZE + j] = bounds.partition_point(|&m| m < s) as u8;
            }
        }
        Quantized { codes, absmax }
    }
}

/// Midpoints between neighbouring codes.
fn bounds_of(code: &[f32; 256]) -> [f32; 255] {
    let mut b = [0f32; 255];
    for i in 0..255 {
        b[i] = (code[i] + code[i + 1]) / 2.0;
    }
    b
}

/// One parameter's moments.
enum Moments {
    Bits8 { m: Quantized, v: Quantized },
    F32 { m: Vec<f32>, v: Vec<f32> },
}

pub struct AdamW8bit {
    pub(super) group: ParamGroup,
    moments: Vec<Moments>,
    cfg: AdamW8bitConfig,
    signed: [f32; 256],
    unsigned: [f32; 256],
}

impl AdamW8bit {
    pub fn new(
        params: Vec<(String, Var)>,
        cfg: AdamW8bitConfig,
        settings: Vec<ParamSettings>,
    ) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(_, v)| {
                let n = v.elem_count();
                if n < cfg.min_8bit_size {
                    Moments::F32 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Bits8 {
                        m: Quantized::zeros(n),
                        v: Quantized::zeros(n),
                    }
                }
            })
            .collect();
        Ok(AdamW8bit {
            group: ParamGroup::new(params, settings),
            moments,
            cfg,
            signed: dynamic_map(true),
            unsigned: dynamic_map(false),
        })
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.group
            .begin_step(grads, super::OptimizerKind::AdamW8bit)?;
        let [b1, b2] = self.cfg.betas;
        let (b1f, b2f) = (b1 as f32, b2 as f32);
        let c1 = 1.0 - b1.powi(self.group.t as i32);
        let c2 = (1.0 - b2.powi(self.group.t as i32)).sqrt();
        let eps = self.cfg.eps as f32;
        let (sb, ub) = (bounds_of(&self.signed), bounds_of(&self.unsigned));
        for (i, (_, p)) in self.group.params.iter().enumerate() {
            let lr = lr * self.group.settings[i].lr_scale;
            let decay = if self.group.settings[i].decay {
                self.cfg.weight_decay
            } else {
                0.0
            };
            let g: Vec<f32> = grads[i].to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let mut w: Vec<f32> = p
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            if decay > 0.0 {
                let f = (1.0 - lr * decay) as f32;
                w.iter_mut().for_each(|x| *x *= f);
            }
            match &mut self.moments[i] {
                Moments::Bits8 { m, v } => {
                    let mut mf = m.dequantize(&self.signed);
                    let mut vf = v.dequantize(&self.unsigned);
                    let (c2f, step) = (c2 as f32, (-lr / c1) as f32);
                    for k in 0..w.len() {
                        mf[k] = mf[k] * b1f + g[k] * (1.0 - b1f);
                        vf[k] = vf[k] * b2f + (1.0 - b2f) * g[k] * g[k];
                        let denom = vf[k].sqrt() / c2f + eps;
                        w[k] += step * (mf[k] / denom);
                    }
                    *m = Quantized::quantize(&mf, &sb);
                    *v = Quantized::quantize(&vf, &ub);
                }
                Moments::F32 { m, v } => {
                    // bnb's 32-bit kernel for small tensors: the same update, written as
                    // m / (sqrt(v) + eps c2) · (−lr c2 / c1).
                    let step = (-lr * c2 / c1) as f32;
                    let eps_c2 = eps * c2 as f32;
                    for k in 0..w.len() {
                        m[k] = m[k] * b1f + g[k] * (1.0 - b1f);
                        v[k] = v[k] * b2f + (1.0 - b2f) * g[k] * g[k];
                        w[k] += step * (m[k] / (v[k].sqrt() + eps_c2));
                    }
                }
            }
            let t = Tensor::from_vec(w, p.shape(), p.device())?;
            p.set(&t.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// bnb's state names: `state1.<name>` / `state2.<name>` (u8 codes, or f32 for small
    /// tensors), `absmax1.<name>` / `absmax2.<name>` (f32 per block), and `step`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = super::device_of(&self.group.params);
        let mut sd = HashMap::new();
        for (i, (name, p)) in self.group.params.iter().enumerate() {
            match &self.moments[i] {
                Moments::Bits8 { m, v } => {
                    for (k, q) in [("1", m), ("2", v)] {
                        sd.insert(
                            format!("state{k}.{name}"),
                            Tensor::from_vec(q.codes.clone(), p.shape(), &dev)?,
                        );
                        sd.insert(
                            format!("absmax{k}.{name}"),
                            Tensor::from_vec(q.absmax.clone(), q.absmax.len(), &dev)?,
                        );
                    }
                }
                Moments::F32 { m, v } => {
                    sd.insert(
                        format!("state1.{name}"),
                        Tensor::from_vec(m.clone(), p.shape(), &dev)?,
                    );
                    sd.insert(
                        format!("state2.{name}"),
                        Tensor::from_vec(v.clone(), p.shape(), &dev)?,
                    );
                }
            }
        }
        self.group.write_state(path, sd)
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut r = self.group.state_reader(path)?;
        let mut moments = Vec::new();
        for (i, (name, p)) in self.group.params.iter().enumerate() {
            let n = p.elem_count();
            let flat = |t: Tensor| -> Result<Tensor> { Ok(t.flatten_all()?) };
            moments.push(match &self.moments[i] {
                Moments::Bits8 { .. } => {
                    let blocks = n.div_ceil(BLOCK_SIZE);
                    let mut q = |k: &str| -> Result<Quantized> {
                        let codes =
                            flat(r.take(&format!("state{k}.{name}"), p.dims(), DType::U8)?)?;
                        let absmax = r.take(&format!("absmax{k}.{name}"), &[blocks], DType::F32)?;
                        Ok(Quantized {
                            codes: codes.to_vec1()?,
                            absmax: absmax.to_vec1()?,
                        })
                    };
                    let m = q("1")?;
                    let v = q("2")?;
                    Moments::Bits8 { m, v }
                }
                Moments::F32 { .. } => Moments::F32 {
                    m: flat(r.take(&format!("state1.{name}"), p.dims(), DType::F32)?)?.to_vec1()?,
                    v: flat(r.take(&format!("state2.{name}"), p.dims(), DType::F32)?)?.to_vec1()?,
                },
            });
        }
        let step = r.finish_step()?;
        if moments.len() != self.group.params.len() {
            return Err(Error::file(
                path,
                "optimizer state does not fit the parameters",
            ));
        }
        self.moments = moments;
        self.group.t = step;
        Ok(())
    }
}
