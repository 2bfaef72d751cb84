//! Tokenization with loss masks taken from spans recorded while rendering.
//!
//! An example is rendered as a list of text pieces, each known to be trained or not (prompt /
//! completion; or, for a chat, the text before each assistant turn and the turn itself). Each
//! piece is tokenized on its own and the ids are concatenated, so token boundaries fall on span
//! boundaries and the mask is exact. The completion is never located by searching the text.
use serde_json::Value;

use super::read::type_name;
use super::{Row, Source, TemplateSet, IGNORE};
use crate::tokenizer::{ChatMessage, Tokenizer};
use crate::{Error, Result};

/// One tokenized training example. `labels[i]` is `input_ids[i]` on trained tokens and
/// [`IGNORE`] elsewhere (aligned with the inputs; the loss shifts).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub source: Source,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn n_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }

    /// Where the final trained span (the completion, or the last assistant turn) starts: the
    /// position after the last ignored token.
    pub fn completion_start(&self) -> usize {
        self.labels
            .iter()
            .rposition(|&l| l == IGNORE)
            .map_or(0, |i| i + 1)
    }
}

/// The end-of-sequence id appended after a completion: the first of the tokenizer's eos ids.
pub(crate) fn eos_id(tok: &Tokenizer) -> Result<u32> {
    tok.eos_ids().first().copied().ok_or_else(|| {
        Error::msg("the tokenizer has no end-of-sequence token to end completions with")
    })
}

/// Tokenize pieces `(text, trained)` and concatenate them.
fn encode_pieces(
    tok: &Tokenizer,
    pieces: &[(&str, bool)],
    ids: &mut Vec<u32>,
    labels: &mut Vec<i64>,
) -> Result<()> {
    for &(text, trained) in pieces {
        if text.is_empty() {
            continue;
        }
        for id in tok.encode(text, false)? {
            ids.push(id);
            labels.push(if trained { id as i64 } else { IGNORE });
        }
    }
    Ok(())
}

/// `[BOS if the model adds one] prompt completion EOS`, trained on the completion and EOS.
pub fn encode_pair(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    source: Source,
) -> Result<Example> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    if tok.add_bos() {
        if let Some(bos) = tok.bos_id() {
            ids.push(bos);
            labels.push(IGNORE);
        }
    }
    encode_pieces(
        tok,
        &[(prompt, false), (completion, true)],
        &mut ids,
        &mut labels,
    )?;
    let eos = eos_id(tok)?;
    ids.push(eos);
    labels.push(eos as i64);
    Ok(Example {
        input_ids: ids,
        labels,
        source,
    })
}

/// A prompt/completion pair for an encoder-decoder, as transformers' seq2seq recipes tokenize
/// it: the encoder reads `[BOS if the model adds one] prompt EOS`; the labels (the decoder's
/// targets, [`crate::data::Targets::Decoder`]) are `completion EOS`, every one trained.
pub fn encode_seq2seq_pair(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    source: Source,
) -> Result<Example> {
    let eos = eos_id(tok)?;
    let mut input_ids = tok.encode(prompt, true)?;
    input_ids.push(eos);
    let mut labels: Vec<i64> = tok
        .encode(completion, false)?
        .into_iter()
        .map(i64::from)
        .collect();
    labels.push(eos as i64);
    Ok(Example {
        input_ids,
        labels,
        source,
    })
}

/// A prompt/completion pair as a model of `kind` trains on it and is scored on: a decoder
/// reads both ([`encode_pair`]), an encoder-decoder encodes the prompt and predicts the
/// completion ([`encode_seq2seq_pair`]). Encoders have no completion to predict: an error.
pub fn encode_pair_for(
    kind: crate::model::ArchitectureKind,
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
    source: Source,
) -> Result<Example> {
    use crate::model::ArchitectureKind as K;
    match kind {
        K::Decoder => encode_pair(tok, prompt, completion, source),
        K::EncoderDecoder => encode_seq2seq_pair(tok, prompt, completion, source),
        K::Encoder => Err(Error::msg(format!(
            "{source}: an encoder model does not generate, so it has no completion to score"
        ))),
    }
}

/// The prompt of an example made by [`encode_pair_for`] for a model of `kind`: what
/// generation starts from.
pub fn prompt_ids(kind: crate::model::ArchitectureKind, ex: &Example) -> &[u32] {
    match kind {
        crate::model::ArchitectureKind::Decoder => &ex.input_ids[..ex.completion_start()],
        _ => &ex.input_ids,
    }
}

/// A conversation rendered with the model's chat template, trained on the assistant turns.
///
/// For each assistant turn `i`, `messages[..i]` is rendered with the generation prompt and
/// `messages[..=i]` without; the turn's trained text is what the second adds to the first, and
/// the untrained text before it is what the first adds to the previous turn's rendering. Both
/// must be prefix extensions, or the template is not prefix-stable and this is an error (the
/// mask could not be exact). Messages after the last assistant turn are not used. If the last
/// trained span has no end-of-sequence token in it, the first eos id is appended as trained so
/// the model learns to stop. No BOS is added: chat templates write their own (as transformers'
/// `apply_chat_template` does).
pub fn encode_chat(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    extra: &Value,
    source: Source,
) -> Result<Example> {
    let tmpl = tok.chat_template().ok_or_else(|| {
        Error::msg(format!(
            "{source}: a chat dataset needs the model's chat template, and this tokenizer has none"
        ))
    })?;
    let last = messages
        .iter()
        .rposition(|m| m.role == "assistant")
        .ok_or_else(|| {
            Error::msg(format!(
                "{source}: the conversation has no assistant turn to train on"
            ))
        })?;
    let render = |msgs: &[ChatMessage], gen: bool| {
        tmpl.render(msgs, gen, extra)
            .map_err(|e| Error::msg(format!("{source}: {e}")))
    };
    let mut texts: Vec<(String, bool)> = Vec::new();
    let mut done = String::new();
    for i in 0..=last {
        if messages[i].role != "assistant" {
            continue;
        }
        let prefix = render(&messages[..i], true)?;
        let before = prefix.strip_prefix(done.as_str()).ok_or_else(|| {
            Error::msg(format!(
                "{source}: the chat template is not prefix-stable: rendering messages 1..{i} \
                 does not start with the rendering of the conversation up to the previous assistant turn"
            ))
        })?;
        let full = render(&messages[..=i], false)?;
        let turn = full.strip_prefix(prefix.as_str()).ok_or_else(|| {
            Error::msg(format!(
                "{source}: the chat template is not prefix-stable: rendering message {} (assistant) \
                 does not extend the generation prompt rendered before it",
                i + 1
            ))
        })?;
        texts.push((before.to_string(), false));
        texts.push((turn.to_string(), true));
        done = full;
    }
    let pieces: Vec<(&str, bool)> = texts.iter().map(|(t, b)| (t.as_str(), *b)).collect();
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    encode_pieces(tok, &pieces, &mut ids, &mut labels)?;
    let eos_ids = tok.eos_ids();
    let start = labels
        .iter()
        .rposition(|&l| l == IGNORE)
        .map_or(0, |i| i + 1);
    if !ids[start..].iter().any(|id| eos_ids.contains(id)) {
        let eos = eos_id(tok)?;
        ids.push(eos);
        labels.push(eos as i64);
    }
    Ok(Example {
        input_ids: ids,
        labels,
        source,
    })
}

/// A row's `messages` field as chat messages; wrong shapes are errors naming the row and field.
pub fn parse_messages(row: &Row, field: &str, src: &Source) -> Result<Vec<ChatMessage>> {
    let bad = |path: String, what: String| Error::msg(format!("{src}: field `{path}`: {what}"));
    let items = match row.fields.get(field) {
        Some(Value::Array(items)) => items,
        None => {
            return Err(Error::msg(format!(
            "{src}: no field `{field}` (a chat dataset needs a list of {{role, content}} messages)"
        )))
        }
        Some(other) => {
            return Err(bad(
                field.to_string(),
                format!(
                    "expected an array of {{role, content}} objects, found {}",
                    type_name(other)
                ),
            ))
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().ok_or_else(|| {
                bad(
                    format!("{field}[{i}]"),
                    format!(
                        "expected a {{role, content}} object, found {}",
                        type_name(m)
                    ),
                )
            })?;
            let text = |key: &str| match obj.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(
                    format!("{field}[{i}].{key}"),
                    format!("expected a string, found {}", type_name(other)),
                )),
                None => Err(bad(format!("{field}[{i}].{key}"), "missing".to_string())),
            };
            Ok(ChatMessage::new(text("role")?, text("content")?))
        })
        .collect()
}

/// How the rows of one dataset become examples.
#[derive(Debug, Clone)]
pub enum Encoder {
    /// Prompt and completion templates. With `chat`, the prompt is a user turn and the
    /// completion the assistant's answer, rendered through the model's chat template.
    Pair { templates: TemplateSet, chat: bool },
    /// Rows hold a conversation in `field` (`[{role, content}, ...]`).
    Chat { field: String },
}

impl Encoder {
    pub fn encode(&self, tok: &Tokenizer, row: &Row, src: Source) -> Result<Example> {
        match self {
            Encoder::Pair { templates, chat } => {
                let (prompt, completion) = templates.render(row, &src)?;
                if *chat {
                    let msgs = [
                        ChatMessage::new("user", prompt),
                        ChatMessage::new("assistant", completion),
                    ];
                    encode_chat(tok, &msgs, &Value::Null, src)
                } else {
                    encode_pair(tok, &prompt, &completion, src)
                }
            }
            Encoder::Chat { field } => {
                let msgs = parse_messages(row, field, &src)?;
                encode_chat(tok, &msgs, &Value::Null, src)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{smollm2, src, tiny_tokenizer, words};
    use crate::data::Loc;
    use serde_json::json;

    #[test]
    fn pair_labels_cover_completion_and_eos_only() {
        let tok = tiny_tokenizer(None);
        let ex = encode_pair(&tok, "summarize : the cat sat", "cat sat", src(3)).unwrap();
        let bos = tok.bos_id().unwrap();
        let eos = tok.eos_ids()[0];
        let prompt = words(&tok, "summarize : the cat sat");
        let completion = words(&tok, "cat sat");
        let mut want_ids = vec![bos];
        want_ids.extend(&prompt);
        want_ids.extend(&completion);
        want_ids.push(eos);
        assert_eq!(ex.input_ids, want_ids);
        let mut want_labels = vec![IGNORE; 1 + prompt.len()];
        want_labels.extend(completion.iter().map(|&i| i as i64));
        want_labels.push(eos as i64);
        assert_eq!(ex.labels, want_labels);
        assert_eq!(ex.n_trained(), completion.len() + 1);
        assert_eq!(ex.completion_start(), 1 + prompt.len());
    }

    /// The completion repeats prompt text ("cat sat"): the mask must come from the spans, not
    /// from finding the completion text (which would also match inside the prompt).
    #[test]
    fn pair_mask_does_not_depend_on_text_search() {
        let tok = tiny_tokenizer(None);
        let ex = encode_pair(&tok, "cat sat", "cat sat", src(1)).unwrap();
        let n = words(&tok, "cat sat").len();
        assert_eq!(&ex.labels[..1 + n], &vec![IGNORE; 1 + n][..]);
        assert!(ex.labels[1 + n..].iter().all(|&l| l != IGNORE));
    }

    #[test]
    fn chat_trains_assistant_turns_of_a_multi_turn_conversation() {
        let tok = tiny_tokenizer(Some(crate::data::testutil::TINY_CHAT));
        let msgs = vec![
            ChatMessage::new("system", "be nice"),
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi there"),
            ChatMessage::new("user", "the cat"),
            ChatMessage::new("assistant", "sat"),
            ChatMessage::new("user", "bye"),
        ];
        let ex = encode_chat(&tok, &msgs, &Value::Null, src(1)).unwrap();
        // The tiny template writes "<|role|> content </s>" per turn; the expected ids and mask
        // are assembled turn by turn here, independently of the renderer.
        let mut ids = Vec::new();
        let mut labels = Vec::new();
        let mut push = |text: &str, trained: bool| {
            for id in words(&tok, text) {
                ids.push(id);
                labels.push(if trained { id as i64 } else { IGNORE });
            }
        };
        push(
            "<|system|> be nice </s> <|user|> hello </s> <|assistant|>",
            false,
        );
        push("hi there </s>", true);
        push("<|user|> the cat </s> <|assistant|>", false);
        push("sat </s>", true);
        assert_eq!(ex.input_ids, ids);
        assert_eq!(ex.labels, labels);
    }

    #[test]
    fn chat_without_eos_in_turn_gets_eos_appended() {
        let tmpl = "{% for m in messages %}{{ m.role }} : {{ m.content }} {% endfor %}\
                    {% if add_generation_prompt %}assistant : {% endif %}";
        let tok = tiny_tokenizer(Some(tmpl));
        let msgs = vec![
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi"),
        ];
        let ex = encode_chat(&tok, &msgs, &Value::Null, src(1)).unwrap();
        let eos = tok.eos_ids()[0];
        assert_eq!(*ex.input_ids.last().unwrap(), eos);
        let trained: Vec<u32> = ex
            .input_ids
            .iter()
            .zip(&ex.labels)
            .filter(|(_, &l)| l != IGNORE)
            .map(|(&i, _)| i)
            .collect();
        let mut want = words(&tok, "hi");
        want.push(eos);
        assert_eq!(trained, want);
    }

    #[test]
    fn chat_errors_on_templates_that_are_not_prefix_stable() {
        // Marks the last message, so earlier renderings are not prefixes of later ones.
        let tmpl =
            "{% for m in messages %}{% if loop.last %}last {% endif %}{{ m.content }} {% endfor %}";
        let tok = tiny_tokenizer(Some(tmpl));
        let msgs = vec![
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "hi"),
        ];
        let e = encode_chat(&tok, &msgs, &Value::Null, src(9))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 9") && e.contains("not prefix-stable"),
            "{e}"
        );
        let e = encode_chat(&tok, &msgs[..1], &Value::Null, src(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no assistant turn"), "{e}");
        let plain = tiny_tokenizer(None);
        let e = encode_chat(&plain, &msgs, &Value::Null, src(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn messages_field_errors_name_row_and_field() {
        let row = |v: Value| Row {
            loc: Loc::Line(5),
            fields: v.as_object().unwrap().clone(),
        };
        let e = parse_messages(&row(json!({"messages": "hi"})), "messages", &src(5))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 5") && e.contains("field `messages`") && e.contains("found a string"),
            "{e}"
        );
        let e = parse_messages(
            &row(json!({"messages": [{"role": "user", "content": null}]})),
            "messages",
            &src(5),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`messages[0].content`: expected a string, found null"),
            "{e}"
        );
        let e = parse_messages(&row(json!({"text": []})), "messages", &src(5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no field `messages`"), "{e}");
    }

    /// On SmolLM2's real ChatML template: the trained text decodes to exactly the assistant
    /// content plus the end of turn, and the default system prompt is not trained.
    #[test]
    fn smollm2_chat_mask_is_the_assistant_turn() {
        let tok = smollm2();
        let msgs = vec![
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4."),
            ChatMessage::new("user", "And 3+3?"),
            ChatMessage::new("assistant", "It is 6."),
        ];
        let ex = encode_chat(tok, &msgs, &Value::Null, src(1)).unwrap();
        let full = tok
            .chat_template()
            .unwrap()
            .render(&msgs, false, &Value::Null)
            .unwrap();
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), full);
        let mut spans = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        for (&id, &l) in ex.input_ids.iter().zip(&ex.labels) {
            if l != IGNORE {
                cur.push(id);
            } else if !cur.is_empty() {
                spans.push(tok.decode(&std::mem::take(&mut cur), false).unwrap());
            }
        }
        spans.push(tok.decode(&cur, false).unwrap());
        assert_eq!(spans, vec!["4.<|im_end|>\n", "It is 6.<|im_end|>\n"]);
    }
}
