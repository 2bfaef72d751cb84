//! Examples as text with the trained tokens marked, to check a data config by eye.
use super::{Example, IGNORE};
use crate::tokenizer::Tokenizer;

/// How trained text is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreviewStyle {
    /// `[[trained text]]`.
    #[default]
    Brackets,
    /// Trained text in green (ANSI escape codes, for a terminal).
    Ansi,
}

/// The first `n` examples, trained spans wrapped in `[[` `]]`.
pub fn preview(examples: &[Example], tok: &Tokenizer, n: usize) -> String {
    preview_with(examples, tok, n, PreviewStyle::Brackets)
}

/// The first `n` examples, each under a header with its source and token counts; runs of
/// trained and untrained tokens are decoded separately (special tokens shown) and trained runs
/// are marked per `style`.
pub fn preview_with(
    examples: &[Example],
    tok: &Tokenizer,
    n: usize,
    style: PreviewStyle,
) -> String {
    let (open, close) = match style {
        PreviewStyle::Brackets => ("[[", "]]"),
        PreviewStyle::Ansi => ("\x1b[32m", "\x1b[0m"),
    };
    let mut out = String::new();
    for (k, ex) in examples.iter().take(n).enumerate() {
        out.push_str(&format!(
            "--- example {} ({}): {} tokens, {} trained ---\n",
            k + 1,
            ex.source,
            ex.len(),
            ex.n_trained()
        ));
        let mut start = 0;
        while start < ex.len() {
            let trained = ex.labels[start] != IGNORE;
            let end = (start..ex.len())
                .find(|&i| (ex.labels[i] != IGNORE) != trained)
                .unwrap_or(ex.len());
            let text = tok
                .decode(&ex.input_ids[start..end], false)
                .unwrap_or_else(|e| format!("<{e}>"));
            if trained {
                out.push_str(open);
                out.push_str(&text);
                out.push_str(close);
            } else {
                out.push_str(&text);
            }
            start = end;
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode_pair;
    use crate::data::testutil::{smollm2, src};

    #[test]
    fn preview_marks_exactly_the_completion_and_eos() {
        let tok = smollm2();
        let ex = encode_pair(tok, "Q: 2+2?\nA:", " 4", src(12)).unwrap();
        let eos = tok.id_to_token(tok.eos_ids()[0]).unwrap();
        let bos = if tok.add_bos() {
            tok.id_to_token(tok.bos_id().unwrap()).unwrap()
        } else {
            String::new()
        };
        let p = preview(std::slice::from_ref(&ex), tok, 5);
        assert_eq!(
            p,
            format!(
                "--- example 1 (d/train.jsonl: line 12): {} tokens, {} trained ---\n{bos}Q: 2+2?\nA:[[ 4{eos}]]\n",
                ex.len(),
                ex.n_trained()
            )
        );
        let a = preview_with(std::slice::from_ref(&ex), tok, 1, PreviewStyle::Ansi);
        assert!(a.contains(&format!("A:\x1b[32m 4{eos}\x1b[0m")), "{a:?}");
        assert_eq!(preview(&[ex], tok, 0), "");
    }
}
