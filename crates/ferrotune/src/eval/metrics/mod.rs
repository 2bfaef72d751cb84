//! Text-generation metrics that reproduce the standard Python implementations to the last few
//! ulps, so numbers reported by ferrotune can be compared with published ones:
//!
//! * ROUGE-1/2/L/Lsum: Google's `rouge-score` (`RougeScorer([...], use_stemmer=True)`),
//!   F-measures in 0..=1; several references take the best F per type (`score_multi`).
//!   ROUGE-Lsum treats `"\n"` as the sentence separator, as rouge-score does; put each sentence
//!   on its own line to get summary-level scores (HF `evaluate` leaves that to the caller too).
//! * Corpus ROUGE: the plain mean of per-example F-measures. This is HF `evaluate`'s `rouge` with
//!   `use_aggregator=False` followed by a mean; its default `use_aggregator=True` reports the mid
//!   point of a random bootstrap instead, which is not reproducible to 4 decimals.
//! * BLEU: `sacrebleu.corpus_bleu` with its defaults (13a, exp smoothing, 4-grams), 0..=100.
//! * Exact match: after stripping surrounding whitespace; [`exact_match_normalized`] also
//!   ignores case, ASCII punctuation and runs of whitespace.
//!
//! * Classification ([`classification`]): accuracy and macro-F1 as scikit-learn computes them.
//!
//! `reference/metrics_fixtures.py` writes the fixtures the tests compare against
//! (`reference/classification_fixtures.py` those of the classification metrics).
mod bleu;
pub mod classification;
mod io;
mod porter;
mod pytext;
mod rouge;
#[cfg(test)]
mod tests;

pub use bleu::{corpus_bleu_detail, tokenize_13a, BleuScore};
pub use classification::{class_accuracy, class_scores, macro_f1, ClassScores};
pub use io::read_predictions;
pub use porter::stem as porter_stem;
pub use rouge::{rouge_detail, tokenize as rouge_tokenize, Prf, RougeDetail};

use crate::progress::{NoProgress, Progress};
use pytext::{py_split, py_strip};

/// ROUGE F-measures (0..=1) of one example or the mean over a corpus.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RougeScores {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: f64,
}

impl From<RougeDetail> for RougeScores {
    fn from(d: RougeDetail) -> Self {
        RougeScores {
            rouge1: d.rouge1.fmeasure,
            rouge2: d.rouge2.fmeasure,
            rouge_l: d.rouge_l.fmeasure,
            rouge_lsum: d.rouge_lsum.fmeasure,
        }
    }
}

/// ROUGE F-measures of one prediction, each type taking its best reference. With no
/// references every score is 0.
pub fn rouge(prediction: &str, references: &[&str]) -> RougeScores {
    rouge_detail(prediction, references).into()
}

fn mean_rouge<'a>(
    rows: impl Iterator<Item = (&'a str, &'a [String])>,
    progress: &dyn Progress,
) -> RougeScores {
    let mut sum = RougeScores::default();
    let mut n = 0usize;
    for (pred, refs) in rows {
        progress.advance(1);
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let s = rouge(pred, &refs);
        // Left-to-right sums, like Python's `sum(list) / len(list)`.
        sum.rouge1 += s.rouge1;
        sum.rouge2 += s.rouge2;
        sum.rouge_l += s.rouge_l;
        sum.rouge_lsum += s.rouge_lsum;
        n += 1;
    }
    if n == 0 {
        return sum;
    }
    let n = n as f64;
    RougeScores {
        rouge1: sum.rouge1 / n,
        rouge2: sum.rouge2 / n,
        rouge_l: sum.rouge_l / n,
        rouge_lsum: sum.rouge_lsum / n,
    }
}

/// Mean of per-example ROUGE F-measures (0 for an empty corpus).
/// Panics if `preds` and `refs` differ in length (a programming error, not an input error).
pub fn corpus_rouge(preds: &[String], refs: &[Vec<String>]) -> RougeScores {
    assert_eq!(
        preds.len(),
        refs.len(),
        "corpus_rouge: {} predictions but {} reference lists",
        preds.len(),
        refs.len()
    );
    mean_rouge(
        preds
            .iter()
            .map(String::as_str)
            .zip(refs.iter().map(Vec::as_slice)),
        &NoProgress,
    )
}

/// Corpus BLEU, 0..=100, as `sacrebleu.corpus_bleu(preds, ref_streams)` with its defaults.
/// Rows may have different numbers of references (see [`corpus_bleu_detail`]).
pub fn corpus_bleu(preds: &[String], refs: &[Vec<String>]) -> f64 {
    corpus_bleu_detail(preds, refs).score
}

/// True when the prediction equals some reference after stripping surrounding whitespace
/// (Python's `str.strip()` set of whitespace).
pub fn exact_match(pred: &str, refs: &[&str]) -> bool {
    let p = py_strip(pred);
    refs.iter().any(|r| py_strip(r) == p)
}

/// Lowercase (full Unicode), delete ASCII punctuation (Python's `string.punctuation`; so
/// "don't" becomes "dont"), and collapse whitespace runs to one space, stripping the ends.
pub fn normalize_answer(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    py_split(&lower).collect::<Vec<_>>().join(" ")
}

/// Exact match after [`normalize_answer`] on both sides.
pub fn exact_match_normalized(pred: &str, refs: &[&str]) -> bool {
    let p = normalize_answer(pred);
    refs.iter().any(|r| normalize_answer(r) == p)
}

/// Fraction (0..=1) of predictions that exactly match one of their references, strictly
/// ([`exact_match`]) or after normalisation ([`exact_match_normalized`]); 0 for no rows.
pub fn accuracy(preds: &[String], refs: &[Vec<String>], normalized: bool) -> f64 {
    assert_eq!(
        preds.len(),
        refs.len(),
        "accuracy: {} predictions but {} reference lists",
        preds.len(),
        refs.len()
    );
    let hits = preds
        .iter()
        .zip(refs)
        .filter(|(p, r)| {
            let r: Vec<&str> = r.iter().map(String::as_str).collect();
            if normalized {
                exact_match_normalized(p, &r)
            } else {
                exact_match(p, &r)
            }
        })
        .count();
    if preds.is_empty() {
        0.0
    } else {
        hits as f64 / preds.len() as f64
    }
}

/// Everything `score_rows` reports. ROUGE values are mean F-measures in 0..=1, `bleu` is
/// 0..=100, `exact_match` the fraction of rows that match strictly.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Scores {
    pub rouge1: f64,
    pub rouge2: f64,
    #[serde(rename = "rougeL")]
    pub rouge_l: f64,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: f64,
    pub bleu: f64,
    pub exact_match: f64,
    pub n: usize,
}

/// All metrics over `(prediction, references)` rows (as [`read_predictions`] returns them).
pub fn score_rows(rows: &[(String, Vec<String>)]) -> Scores {
    score_rows_with_progress(rows, &NoProgress)
}

/// [`score_rows`], reporting the rows scored (ROUGE, the per-row part) to `progress`.
pub fn score_rows_with_progress(rows: &[(String, Vec<String>)], progress: &dyn Progress) -> Scores {
    progress.start("score", rows.len() as u64, "rows");
    let r = mean_rouge(
        rows.iter().map(|(p, refs)| (p.as_str(), refs.as_slice())),
        progress,
    );
    progress.finish();
    let (preds, refs): (Vec<String>, Vec<Vec<String>>) = rows.iter().cloned().unzip();
    Scores {
        rouge1: r.rouge1,
        rouge2: r.rouge2,
        rouge_l: r.rouge_l,
        rouge_lsum: r.rouge_lsum,
        bleu: corpus_bleu(&preds, &refs),
        exact_match: accuracy(&preds, &refs, false),
        n: rows.len(),
    }
}
