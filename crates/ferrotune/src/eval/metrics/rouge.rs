//! ROUGE-1/2/L/Lsum as Google's `rouge-score` package (0.1.2) computes them with
//! `RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)`.
//!
//! Tokens: lowercase (Python's full Unicode lowercasing: `İ` gives `i` + a combining dot, the
//! Kelvin sign gives `k`), every run of characters outside `[a-z0-9]` becomes a separator, and
//! tokens longer than 3 characters go through the Porter stemmer ([`super::porter`]).
//! ROUGE-Lsum splits each text on `"\n"` (dropping empty pieces) and scores the summary-level
//! LCS with rouge-score's union-LCS and its guard against counting a token twice; which LCS the
//! backtrack picks changes the union, so the backtrack is ported with its exact tie-breaking.
use std::collections::HashMap;

use super::porter;

/// Precision, recall and F-measure of one ROUGE type, each in 0..=1.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

impl Prf {
    fn new(precision: f64, recall: f64) -> Self {
        // rouge-score's `scoring.fmeasure`.
        let fmeasure = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        Prf {
            precision,
            recall,
            fmeasure,
        }
    }
}

/// All four ROUGE types with precision and recall (what `score_multi` returns).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RougeDetail {
    pub rouge1: Prf,
    pub rouge2: Prf,
    #[serde(rename = "rougeL")]
    pub rouge_l: Prf,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: Prf,
}

/// rouge-score's `tokenize.tokenize(text, PorterStemmer())`.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        for l in c.to_lowercase() {
            cleaned.push(if l.is_ascii_lowercase() || l.is_ascii_digit() {
                l
            } else {
                ' '
            });
        }
    }
    cleaned
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.len() > 3 {
                porter::stem(t)
            } else {
                t.to_string()
            }
        })
        // rouge-score's final `^[a-z0-9]+$` check; the stemmer never leaves anything else, but
        // the filter costs nothing and keeps the port literal.
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for g in tokens.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

fn score_ngrams(target: &[String], prediction: &[String], n: usize) -> Prf {
    let t = ngram_counts(target, n);
    let p = ngram_counts(prediction, n);
    let overlap: usize = t
        .iter()
        .map(|(g, &c)| c.min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let t_total: usize = t.values().sum();
    let p_total: usize = p.values().sum();
    Prf::new(
        overlap as f64 / p_total.max(1) as f64,
        overlap as f64 / t_total.max(1) as f64,
    )
}

/// `_lcs_table`: (rows+1) x (cols+1), row-major.
/// The most word pairs one prediction and one reference may make ([`check_lcs_size`]): ROUGE-L
/// compares every word of one with every word of the other, and ROUGE-Lsum keeps that table
/// (4 bytes a cell here: 400 MB at this size; rouge-score's Python lists take ten times that).
pub const MAX_LCS_CELLS: u64 = 100_000_000;

/// Refuse a prediction / reference pair whose LCS table would pass [`MAX_LCS_CELLS`].
pub fn check_lcs_size(prediction: &str, references: &[&str]) -> Result<(), String> {
    let p = tokenize(prediction).len() as u64;
    for (i, r) in references.iter().enumerate() {
        let n = tokenize(r).len() as u64;
        if p.saturating_mul(n) > MAX_LCS_CELLS {
            return Err(format!(
                "the prediction ({p} words) and reference {} ({n} words) make {} word pairs for ROUGE-L, over the {MAX_LCS_CELLS} it compares; score shorter texts",
                i + 1,
                p.saturating_mul(n)
            ));
        }
    }
    Ok(())
}

pub(super) fn lcs_table(r: &[String], c: &[String]) -> Vec<Vec<u32>> {
    let mut t = vec![vec![0u32; c.len() + 1]; r.len() + 1];
    for i in 1..=r.len() {
        for j in 1..=c.len() {
            t[i][j] = if r[i - 1] == c[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    t
}

/// The LCS length alone, two rows of the table at a time (memory linear in `c`).
pub(super) fn lcs_len(r: &[String], c: &[String]) -> u32 {
    let (mut prev, mut cur) = (vec![0u32; c.len() + 1], vec![0u32; c.len() + 1]);
    for ri in r {
        for j in 1..=c.len() {
            cur[j] = if *ri == c[j - 1] {
                prev[j - 1] + 1
            } else {
                prev[j].max(cur[j - 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[c.len()]
}

fn score_lcs(target: &[String], prediction: &[String]) -> Prf {
    if target.is_empty() || prediction.is_empty() {
        return Prf::default();
    }
    let lcs = lcs_len(target, prediction) as f64;
    Prf::new(lcs / prediction.len() as f64, lcs / target.len() as f64)
}

/// `lcs_ind` + `_backtrack_norec`: indices into `r` of one LCS, with rouge-score's tie-breaking
/// (move left only when strictly better, otherwise up).
fn lcs_indices(r: &[String], c: &[String]) -> Vec<usize> {
    let t = lcs_table(r, c);
    let (mut i, mut j) = (r.len(), c.len());
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if r[i - 1] == c[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i][j - 1] > t[i - 1][j] {
            j -= 1;
        } else {
            i -= 1;
        }
    }
    out.reverse();
    out
}

fn summary_level_lcs(ref_sents: &[Vec<String>], can_sents: &[Vec<String>]) -> Prf {
    if ref_sents.is_empty() || can_sents.is_empty() {
        return Prf::default();
    }
    let m: usize = ref_sents.iter().map(Vec::len).sum();
    let n: usize = can_sents.iter().map(Vec::len).sum();
    if m == 0 || n == 0 {
        return Prf::default();
    }
    let mut cnt_r: HashMap<&str, usize> = HashMap::new();
    let mut cnt_c: HashMap<&str, usize> = HashMap::new();
    for t in ref_sents.iter().flatten() {
        *cnt_r.entry(t).or_insert(0) += 1;
    }
    for t in can_sents.iter().flatten() {
        *cnt_c.entry(t).or_insert(0) += 1;
    }
    let mut hits = 0usize;
    for r in ref_sents {
        // `_union_lcs`: union of the LCS positions against every candidate sentence, in order.
        let mut union: Vec<usize> = can_sents.iter().flat_map(|c| lcs_indices(r, c)).collect();
        union.sort_unstable();
        union.dedup();
        for &i in &union {
            let t = r[i].as_str();
            if let (Some(cr), Some(cc)) = (cnt_r.get_mut(t), cnt_c.get_mut(t)) {
                if *cr > 0 && *cc > 0 {
                    hits += 1;
                    *cr -= 1;
                    *cc -= 1;
                }
            }
        }
    }
    Prf::new(hits as f64 / n as f64, hits as f64 / m as f64)
}

fn sentences(text: &str) -> Vec<Vec<String>> {
    text.split('\n')
        .filter(|s| !s.is_empty())
        .map(tokenize)
        .collect()
}

/// Pre-tokenised text: the whole text and its newline-separated sentences.
struct Tokenized {
    tokens: Vec<String>,
    sentences: Vec<Vec<String>>,
}

impl Tokenized {
    fn new(text: &str) -> Self {
        Tokenized {
            tokens: tokenize(text),
            sentences: sentences(text),
        }
    }
}

/// `RougeScorer.score(target, prediction)`.
fn score_one(target: &Tokenized, prediction: &Tokenized) -> RougeDetail {
    RougeDetail {
        rouge1: score_ngrams(&target.tokens, &prediction.tokens, 1),
        rouge2: score_ngrams(&target.tokens, &prediction.tokens, 2),
        rouge_l: score_lcs(&target.tokens, &prediction.tokens),
        rouge_lsum: summary_level_lcs(&target.sentences, &prediction.sentences),
    }
}

/// `RougeScorer.score_multi(references, prediction)`: each type independently takes the
/// reference with the highest F-measure (the first one on ties, like `np.argmax`), keeping that
/// reference's precision and recall. No references scores zero (rouge-score raises there).
pub fn rouge_detail(prediction: &str, references: &[&str]) -> RougeDetail {
    let pred = Tokenized::new(prediction);
    let mut best: Option<RougeDetail> = None;
    for r in references {
        let s = score_one(&Tokenized::new(r), &pred);
        best = Some(match best {
            None => s,
            Some(b) => {
                let pick = |old: Prf, new: Prf| {
                    if new.fmeasure > old.fmeasure {
                        new
                    } else {
                        old
                    }
                };
                RougeDetail {
                    rouge1: pick(b.rouge1, s.rouge1),
                    rouge2: pick(b.rouge2, s.rouge2),
                    rouge_l: pick(b.rouge_l, s.rouge_l),
                    rouge_lsum: pick(b.rouge_lsum, s.rouge_lsum),
                }
            }
        });
    }
    best.unwrap_or_default()
}
