//! Examples as text with the trained tokens marked, to check a data config by eye.
use super::{Example, LabelMap, Prepared, Targets, IGNORE};
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
/// are marked per `style`. Examples are read as causal LM ones (one label per input id).
pub fn preview_with(
    examples: &[Example],
    tok: &Tokenizer,
    n: usize,
    style: PreviewStyle,
) -> String {
    preview_targets(examples, Targets::NextToken, None, tok, n, style)
}

/// [`preview_with`] for examples of any [`Targets`]: per-token labels are marked in the input
/// text; decoder targets and classes are shown on a line of their own after it (class names
/// from `labels`).
pub fn preview_targets(
    examples: &[Example],
    targets: Targets,
    labels: Option<&LabelMap>,
    tok: &Tokenizer,
    n: usize,
    style: PreviewStyle,
) -> String {
    let (open, close) = match style {
        PreviewStyle::Brackets => ("[[", "]]"),
        PreviewStyle::Ansi => ("\x1b[32m", "\x1b[0m"),
    };
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_else(|e| format!("<{e}>"));
    let mut out = String::new();
    for (k, ex) in examples.iter().take(n).enumerate() {
        out.push_str(&format!(
            "--- example {} ({}): {} tokens, {} trained ---\n",
            k + 1,
            ex.source,
            ex.len(),
            ex.n_trained()
        ));
        let aligned = matches!(targets, Targets::NextToken | Targets::Token)
            && ex.labels.len() == ex.input_ids.len();
        if !aligned {
            out.push_str(&decode(&ex.input_ids));
            out.push('\n');
            match targets {
                Targets::Decoder => {
                    let ids: Vec<u32> = ex
                        .labels
                        .iter()
                        .filter(|&&l| l != IGNORE)
                        .map(|&l| l as u32)
                        .collect();
                    out.push_str(&format!("=> target: {open}{}{close}\n", decode(&ids)));
                }
                Targets::Sequence => {
                    let class = ex.labels.first().copied().unwrap_or(IGNORE);
                    let name = labels
                        .and_then(|m| m.names.get(usize::try_from(class).ok()?))
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default();
                    out.push_str(&format!("=> class: {open}{class}{name}{close}\n"));
                }
                _ => out.push_str("=> labels do not match the input ids\n"),
            }
            continue;
        }
        let mut start = 0;
        while start < ex.len() {
            let trained = ex.labels[start] != IGNORE;
            let end = (start..ex.len())
                .find(|&i| (ex.labels[i] != IGNORE) != trained)
                .unwrap_or(ex.len());
            let text = decode(&ex.input_ids[start..end]);
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

impl Prepared {
    /// The first `n` training examples as [`preview_targets`] shows them; with a pre-training
    /// objective that draws masks, as masked in epoch 0 with `seed`.
    pub fn preview(&self, tok: &Tokenizer, n: usize, seed: u64, style: PreviewStyle) -> String {
        let shown: Vec<Example> = match &self.masking {
            Some(m) => self
                .train
                .iter()
                .take(n)
                .enumerate()
                .map(|(i, ex)| m.apply(ex, seed, 0, i))
                .collect::<crate::Result<_>>()
                .unwrap_or_else(|_| self.train.iter().take(n).cloned().collect()),
            None => self.train.iter().take(n).cloned().collect(),
        };
        preview_targets(&shown, self.targets, self.labels.as_ref(), tok, n, style)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::encode_pair;
    use crate::data::testutil::{smollm2, src, tiny_tokenizer, words};

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

    #[test]
    fn previews_show_decoder_targets_and_classes() {
        let tok = tiny_tokenizer(None);
        let ids = |s: &str| words(&tok, s);
        let ex = |input: &str, labels: Vec<i64>| Example {
            input_ids: ids(input),
            labels,
            source: src(3),
        };
        let target: Vec<i64> = ids("on the mat </s>").into_iter().map(i64::from).collect();
        let p = preview_targets(
            &[ex("the cat sat </s>", target)],
            Targets::Decoder,
            None,
            &tok,
            1,
            PreviewStyle::Brackets,
        );
        let dec = |s: &str| tok.decode(&ids(s), false).unwrap();
        assert!(
            p.ends_with(&format!(
                "{}\n=> target: [[{}]]\n",
                dec("the cat sat </s>"),
                dec("on the mat </s>")
            )),
            "{p:?}"
        );
        let map = LabelMap::from_list(&["neg".into(), "pos".into()], "[data]").unwrap();
        let p = preview_targets(
            &[ex("<s> the cat", vec![1])],
            Targets::Sequence,
            Some(&map),
            &tok,
            1,
            PreviewStyle::Brackets,
        );
        assert!(p.ends_with("=> class: [[1 (pos)]]\n"), "{p:?}");
        // Per-token labels (MLM) are marked where they are, the first position included.
        let p = preview_targets(
            &[ex("the cat sat", vec![5, IGNORE, IGNORE])],
            Targets::Token,
            None,
            &tok,
            1,
            PreviewStyle::Brackets,
        );
        assert!(p.ends_with("[[the]]cat sat\n"), "{p:?}");
    }
}
