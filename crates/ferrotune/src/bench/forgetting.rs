//! Catastrophic-forgetting report: each task's metrics before and after fine-tuning, on the same
//! documents, with a paired bootstrap confidence interval of the difference (documents resampled
//! together, so what is compared is the same question answered twice) and a verdict.
use super::metrics::Item;
use super::{BenchReport, MetricResult};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Bootstrap resamples for the interval.
pub const RESAMPLES: usize = 2000;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub task: String,
    pub metric: String,
    pub n: usize,
    pub num_fewshot: usize,
    pub before: f64,
    pub after: f64,
    pub delta: f64,
    /// 95% paired-bootstrap interval of `after - before`.
    pub ci_low: f64,
    pub ci_high: f64,
    pub higher_is_better: bool,
    /// `forgot`, `improved` or `no significant change`.
    pub verdict: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub before: String,
    pub after: String,
    pub resamples: usize,
    pub rows: Vec<Row>,
}

/// The paired bootstrap of one metric; None when the two runs did not score the same samples.
pub fn compare_metric(
    before: &MetricResult,
    after: &MetricResult,
    seed: u64,
) -> Option<(f64, f64)> {
    let n = before.items.len();
    if n == 0 || n != after.items.len() {
        return None;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut deltas = Vec::with_capacity(RESAMPLES);
    let (mut b, mut a): (Vec<Item>, Vec<Item>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..RESAMPLES {
        b.clear();
        a.clear();
        for _ in 0..n {
            let j = rng.random_range(0..n);
            b.push(before.items[j].clone());
            a.push(after.items[j].clone());
        }
        let d = after.aggregation.apply(&a) - before.aggregation.apply(&b);
        if d.is_finite() {
            deltas.push(d);
        }
    }
    if deltas.is_empty() {
        return None;
    }
    deltas.sort_by(f64::total_cmp);
    let q = |p: f64| deltas[((deltas.len() - 1) as f64 * p).round() as usize];
    Some((q(0.025), q(0.975)))
}

fn verdict(lo: f64, hi: f64, higher_is_better: bool) -> &'static str {
    let (better, worse) = if higher_is_better {
        (lo > 0.0, hi < 0.0)
    } else {
        (hi < 0.0, lo > 0.0)
    };
    if worse {
        "forgot"
    } else if better {
        "improved"
    } else {
        "no significant change"
    }
}

/// Compare two runs task by task (tasks and metrics present in both, same documents).
pub fn compare(
    before: &BenchReport,
    after: &BenchReport,
    before_name: &str,
    after_name: &str,
) -> Report {
    let mut rows = Vec::new();
    for (ti, tb) in before.tasks.iter().enumerate() {
        let Some(ta) = after
            .tasks
            .iter()
            .find(|t| t.task == tb.task && t.num_fewshot == tb.num_fewshot)
        else {
            continue;
        };
        for (mi, mb) in tb.metrics.iter().enumerate() {
            let Some(ma) = ta.metric(&mb.name) else {
                continue;
            };
            let seed = 0x5eed ^ ((ti as u64) << 16) ^ mi as u64;
            let (lo, hi) = compare_metric(mb, ma, seed).unwrap_or((f64::NAN, f64::NAN));
            rows.push(Row {
                task: tb.alias.clone(),
                metric: mb.name.clone(),
                n: tb.n_effective,
                num_fewshot: tb.num_fewshot,
                before: mb.value,
                after: ma.value,
                delta: ma.value - mb.value,
                ci_low: lo,
                ci_high: hi,
                higher_is_better: mb.higher_is_better,
                verdict: if lo.is_nan() {
                    "n/a".into()
                } else {
                    verdict(lo, hi, mb.higher_is_better).into()
                },
            });
        }
    }
    Report {
        before: before_name.to_string(),
        after: after_name.to_string(),
        resamples: RESAMPLES,
        rows,
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# Forgetting report\n\nbefore: `{}`  \nafter: `{}`  \n95% intervals: paired bootstrap over the same documents ({} resamples).\n\n",
            self.before, self.after, self.resamples
        );
        s.push_str("| task | shots | n | metric | before | after | delta | 95% CI | verdict |\n|---|---:|---:|---|---:|---:|---:|---|---|\n");
        for r in &self.rows {
            let arrow = if r.higher_is_better { "↑" } else { "↓" };
            s.push_str(&format!(
                "| {} | {} | {} | {} {arrow} | {:.4} | {:.4} | {:+.4} | [{:+.4}, {:+.4}] | {} |\n",
                r.task,
                r.num_fewshot,
                r.n,
                r.metric,
                r.before,
                r.after,
                r.delta,
                r.ci_low,
                r.ci_high,
                r.verdict
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::Aggregation;

    fn metric(v: &[f64]) -> MetricResult {
        let items: Vec<Item> = v.iter().map(|&x| Item::Value(x)).collect();
        MetricResult {
            name: "acc".into(),
            aggregation: Aggregation::Mean,
            higher_is_better: true,
            value: Aggregation::Mean.apply(&items),
            stderr: None,
            items,
        }
    }

    #[test]
    fn a_clear_drop_is_forgetting_and_noise_is_not() {
        let before = metric(&[1.0; 200]);
        let mut drop = vec![1.0; 200];
        drop.iter_mut().take(60).for_each(|x| *x = 0.0);
        let (lo, hi) = compare_metric(&before, &metric(&drop), 1).unwrap();
        assert!(hi < 0.0 && lo > -0.45, "[{lo}, {hi}]");
        assert_eq!(verdict(lo, hi, true), "forgot");
        // Two answers swapped: the same accuracy, no significant change.
        let mut a = vec![1.0; 100];
        a.extend(vec![0.0; 100]);
        let mut b = a.clone();
        b.swap(0, 150);
        let (lo, hi) = compare_metric(&metric(&a), &metric(&b), 2).unwrap();
        assert!(lo < 0.0 && hi > 0.0, "[{lo}, {hi}]");
        assert_eq!(verdict(lo, hi, true), "no significant change");
        // Lower is better: a rise is forgetting.
        assert_eq!(verdict(0.1, 0.2, false), "forgot");
        // Different documents: no interval.
        assert!(compare_metric(&metric(&a), &metric(&a[..10]), 3).is_none());
    }
}
