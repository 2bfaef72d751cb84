//! Benchmark metrics: the per-sample values lm-eval's `process_results` gives, their
//! aggregation, and their standard errors as lm-eval computes them (the sample standard
//! deviation over sqrt(n) for means; for f1, mcc, perplexity and bleu its bootstrap, with the
//! same seeded Python RNG so the figures agree). Plus the expected calibration error of a
//! multiple-choice task's choice probabilities, which lm-eval does not report.
use super::pyrandom::PyRandom;
use super::task::OutputType;
use crate::eval::metrics::{corpus_bleu, rouge};

/// lm-eval's default bootstrap iterations (bleu uses at most 100).
pub const BOOTSTRAP_ITERS: usize = 100_000;

/// One sample's contribution to a metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Item {
    /// A value averaged over samples (acc, exact_match, rouge…).
    Value(f64),
    /// (gold, prediction) for f1 and mcc.
    Pair(i64, i64),
    /// (log-likelihood, words or bytes) for the weighted perplexities.
    Weighted(f64, f64),
    /// (prediction, references) for corpus BLEU.
    Text(String, Vec<String>),
    /// (confidence of the top choice, whether it was right) for the calibration error.
    Calib(f64, bool),
}

impl Item {
    /// The value a paired comparison uses per sample (pairs: correct or not).
    pub fn as_value(&self) -> f64 {
        match self {
            Item::Value(v) => *v,
            Item::Pair(g, p) => f64::from(u8::from(g == p)),
            Item::Weighted(ll, _) => *ll,
            Item::Text(p, r) => {
                let refs: Vec<&str> = r.iter().map(String::as_str).collect();
                rouge(p, &refs).rouge_l
            }
            Item::Calib(c, _) => *c,
        }
    }
}

/// How a metric's items become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    Mean,
    Perplexity,
    WeightedPerplexity,
    BitsPerByte,
    F1,
    Mcc,
    Bleu,
    /// Expected calibration error over 10 bins of [`Item::Calib`] items.
    Ece,
}

impl Aggregation {
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::Mean => "mean",
            Aggregation::Perplexity => "perplexity",
            Aggregation::WeightedPerplexity => "weighted_perplexity",
            Aggregation::BitsPerByte => "bits_per_byte",
            Aggregation::F1 => "f1",
            Aggregation::Mcc => "matthews_corrcoef",
            Aggregation::Bleu => "bleu",
            Aggregation::Ece => "ece",
        }
    }

    pub fn apply(self, items: &[Item]) -> f64 {
        let n = items.len() as f64;
        match self {
            Aggregation::Mean => items.iter().map(Item::as_value).sum::<f64>() / n,
            Aggregation::Perplexity => (-(items.iter().map(Item::as_value).sum::<f64>() / n)).exp(),
            Aggregation::WeightedPerplexity | Aggregation::BitsPerByte => {
                let (mut ll, mut w) = (0.0, 0.0);
                for it in items {
                    if let Item::Weighted(a, b) = it {
                        ll += a;
                        w += b;
                    }
                }
                if self == Aggregation::WeightedPerplexity {
                    (-ll / w).exp()
                } else {
                    -ll / w / std::f64::consts::LN_2
                }
            }
            Aggregation::F1 | Aggregation::Mcc => {
                let pairs: Vec<(i64, i64)> = items
                    .iter()
                    .filter_map(|it| match it {
                        Item::Pair(g, p) => Some((*g, *p)),
                        _ => None,
                    })
                    .collect();
                if self == Aggregation::F1 {
                    binary_f1(&pairs)
                } else {
                    mcc(&pairs)
                }
            }
            Aggregation::Ece => {
                let s: Vec<(f64, bool)> = items
                    .iter()
                    .filter_map(|it| match it {
                        Item::Calib(c, ok) => Some((*c, *ok)),
                        _ => None,
                    })
                    .collect();
                ece(&s, 10)
            }
            Aggregation::Bleu => {
                let (mut preds, mut refs) = (Vec::new(), Vec::new());
                for it in items {
                    if let Item::Text(p, r) = it {
                        preds.push(p.clone());
                        refs.push(r.clone());
                    }
                }
                corpus_bleu(&preds, &refs)
            }
        }
    }

    /// lm-eval's standard error of the aggregate; None where it reports "N/A".
    pub fn stderr(self, items: &[Item]) -> Option<f64> {
        match self {
            Aggregation::Mean => {
                let v: Vec<f64> = items.iter().map(Item::as_value).collect();
                (v.len() > 1).then(|| sample_stddev(&v) / (v.len() as f64).sqrt())
            }
            Aggregation::Perplexity | Aggregation::F1 | Aggregation::Mcc => {
                Some(bootstrap_stderr(self, items, BOOTSTRAP_ITERS))
            }
            Aggregation::Bleu => Some(bootstrap_stderr(self, items, 100)),
            Aggregation::WeightedPerplexity | Aggregation::BitsPerByte | Aggregation::Ece => None,
        }
    }
}

fn sample_stddev(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mu = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// lm-eval's `bootstrap_stderr`: chunks of 1000 resamples, chunk `i` drawn by `Random(i)`;
/// the standard deviation of the statistic over all resamples.
pub fn bootstrap_stderr(agg: Aggregation, items: &[Item], iters: usize) -> f64 {
    let chunk = iters.min(1000);
    if chunk == 0 || items.is_empty() {
        return f64::NAN;
    }
    let mut res = Vec::with_capacity(iters);
    let mut sample: Vec<Item> = Vec::with_capacity(items.len());
    for i in 0..iters / chunk {
        let mut rnd = PyRandom::new(i as u64);
        for _ in 0..chunk {
            sample.clear();
            sample.extend(
                rnd.choices(items.len(), items.len())
                    .into_iter()
                    .map(|j| items[j].clone()),
            );
            res.push(agg.apply(&sample));
        }
    }
    sample_stddev(&res)
}

/// scikit-learn's `f1_score(golds, preds)` (binary, positive label 1; 0 when undefined).
pub fn binary_f1(pairs: &[(i64, i64)]) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0f64, 0f64, 0f64);
    for &(g, p) in pairs {
        match (g == 1, p == 1) {
            (true, true) => tp += 1.0,
            (false, true) => fp += 1.0,
            (true, false) => fn_ += 1.0,
            _ => {}
        }
    }
    let d = 2.0 * tp + fp + fn_;
    if d == 0.0 {
        0.0
    } else {
        2.0 * tp / d
    }
}

/// scikit-learn's `matthews_corrcoef` (multiclass form; 0 when undefined).
pub fn mcc(pairs: &[(i64, i64)]) -> f64 {
    use std::collections::BTreeMap;
    let n = pairs.len() as f64;
    let mut t: BTreeMap<i64, f64> = BTreeMap::new();
    let mut p: BTreeMap<i64, f64> = BTreeMap::new();
    let mut c = 0.0;
    for &(g, q) in pairs {
        *t.entry(g).or_default() += 1.0;
        *p.entry(q).or_default() += 1.0;
        if g == q {
            c += 1.0;
        }
    }
    let tp: f64 = t
        .iter()
        .map(|(k, tk)| tk * p.get(k).copied().unwrap_or(0.0))
        .sum();
    let cov_ytyp = c * n - tp;
    let cov_ypyp = n * n - p.values().map(|x| x * x).sum::<f64>();
    let cov_ytyt = n * n - t.values().map(|x| x * x).sum::<f64>();
    let d = (cov_ytyt * cov_ypyp).sqrt();
    if d == 0.0 {
        0.0
    } else {
        cov_ytyp / d
    }
}

/// Expected calibration error over `bins` equal-width confidence bins: the size-weighted gap
/// between each bin's accuracy and its mean confidence (the top choice's probability).
pub fn ece(samples: &[(f64, bool)], bins: usize) -> f64 {
    if samples.is_empty() || bins == 0 {
        return f64::NAN;
    }
    let mut conf = vec![0f64; bins];
    let mut acc = vec![0f64; bins];
    let mut count = vec![0f64; bins];
    for &(c, ok) in samples {
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        conf[b] += c;
        acc[b] += f64::from(u8::from(ok));
        count[b] += 1.0;
    }
    let n = samples.len() as f64;
    (0..bins)
        .filter(|&b| count[b] > 0.0)
        .map(|b| (count[b] / n) * (acc[b] / count[b] - conf[b] / count[b]).abs())
        .sum()
}

/// Whether `metric` is one we compute for `t` tasks.
pub fn supported(t: OutputType, metric: &str) -> bool {
    names(t).contains(&metric)
}

pub fn names(t: OutputType) -> &'static [&'static str] {
    match t {
        OutputType::MultipleChoice => &["acc", "acc_norm", "acc_bytes", "exact_match", "f1", "mcc"],
        OutputType::Loglikelihood => &["perplexity", "acc"],
        OutputType::LoglikelihoodRolling => {
            &["word_perplexity", "byte_perplexity", "bits_per_byte"]
        }
        OutputType::GenerateUntil => &[
            "exact_match",
            "bleu",
            "rouge",
            "rouge1",
            "rouge2",
            "rougeL",
            "rougeLsum",
        ],
    }
}

/// A metric's default aggregation and direction (lm-eval's registry).
pub fn default_aggregation(metric: &str) -> (Aggregation, bool) {
    match metric {
        "perplexity" => (Aggregation::Perplexity, false),
        "word_perplexity" | "byte_perplexity" => (Aggregation::WeightedPerplexity, false),
        "bits_per_byte" => (Aggregation::BitsPerByte, false),
        "f1" => (Aggregation::F1, true),
        "mcc" => (Aggregation::Mcc, true),
        "bleu" => (Aggregation::Bleu, true),
        _ => (Aggregation::Mean, true),
    }
}

/// Softmax of log-likelihoods (lm-eval's `prob_norm`).
pub fn softmax(lls: &[f64]) -> Vec<f64> {
    let max = lls.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = lls.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Index of the largest value (first on ties, as numpy's argmax).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best
}

/// lm-eval's `exact_match` with its options (regexes removed, case, punctuation, digits).
pub fn exact_match_with(pred: &str, gold: &str, spec: &super::task::MetricSpec) -> f64 {
    let norm = |s: &str| -> String {
        let mut s = s.to_string();
        for r in &spec.regexes_to_ignore {
            if let Ok(re) = fancy_regex::Regex::new(r) {
                s = re.replace_all(&s, "").into_owned();
            }
        }
        if spec.ignore_case {
            s = s.to_lowercase();
        }
        if spec.ignore_punctuation {
            s.retain(|c| !c.is_ascii_punctuation());
        }
        if spec.ignore_numbers {
            s.retain(|c| !c.is_ascii_digit());
        }
        s
    };
    f64::from(u8::from(norm(pred) == norm(gold)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_and_mcc_match_scikit_learn() {
        // sklearn: f1_score([1,0,1,1,0,1],[1,0,0,1,1,1]) = 0.75; matthews_corrcoef = 0.25.
        let pairs = [(1, 1), (0, 0), (1, 0), (1, 1), (0, 1), (1, 1)];
        assert!((binary_f1(&pairs) - 0.75).abs() < 1e-12);
        assert!((mcc(&pairs) - 0.25).abs() < 1e-12);
        assert_eq!(mcc(&[(1, 1), (1, 1)]), 0.0);
    }

    #[test]
    fn mean_stderr_is_sample_stddev_over_root_n() {
        let items: Vec<Item> = [1.0, 0.0, 1.0, 1.0]
            .iter()
            .map(|&v| Item::Value(v))
            .collect();
        let se = Aggregation::Mean.stderr(&items).unwrap();
        // std([1,0,1,1], ddof=1) = 0.5; / sqrt(4) = 0.25.
        assert!((se - 0.25).abs() < 1e-12, "{se}");
        assert_eq!(Aggregation::Mean.stderr(&items[..1]), None);
    }

    #[test]
    fn ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident() {
        let calibrated: Vec<(f64, bool)> = (0..10).map(|i| (0.7, i < 7)).collect();
        assert!(ece(&calibrated, 10) < 1e-12);
        let over: Vec<(f64, bool)> = (0..10).map(|i| (0.95, i < 5)).collect();
        assert!((ece(&over, 10) - 0.45).abs() < 1e-12);
    }
}
