//! Corpus BLEU exactly as `sacrebleu.corpus_bleu(hyps, ref_streams)` (sacrebleu 2.6.0) computes
//! it with its defaults: `13a` tokenisation, case-sensitive, n-grams up to 4, `exp` smoothing
//! (NIST's: the k-th order with no match counts as precision 1/(2^k * total)), no effective
//! order, brevity penalty against the closest reference length (the shorter one on ties).
//! Rows may have different numbers of references; see [`corpus_bleu_detail`].
use std::collections::HashMap;

use super::pytext::{py_rstrip, py_split};

const MAX_ORDER: usize = 4;

/// A BLEU score with the sufficient statistics behind it (sacrebleu's `BLEUScore` fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BleuScore {
    /// 0..=100.
    pub score: f64,
    /// Clipped n-gram matches for n = 1..=4.
    pub counts: [u64; MAX_ORDER],
    /// Hypothesis n-grams for n = 1..=4.
    pub totals: [u64; MAX_ORDER],
    /// Per-order precisions in percent, as sacrebleu reports them (smoothed where a count is 0).
    pub precisions: [f64; MAX_ORDER],
    pub bp: f64,
    pub sys_len: u64,
    pub ref_len: u64,
}

/// One character of the first 13a regex `([\{-\~\[-\` -\&\(-\+\:-\@\/])`, which gets spaces
/// around it.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// `re.sub` of a two-character pattern: scan left to right, and where `hit(a, b)` holds for the
/// pair at the cursor, emit `emit(a, b)` and skip both (matches never overlap).
fn sub_pairs(
    s: &[char],
    hit: impl Fn(char, char) -> bool,
    emit: impl Fn(&mut Vec<char>, char, char),
) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() + s.len() / 4);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && hit(s[i], s[i + 1]) {
            emit(&mut out, s[i], s[i + 1]);
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// sacrebleu's `Tokenizer13a()(line)` (mteval-v13a): tokens joined by single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut s: Vec<char> = Vec::with_capacity(line.len() + 8);
    for c in format!(" {line} ").chars() {
        if is_13a_symbol(c) {
            s.extend([' ', c, ' ']);
        } else {
            s.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let dot = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> '\1 \2 '
    let s = sub_pairs(
        &s,
        |a, b| !digit(a) && dot(b),
        |o, a, b| o.extend([a, ' ', b, ' ']),
    );
    // ([\.,])([^0-9]) -> ' \1 \2'
    let s = sub_pairs(
        &s,
        |a, b| dot(a) && !digit(b),
        |o, a, b| o.extend([' ', a, ' ', b]),
    );
    // ([0-9])(-) -> '\1 \2 '
    let s = sub_pairs(
        &s,
        |a, b| digit(a) && b == '-',
        |o, a, b| o.extend([a, ' ', b, ' ']),
    );
    let s: String = s.into_iter().collect();
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// All n-grams (1..=4) of a 13a-tokenised line with their counts, and its token count.
/// Tokens hold no whitespace and are joined by single spaces, so an n-gram is a substring.
fn ngrams(line: &str) -> (HashMap<&str, u64>, u64) {
    let spans: Vec<(usize, usize)> = {
        let mut v = Vec::new();
        let mut start = 0;
        for piece in line.split(' ') {
            if !piece.is_empty() {
                v.push((start, start + piece.len()));
            }
            start += piece.len() + 1;
        }
        v
    };
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in spans.windows(n) {
            *counts.entry(&line[w[0].0..w[n - 1].1]).or_insert(0) += 1;
        }
    }
    (counts, spans.len() as u64)
}

/// sacrebleu's `_preprocess_segment`: `.rstrip()`, then 13a.
fn preprocess(s: &str) -> String {
    tokenize_13a(py_rstrip(s))
}

/// [`corpus_bleu`](super::corpus_bleu) with its statistics.
///
/// `refs[i]` are row i's references, any number of them. sacrebleu instead takes reference
/// *streams* of equal length and drops `None` entries per row, so this equals
/// `corpus_bleu(preds, streams)` with stream k holding each row's k-th reference or `None` where
/// the row has fewer. An empty string is a real (zero-length) reference, not a missing one.
/// A row with no references is scored against one empty reference (sacrebleu fails on it);
/// an empty corpus scores 0. Panics if the two slices differ in length (a programming error).
pub fn corpus_bleu_detail(preds: &[String], refs: &[Vec<String>]) -> BleuScore {
    assert_eq!(
        preds.len(),
        refs.len(),
        "corpus_bleu: {} predictions but {} reference lists",
        preds.len(),
        refs.len()
    );
    let mut counts = [0u64; MAX_ORDER];
    let mut totals = [0u64; MAX_ORDER];
    let (mut sys_len, mut ref_len) = (0u64, 0u64);
    for (pred, row_refs) in preds.iter().zip(refs) {
        let ref_lines: Vec<String> = if row_refs.is_empty() {
            vec![String::new()]
        } else {
            row_refs.iter().map(|r| preprocess(r)).collect()
        };
        // Per n-gram, the most times any one reference has it (the clip).
        let mut max_ref: HashMap<&str, u64> = HashMap::new();
        let mut ref_lens = Vec::with_capacity(ref_lines.len());
        for line in &ref_lines {
            let (c, len) = ngrams(line);
            ref_lens.push(len);
            for (g, k) in c {
                let e = max_ref.entry(g).or_insert(0);
                *e = (*e).max(k);
            }
        }
        let hyp = preprocess(pred);
        let (hyp_counts, hyp_len) = ngrams(&hyp);
        // `_get_closest_ref_len`: smallest |hyp - ref|, the shorter reference on ties.
        let mut closest: Option<(u64, u64)> = None;
        for &l in &ref_lens {
            let d = hyp_len.abs_diff(l);
            closest = match closest {
                Some((cd, cl)) if d > cd || (d == cd && l >= cl) => Some((cd, cl)),
                _ => Some((d, l)),
            };
        }
        sys_len += hyp_len;
        ref_len += closest.map_or(0, |(_, l)| l);
        for (g, k) in hyp_counts {
            let n = g.split(' ').count() - 1;
            totals[n] += k;
            if let Some(&r) = max_ref.get(g) {
                counts[n] += k.min(r);
            }
        }
    }
    compute_bleu(counts, totals, sys_len, ref_len)
}

/// sacrebleu's `BLEU.compute_bleu` with `smooth_method="exp"`, float operations in its order.
fn compute_bleu(counts: [u64; 4], totals: [u64; 4], sys_len: u64, ref_len: u64) -> BleuScore {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let mut precisions = [0.0f64; MAX_ORDER];
    let done = |score, precisions| BleuScore {
        score,
        counts,
        totals,
        precisions,
        bp,
        sys_len,
        ref_len,
    };
    if counts.iter().all(|&c| c == 0) {
        return done(0.0, precisions);
    }
    let mut smooth = 1.0f64;
    for n in 0..MAX_ORDER {
        if totals[n] == 0 {
            break;
        }
        precisions[n] = if counts[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }
    // `my_log`: log(0) is floored to -9999999999, so a missing order zeroes the score.
    let log_sum = precisions
        .iter()
        .map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() })
        .fold(0.0f64, |a, b| a + b);
    done(bp * (log_sum / MAX_ORDER as f64).exp(), precisions)
}
