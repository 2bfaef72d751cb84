//! Train/validation/test splits by seeded ratios, and weighted mixtures of datasets.
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::{Example, Rows};
use crate::{Error, Result};

/// A seeded Fisher-Yates permutation of `0..n`.
pub(crate) fn permutation(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        idx.swap(i, rng.random_range(0..=i));
    }
    idx
}

/// Split one file's rows by `ratios` (2 or 3 of them, summing to 1: train, validation[, test]).
/// Rows are assigned by a permutation seeded with `seed`, so the same seed always gives the same
/// split; within a split rows keep their file order.
pub fn split_rows(rows: &Rows, ratios: &[f64], seed: u64) -> Result<Vec<Rows>> {
    if !(2..=3).contains(&ratios.len()) {
        return Err(Error::key(
            "[data]",
            "split",
            format!(
                "expected 2 or 3 ratios (train, validation[, test]), got {}",
                ratios.len()
            ),
        ));
    }
    if ratios.iter().any(|r| !r.is_finite() || *r < 0.0) {
        return Err(Error::key("[data]", "split", "ratios must be ≥ 0"));
    }
    let sum: f64 = ratios.iter().sum();
    if (sum - 1.0).abs() > 1e-6 {
        return Err(Error::key(
            "[data]",
            "split",
            format!("ratios must add up to 1, they add up to {sum}"),
        ));
    }
    let n = rows.rows.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let perm = permutation(n, &mut rng);
    let mut bounds = vec![0];
    let mut cum = 0.0;
    for r in &ratios[..ratios.len() - 1] {
        cum += r;
        bounds.push(((cum * n as f64).round() as usize).min(n));
    }
    bounds.push(n);
    const NAMES: [&str; 3] = ["train", "validation", "test"];
    let mut out = Vec::new();
    for (k, w) in bounds.windows(2).enumerate() {
        let mut idx = perm[w[0]..w[1]].to_vec();
        if idx.is_empty() && ratios[k] > 0.0 {
            return Err(Error::file(
                &*rows.file,
                format!(
                    "split = {ratios:?} of {n} rows leaves the {} split empty",
                    NAMES[k]
                ),
            ));
        }
        idx.sort_unstable();
        out.push(Rows {
            file: rows.file.clone(),
            rows: idx.into_iter().map(|i| rows.rows[i].clone()).collect(),
        });
    }
    Ok(out)
}

/// How a mixture of datasets becomes one training list (`mixing` in `[data]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mixing {
    /// Deterministic proportional interleave: at each step the dataset furthest behind its
    /// share (weight / total weight) gives its next example, so every prefix of the list has
    /// the weights' proportions (within one example). Each dataset is walked through a seeded
    /// permutation, reshuffled when used up: a dataset is repeated only once all of it was used
    /// (upsampled when its share exceeds its size, subsampled without repeats when not).
    #[default]
    Interleave,
    /// Independent draws with replacement: a dataset by weight, then a uniform example of it.
    Sample,
}

/// How a mixture's datasets get their shares (`mixing_rates` in `[data]`). Each entry's `weight`
/// multiplies the share the rule gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixingRates {
    /// The entries' weights alone.
    #[default]
    Weights,
    /// Proportional to each dataset's examples, capped at `mixing_cap` (FLAN / T5's
    /// "examples-proportional mixing": a huge dataset does not crowd out the small ones).
    ExamplesProportional,
    /// Proportional to (examples, capped at `mixing_cap` when set)^(1 / `mixing_temperature`)
    /// (T5's temperature-scaled mixing: T = 1 is examples-proportional, large T tends to equal
    /// shares).
    Temperature,
}

/// The rates `mix` draws with: `weights` times each dataset's share under `rule`, from its
/// number of examples `sizes[i]`. `cap` and `temperature` are checked against the rule, and
/// every error names its `[data]` key.
pub fn mixture_rates(
    sizes: &[usize],
    weights: &[f64],
    rule: MixingRates,
    cap: Option<usize>,
    temperature: Option<f64>,
) -> Result<Vec<f64>> {
    let key = |k: &str, msg: String| Error::key("[data]", k, msg);
    if cap == Some(0) {
        return Err(key("mixing_cap", "must be at least 1".into()));
    }
    match (rule, cap, temperature) {
        (MixingRates::Weights, Some(_), _) => {
            return Err(key(
                "mixing_cap",
                "needs mixing_rates = \"examples_proportional\" or \"temperature\"".into(),
            ))
        }
        (MixingRates::Temperature, _, None) => {
            return Err(key(
                "mixing_temperature",
                "missing: mixing_rates = \"temperature\" needs it (e.g. 2.0)".into(),
            ))
        }
        (MixingRates::Weights | MixingRates::ExamplesProportional, _, Some(_)) => {
            return Err(key(
                "mixing_temperature",
                "needs mixing_rates = \"temperature\"".into(),
            ))
        }
        _ => {}
    }
    if let Some(t) = temperature {
        // Written so that NaN fails.
        if !(t > 0.0 && t.is_finite() && t <= 1e6) {
            return Err(key(
                "mixing_temperature",
                format!("{t} must be positive and finite (1 = examples-proportional)"),
            ));
        }
    }
    let capped = |n: usize| n.min(cap.unwrap_or(usize::MAX)) as f64;
    let rates: Vec<f64> = sizes
        .iter()
        .zip(weights)
        .map(|(&n, &w)| match (rule, temperature) {
            (MixingRates::Weights, _) => w,
            (MixingRates::Temperature, Some(t)) => w * capped(n).powf(1.0 / t),
            _ => w * capped(n),
        })
        .collect();
    // A tiny temperature raises sizes to huge powers: say so rather than blame the weights.
    if let (MixingRates::Temperature, Some(t)) = (rule, temperature) {
        if rates.iter().sum::<f64>().is_infinite() {
            return Err(key(
                "mixing_temperature",
                format!("{t} is too small: the shares overflow (use T >= 0.1; T < 1 favours the large datasets)"),
            ));
        }
    }
    Ok(rates)
}

/// How many times over a mixture may draw its examples (`mixture_size` / examples available).
pub const MAX_UPSAMPLING: usize = 1000;

/// Mix datasets by weight into `size` examples (default: the total number of examples).
pub fn mix(
    datasets: &[(String, Vec<Example>)],
    weights: &[f64],
    size: Option<usize>,
    mixing: Mixing,
    seed: u64,
) -> Result<Vec<Example>> {
    assert_eq!(datasets.len(), weights.len());
    for ((name, exs), w) in datasets.iter().zip(weights) {
        if !w.is_finite() || *w <= 0.0 {
            return Err(Error::key(
                name.as_str(),
                "weight",
                format!("must be > 0, got {w}"),
            ));
        }
        if exs.is_empty() {
            return Err(Error::file(
                name,
                "no examples left to mix (all were dropped?)",
            ));
        }
    }
    let total_w: f64 = weights.iter().sum();
    if !total_w.is_finite() {
        return Err(Error::key(
            "[data]",
            "mixture",
            "the weights add up to infinity; use smaller weights (only their ratios matter)",
        ));
    }
    let available: usize = datasets.iter().map(|d| d.1.len()).sum();
    let size = size.unwrap_or(available);
    // Every drawn example is a copy: a size far beyond the data would exhaust memory (2^32
    // copies abort) while adding nothing that more epochs would not.
    if size == 0 || size > available.saturating_mul(MAX_UPSAMPLING) {
        return Err(Error::key(
            "[data]",
            "mixture_size",
            format!(
                "{size} must be between 1 and {MAX_UPSAMPLING} times the {available} examples of the mixture (train longer with max_steps to see them more often)"
            ),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(size);
    match mixing {
        Mixing::Interleave => {
            let mut orders: Vec<Vec<usize>> = datasets
                .iter()
                .map(|d| permutation(d.1.len(), &mut rng))
                .collect();
            let mut pos = vec![0usize; datasets.len()];
            let mut taken = vec![0usize; datasets.len()];
            for t in 0..size {
                let due = |i: usize| weights[i] / total_w * (t + 1) as f64 - taken[i] as f64;
                let i = (0..datasets.len())
                    .max_by(|&a, &b| due(a).total_cmp(&due(b)).then(b.cmp(&a)))
                    .expect("at least one dataset");
                if pos[i] == orders[i].len() {
                    orders[i] = permutation(datasets[i].1.len(), &mut rng);
                    pos[i] = 0;
                }
                out.push(datasets[i].1[orders[i][pos[i]]].clone());
                pos[i] += 1;
                taken[i] += 1;
            }
        }
        Mixing::Sample => {
            for _ in 0..size {
                let mut x = rng.random::<f64>() * total_w;
                let mut i = 0;
                while i + 1 < weights.len() && x >= weights[i] {
                    x -= weights[i];
                    i += 1;
                }
                let exs = &datasets[i].1;
                out.push(exs[rng.random_range(0..exs.len())].clone());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Loc, Row, Source};
    use std::path::Path;
    use std::sync::Arc;

    fn rows(n: usize) -> Rows {
        Rows {
            file: Arc::from(Path::new("all.jsonl")),
            rows: (1..=n)
                .map(|i| Row {
                    loc: Loc::Line(i),
                    fields: serde_json::json!({"i": i}).as_object().unwrap().clone(),
                })
                .collect(),
        }
    }

    fn lines(r: &Rows) -> Vec<usize> {
        r.rows
            .iter()
            .map(|r| match r.loc {
                Loc::Line(n) => n,
                Loc::Row(n) => n,
            })
            .collect()
    }

    #[test]
    fn ratio_splits_are_deterministic_disjoint_and_complete() {
        let all = rows(103);
        let a = split_rows(&all, &[0.8, 0.1, 0.1], 5).unwrap();
        let b = split_rows(&all, &[0.8, 0.1, 0.1], 5).unwrap();
        let c = split_rows(&all, &[0.8, 0.1, 0.1], 6).unwrap();
        assert_eq!(
            a.iter().map(lines).collect::<Vec<_>>(),
            b.iter().map(lines).collect::<Vec<_>>()
        );
        assert_ne!(lines(&a[1]), lines(&c[1]));
        // Cut points at round(0.8 n) and round(0.9 n).
        let (c1, c2) = (
            (0.8f64 * 103.0).round() as usize,
            (0.9f64 * 103.0).round() as usize,
        );
        assert_eq!(
            a.iter().map(|r| r.rows.len()).collect::<Vec<_>>(),
            vec![c1, c2 - c1, 103 - c2]
        );
        let mut every: Vec<usize> = a.iter().flat_map(lines).collect();
        every.sort_unstable();
        assert_eq!(every, (1..=103).collect::<Vec<_>>());
        // Not just the first 82 lines: the split is shuffled.
        assert_ne!(lines(&a[0]), (1..=82).collect::<Vec<_>>());
    }

    #[test]
    fn bad_ratios_are_one_line_errors() {
        let all = rows(10);
        for (r, want) in [
            (vec![1.0], "2 or 3 ratios"),
            (vec![0.5, 0.6], "add up to 1"),
            (vec![1.5, -0.5], "≥ 0"),
        ] {
            let e = split_rows(&all, &r, 0).unwrap_err().to_string();
            assert!(e.contains("split") && e.contains(want), "{e}");
        }
        let e = split_rows(&rows(3), &[0.9, 0.1], 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("all.jsonl") && e.contains("validation split empty"),
            "{e}"
        );
    }

    fn exs(tag: u32, n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                input_ids: vec![tag, i as u32],
                labels: vec![-100, i as i64],
                source: Source {
                    file: Arc::from(Path::new("m.jsonl")),
                    loc: Loc::Line(i + 1),
                    task: None,
                },
            })
            .collect()
    }

    #[test]
    fn interleave_follows_weights_in_every_prefix_and_repeats_only_when_exhausted() {
        let data = vec![("a".to_string(), exs(0, 5)), ("b".to_string(), exs(1, 100))];
        let out = mix(&data, &[3.0, 1.0], Some(40), Mixing::Interleave, 9).unwrap();
        assert_eq!(out.len(), 40);
        for k in 1..=40 {
            let a = out[..k].iter().filter(|e| e.input_ids[0] == 0).count() as f64;
            assert!((a - 0.75 * k as f64).abs() <= 1.0, "prefix {k}: {a} from a");
        }
        // `a` has 5 examples and is taken 30 times: each of the 6 passes uses all 5 once.
        let a_ids: Vec<u32> = out
            .iter()
            .filter(|e| e.input_ids[0] == 0)
            .map(|e| e.input_ids[1])
            .collect();
        for pass in a_ids.chunks(5) {
            let mut p = pass.to_vec();
            p.sort_unstable();
            assert_eq!(p, vec![0, 1, 2, 3, 4]);
        }
        // `b` is subsampled without repeats.
        let mut b_ids: Vec<u32> = out
            .iter()
            .filter(|e| e.input_ids[0] == 1)
            .map(|e| e.input_ids[1])
            .collect();
        b_ids.sort_unstable();
        b_ids.dedup();
        assert_eq!(b_ids.len(), 10);
        assert_eq!(
            out,
            mix(&data, &[3.0, 1.0], Some(40), Mixing::Interleave, 9).unwrap()
        );
    }

    #[test]
    fn sampling_matches_weights_on_average_and_checks_inputs() {
        let data = vec![("a".to_string(), exs(0, 3)), ("b".to_string(), exs(1, 3))];
        let out = mix(&data, &[1.0, 4.0], Some(5000), Mixing::Sample, 1).unwrap();
        let a = out.iter().filter(|e| e.input_ids[0] == 0).count();
        // Binomial(5000, 0.2): mean 1000, sd ≈ 28; 5 sd either way.
        assert!((860..1140).contains(&a), "{a}");
        assert_eq!(
            out,
            mix(&data, &[1.0, 4.0], Some(5000), Mixing::Sample, 1).unwrap()
        );
        let e = mix(&data, &[1.0, 0.0], None, Mixing::Sample, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`b`") || e.contains("b: key `weight`"), "{e}");
        let empty = vec![
            ("a".to_string(), exs(0, 3)),
            ("e.jsonl".to_string(), vec![]),
        ];
        let e = mix(&empty, &[1.0, 1.0], None, Mixing::Interleave, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("e.jsonl") && e.contains("no examples"), "{e}");
    }

    /// The share each dataset ends up with over 10k drawn examples, for every rule and both ways
    /// of drawing: within 2% (absolute) of the configured rate.
    #[test]
    fn realised_mixing_ratios_match_the_configured_rates() {
        let sizes = [50usize, 400, 3000];
        let data: Vec<(String, Vec<Example>)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("d{i}.jsonl"), exs(i as u32, n)))
            .collect();
        let weights = [1.0, 1.0, 2.0];
        let cases = [
            (MixingRates::Weights, None, None, vec![0.25, 0.25, 0.5]),
            // min(n, 1000) = 50, 400, 1000, times the weights: 50 : 400 : 2000
            (
                MixingRates::ExamplesProportional,
                Some(1000),
                None,
                vec![50.0 / 2450.0, 400.0 / 2450.0, 2000.0 / 2450.0],
            ),
            // sqrt(50), sqrt(400) = 20, 2 sqrt(3000)
            (MixingRates::Temperature, None, Some(2.0), {
                let r = [50f64.sqrt(), 20.0, 2.0 * 3000f64.sqrt()];
                let t: f64 = r.iter().sum();
                r.iter().map(|x| x / t).collect()
            }),
        ];
        for (rule, cap, temp, want) in cases {
            let rates = mixture_rates(&sizes, &weights, rule, cap, temp).unwrap();
            for mixing in [Mixing::Interleave, Mixing::Sample] {
                let out = mix(&data, &rates, Some(10_000), mixing, 7).unwrap();
                assert_eq!(out.len(), 10_000);
                for (i, w) in want.iter().enumerate() {
                    let got =
                        out.iter().filter(|e| e.input_ids[0] == i as u32).count() as f64 / 10_000.0;
                    assert!(
                        (got - w).abs() < 0.02,
                        "{rule:?} {mixing:?} dataset {i}: {got} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn mixing_keys_that_do_not_fit_the_rule_are_named() {
        let err = |rule, cap, temp| {
            mixture_rates(&[3, 4], &[1.0, 1.0], rule, cap, temp)
                .unwrap_err()
                .to_string()
        };
        assert!(err(MixingRates::Weights, Some(10), None).contains("mixing_cap"));
        assert!(err(MixingRates::ExamplesProportional, Some(0), None).contains("mixing_cap"));
        assert!(err(MixingRates::Temperature, None, None).contains("mixing_temperature"));
        assert!(err(MixingRates::Weights, None, Some(2.0)).contains("mixing_temperature"));
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = err(MixingRates::Temperature, None, Some(t));
            assert!(
                e.contains("mixing_temperature") && e.contains("positive"),
                "{e}"
            );
        }
        let e = err(MixingRates::Temperature, None, Some(1e-5));
        assert!(
            e.contains("mixing_temperature") && e.contains("too small"),
            "{e}"
        );
        // T = 1 without a cap is examples-proportional.
        let a = mixture_rates(
            &[3, 4],
            &[1.0, 2.0],
            MixingRates::Temperature,
            None,
            Some(1.0),
        );
        assert_eq!(a.unwrap(), vec![3.0, 8.0]);
    }

    /// Found by the `data_rows` fuzz target: `mixture_size = 4294967296` aborted on allocation.
    #[test]
    fn absurd_mixture_sizes_and_weights_are_refused_before_allocating() {
        let data = vec![("a".to_string(), exs(0, 3)), ("b".to_string(), exs(1, 3))];
        for size in [0, 6 * MAX_UPSAMPLING + 1, 1 << 32, usize::MAX] {
            for mixing in [Mixing::Sample, Mixing::Interleave] {
                let e = mix(&data, &[1.0, 1.0], Some(size), mixing, 1)
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains("mixture_size") && e.contains(&size.to_string()),
                    "{e}"
                );
            }
        }
        assert_eq!(
            mix(
                &data,
                &[1.0, 1.0],
                Some(6 * MAX_UPSAMPLING),
                Mixing::Sample,
                1
            )
            .unwrap()
            .len(),
            6 * MAX_UPSAMPLING
        );
        let e = mix(&data, &[f64::MAX, f64::MAX], None, Mixing::Sample, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("infinity"), "{e}");
    }
}
