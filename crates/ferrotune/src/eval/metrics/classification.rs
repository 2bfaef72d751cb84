//! Classification metrics as scikit-learn computes them: `accuracy_score` and
//! `f1_score(average="macro")`. Macro-F1 is the plain mean of the per-class F1 over the classes
//! that occur in the gold labels or the predictions (sklearn's `unique_labels(y_true, y_pred)`);
//! a class never predicted and never gold is left out, one predicted but never gold counts
//! with F1 0. Per class, F1 = 2·tp / (2·tp + fp + fn), which is sklearn's value (its
//! zero-division case, no tp, fp or fn, cannot happen for a class that occurs).
//! `reference/classification_fixtures.py` writes the sklearn values the tests compare against.
use std::collections::BTreeMap;

/// Accuracy, macro-F1 and how many examples, of one classification run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ClassScores {
    pub accuracy: f64,
    /// Macro-averaged F1 over the classes in gold ∪ predicted.
    pub f1: f64,
    pub n: usize,
}

/// Per-class counts: true positives, false positives, false negatives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

impl ClassCounts {
    pub fn f1(&self) -> f64 {
        let denom = 2 * self.tp + self.fp + self.fn_;
        if denom == 0 {
            0.0
        } else {
            (2 * self.tp) as f64 / denom as f64
        }
    }
}

/// The counts of every class that occurs in `gold` or `pred` (aligned slices of class ids).
pub fn class_counts(gold: &[usize], pred: &[usize]) -> BTreeMap<usize, ClassCounts> {
    assert_eq!(gold.len(), pred.len(), "one prediction per gold label");
    let mut counts: BTreeMap<usize, ClassCounts> = BTreeMap::new();
    for (&g, &p) in gold.iter().zip(pred) {
        if g == p {
            counts.entry(g).or_default().tp += 1;
        } else {
            counts.entry(g).or_default().fn_ += 1;
            counts.entry(p).or_default().fp += 1;
        }
    }
    counts
}

/// Fraction of predictions equal to the gold label (`NaN` for no examples).
pub fn class_accuracy(gold: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(gold.len(), pred.len(), "one prediction per gold label");
    if gold.is_empty() {
        return f64::NAN;
    }
    let right = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    right as f64 / gold.len() as f64
}

/// sklearn's `f1_score(gold, pred, average="macro")` (`NaN` for no examples).
pub fn macro_f1(gold: &[usize], pred: &[usize]) -> f64 {
    let counts = class_counts(gold, pred);
    if counts.is_empty() {
        return f64::NAN;
    }
    counts.values().map(ClassCounts::f1).sum::<f64>() / counts.len() as f64
}

/// Accuracy and macro-F1 of `pred` against `gold`.
pub fn class_scores(gold: &[usize], pred: &[usize]) -> ClassScores {
    ClassScores {
        accuracy: class_accuracy(gold, pred),
        f1: macro_f1(gold, pred),
        n: gold.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn hand_computed_case() {
        // gold 0 0 1 1 2, pred 0 1 1 1 1:
        //   class 0: tp 1, fn 1       -> F1 2/3
        //   class 1: tp 2, fp 2       -> F1 4/6
        //   class 2: fn 1             -> F1 0
        // macro = (2/3 + 2/3 + 0) / 3 = 4/9; accuracy 3/5.
        let (g, p) = ([0, 0, 1, 1, 2], [0, 1, 1, 1, 1]);
        assert!((class_accuracy(&g, &p) - 0.6).abs() < 1e-15);
        assert!((macro_f1(&g, &p) - 4.0 / 9.0).abs() < 1e-15);
        // A class only predicted counts (F1 0); a class in neither is left out: ids 0 and 7
        // only, so label 3..6 of a 8-class head do not dilute the mean.
        let (g, p) = ([0, 0], [0, 7]);
        assert!((macro_f1(&g, &p) - (2.0 / 3.0 + 0.0) / 2.0).abs() < 1e-15);
        assert_eq!(class_scores(&[1, 1], &[1, 1]).f1, 1.0);
        assert!(class_scores(&[], &[]).accuracy.is_nan());
    }

    /// The values of `reference/classification_fixtures.py` (scikit-learn).
    #[test]
    fn matches_sklearn() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/metrics/classification.json"
        );
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run reference/classification_fixtures.py)"));
        let v: Value = serde_json::from_str(&text).unwrap();
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() >= 10, "{path}: too few cases");
        let ids = |x: &Value| -> Vec<usize> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as usize)
                .collect()
        };
        for (k, c) in cases.iter().enumerate() {
            let (g, p) = (ids(&c["gold"]), ids(&c["pred"]));
            let s = class_scores(&g, &p);
            let (acc, f1) = (c["accuracy"].as_f64().unwrap(), c["f1"].as_f64().unwrap());
            assert!((s.accuracy - acc).abs() < 1e-12, "case {k}: {s:?} vs {acc}");
            assert!((s.f1 - f1).abs() < 1e-12, "case {k}: {s:?} vs {f1}");
            assert_eq!(s.n, g.len());
        }
    }
}
