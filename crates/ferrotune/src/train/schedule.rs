//! Learning-rate schedules: a linear warmup, then cosine, linear, constant or inverse-sqrt.
//!
//! Step `k` is the k-th optimizer update (1-based). Warmup: `lr · k / warmup` for `k ≤ warmup`,
//! so the first update already moves (transformers' schedulers give the first update lr 0).
//! After it, with progress `p = (k − warmup − 1) / (total − warmup)` running from 0 at the first
//! decay step towards 1 at the end, and `m = min_lr_ratio`:
//! - cosine: `lr · (m + (1 − m) · ½(1 + cos πp))`
//! - linear: `lr · (m + (1 − m) · (1 − p))`
//! - constant: `lr`
//! - inverse_sqrt: `lr · sqrt(max(warmup, 1) / k)`, floored at `m · lr` (Vaswani et al.)
use super::config::LrSchedule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub lr: f64,
    pub warmup: usize,
    pub total: usize,
    pub min_lr_ratio: f64,
}

impl Schedule {
    /// The learning rate of update `k` (1-based).
    pub fn lr_at(&self, k: usize) -> f64 {
        let k = k.max(1);
        if k <= self.warmup {
            return self.lr * k as f64 / self.warmup as f64;
        }
        let m = self.min_lr_ratio;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let p = ((k - self.warmup - 1) as f64 / span).clamp(0.0, 1.0);
        let ratio = match self.kind {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => m + (1.0 - m) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            LrSchedule::Linear => m + (1.0 - m) * (1.0 - p),
            LrSchedule::InverseSqrt => (self.warmup.max(1) as f64 / k as f64).sqrt().max(m),
        };
        self.lr * ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: LrSchedule, warmup: usize, total: usize, m: f64) -> Schedule {
        Schedule {
            kind,
            lr: 1.0,
            warmup,
            total,
            min_lr_ratio: m,
        }
    }

    #[test]
    fn warmup_then_each_decay_shape() {
        let c = s(LrSchedule::Cosine, 4, 14, 0.1);
        let lrs: Vec<f64> = (1..=14).map(|k| c.lr_at(k)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0, "first decay step is at the peak");
        // Monotone decay, above the floor, half way at the midpoint of the decay.
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]));
        assert!(lrs.iter().all(|&x| x > 0.1));
        let mid = c.lr_at(4 + 1 + 5);
        assert!((mid - (0.1 + 0.9 * 0.5)).abs() < 1e-12, "{mid}");
        // The decay reaches the floor one step after the end.
        assert!((c.lr_at(15) - 0.1).abs() < 1e-12);

        let l = s(LrSchedule::Linear, 0, 10, 0.0);
        assert_eq!(l.lr_at(1), 1.0);
        assert!((l.lr_at(6) - 0.5).abs() < 1e-12);
        assert!((l.lr_at(10) - 0.1).abs() < 1e-12);

        let k = s(LrSchedule::Constant, 2, 10, 0.0);
        assert_eq!(k.lr_at(1), 0.5);
        assert!((3..=10).all(|i| k.lr_at(i) == 1.0));

        let r = s(LrSchedule::InverseSqrt, 4, 100, 0.2);
        assert_eq!(r.lr_at(4), 1.0);
        assert!((r.lr_at(16) - 0.5).abs() < 1e-12);
        assert!(
            (r.lr_at(1000) - 0.2).abs() < 1e-12,
            "floored at min_lr_ratio"
        );
    }
}
