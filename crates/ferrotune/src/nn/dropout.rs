//! A model's own dropout, as transformers' `nn.Dropout` runs in train mode (T5's
//! `dropout_rate`, BERT's `hidden_dropout_prob` and `attention_probs_dropout_prob`).
//!
//! Inverted dropout: each element is zeroed with probability p and the rest are scaled by
//! 1/(1-p), a multiplication by a constant mask, so autograd's backward of the product is the
//! exact gradient. The masks are a counter-based stream like LoRA's (`peft::lora::layer`):
//! element i of the mask at `site` (the k-th dropout of the forward pass) in training pass
//! `call` is a hash of (seed, call, site, i) alone. A resumed run seeks to any pass in O(1) by
//! setting the count ([`ModelDropout::set_calls`]), the elements are computed in parallel and
//! the result does not depend on the thread count.
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The dropout state a model holds: seed, on/off switch and the count of training passes.
#[derive(Debug)]
pub struct ModelDropout {
    seed: AtomicU64,
    calls: AtomicU64,
    enabled: AtomicBool,
}

impl Default for ModelDropout {
    /// On, seed 0, no pass yet (a training run sets its seed with [`Self::configure`]).
    fn default() -> Self {
        Self {
            seed: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
        }
    }
}

impl ModelDropout {
    pub fn configure(&self, seed: u64, enabled: bool) {
        self.seed.store(seed, Ordering::Relaxed);
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Training passes so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn set_calls(&self, calls: u64) {
        self.calls.store(calls, Ordering::Relaxed)
    }

    /// The dropout of one forward pass. A training pass (`train`) is counted, whether dropout
    /// is on or not, so the count stays the trainer's count of training forward passes (what
    /// LoRA's dropout counts too); it draws masks only when dropout is on.
    pub fn pass(&self, train: bool) -> DropoutPass {
        if !train {
            return DropoutPass::off();
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.enabled() {
            return DropoutPass::off();
        }
        DropoutPass {
            key: Some(mix(self.seed.load(Ordering::Relaxed) ^ mix(call))),
            site: Cell::new(0),
        }
    }
}

/// The dropout of one forward pass: [`Self::apply`] at each dropout site, in model order.
#[derive(Debug)]
pub struct DropoutPass {
    /// `None`: inference, or dropout switched off.
    key: Option<u64>,
    site: Cell<u64>,
}

impl DropoutPass {
    /// No dropout (inference).
    pub fn off() -> Self {
        Self {
            key: None,
            site: Cell::new(0),
        }
    }

    pub fn is_on(&self) -> bool {
        self.key.is_some()
    }

    /// `x` with dropout of probability `p` (the next site of the pass). Off, or p = 0: `x`.
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let site = self.site.get();
        self.site.set(site + 1);
        let Some(key) = self.key else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let m = mask(mix(key ^ mix(site.wrapping_add(1))), x.elem_count(), p);
        let m = Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * m
    }
}

/// SplitMix64's output function: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` mask values for `key`: 0 with probability `p`, else 1/(1-p). Element i depends on
/// (key, i) only.
fn mask(key: u64, n: usize, p: f64) -> Vec<f32> {
    const CHUNK: usize = 1 << 15;
    // p < 1 (checked with the config): the threshold fits in 32 bits.
    let threshold = (p.clamp(0.0, 1.0) * (1u64 << 32) as f64) as u64;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let first = (c * CHUNK) as u64;
            for (j, o) in chunk.iter_mut().enumerate() {
                let h = mix(key ^ (first + j as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                *o = if (h >> 32) < threshold { 0.0 } else { keep };
            }
        });
    out
}

/// Check a dropout probability read from `key` of a config: in [0, 1).
pub fn check_probability(p: f64) -> std::result::Result<(), String> {
    if p.is_finite() && (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{p} is not a probability in [0, 1)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn masks_follow_seed_call_and_site_and_keep_the_expected_fraction() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((64, 1000), DType::F32, &dev)?;
        let d = ModelDropout::default();
        d.configure(7, true);
        let pass = d.pass(true);
        let a = pass.apply(&x, 0.1)?.flatten_all()?.to_vec1::<f32>()?;
        let b = pass.apply(&x, 0.1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(a, b, "two sites of one pass draw different masks");
        let zeros = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((zeros - 0.1).abs() < 0.01, "dropped fraction {zeros}");
        let keep = 1.0 / 0.9f32;
        assert!(a.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-6));
        // The same (seed, call, site) again, after seeking: the same mask.
        assert_eq!(d.calls(), 1);
        d.set_calls(0);
        let again = d
            .pass(true)
            .apply(&x, 0.1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(again, a);
        // The next pass draws another; another seed another.
        let next = d
            .pass(true)
            .apply(&x, 0.1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_ne!(next, a);
        d.configure(8, true);
        d.set_calls(0);
        let other = d
            .pass(true)
            .apply(&x, 0.1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_ne!(other, a);
        Ok(())
    }

    #[test]
    fn inference_and_switched_off_passes_are_the_identity_and_training_passes_count() -> Result<()>
    {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 100f32, &dev)?;
        let d = ModelDropout::default();
        let y = d.pass(false).apply(&x, 0.5)?;
        assert_eq!(y.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
        assert_eq!(d.calls(), 0, "inference is not counted");
        d.configure(1, false);
        let y = d.pass(true).apply(&x, 0.5)?;
        assert_eq!(y.to_vec1::<f32>()?, x.to_vec1::<f32>()?);
        assert_eq!(d.calls(), 1, "a training pass counts even with dropout off");
        Ok(())
    }

    #[test]
    fn the_gradient_is_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        let v = Var::from_tensor(&Tensor::ones(500, DType::F32, &dev)?)?;
        let d = ModelDropout::default();
        d.configure(3, true);
        let y = d.pass(true).apply(v.as_tensor(), 0.3)?;
        let g = y.sum_all()?.backward()?;
        let g = g.get(v.as_tensor()).expect("gradient").to_vec1::<f32>()?;
        assert_eq!(g, y.to_vec1::<f32>()?);
        assert!(g.contains(&0.0) && g.iter().any(|&x| x > 1.0));
        Ok(())
    }

    #[test]
    fn probabilities_outside_zero_to_one_are_refused() {
        assert!(check_probability(0.0).is_ok() && check_probability(0.1).is_ok());
        for p in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            assert!(check_probability(p).is_err(), "{p}");
        }
    }
}
