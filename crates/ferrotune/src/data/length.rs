//! What to do with examples longer than `max_seq_len`.
use serde::Deserialize;

use super::{Example, IGNORE};
use crate::{Error, Result};

/// `length_policy` in `[data]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthPolicy {
    /// Drop tokens from the start of the prompt (after a leading BOS, which is kept) so the
    /// completion stays whole. If the completion alone does not fit, the prompt is dropped
    /// entirely and the completion's end is cut (counted in `truncated_completion`).
    #[default]
    TruncatePromptStart,
    /// Skip the example (counted in `dropped`).
    Drop,
    /// Stop with an error naming the example's file and line and the lengths.
    Error,
}

/// Counts of what a length policy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LengthStats {
    /// Examples that fit as they were.
    pub fit: usize,
    /// Examples whose prompt start was cut (the completion kept whole).
    pub truncated_prompt: usize,
    /// Examples whose completion alone was too long: prompt removed, completion end cut.
    pub truncated_completion: usize,
    pub dropped: usize,
}

impl LengthStats {
    pub fn add(&mut self, o: &LengthStats) {
        self.fit += o.fit;
        self.truncated_prompt += o.truncated_prompt;
        self.truncated_completion += o.truncated_completion;
        self.dropped += o.dropped;
    }
}

/// Fit `ex` into `max_len` tokens. The completion is the final trained span
/// ([`Example::completion_start`]); `bos` is the id a leading BOS would have (kept when cutting).
/// Returns `None` when the example is dropped.
pub fn apply_length_policy(
    mut ex: Example,
    max_len: usize,
    policy: LengthPolicy,
    bos: Option<u32>,
    stats: &mut LengthStats,
) -> Result<Option<Example>> {
    let len = ex.len();
    if len <= max_len {
        stats.fit += 1;
        return Ok(Some(ex));
    }
    let start = ex.completion_start();
    match policy {
        LengthPolicy::Drop => {
            stats.dropped += 1;
            Ok(None)
        }
        LengthPolicy::Error => Err(Error::msg(format!(
            "{}: example is {len} tokens (prompt {start}, completion {}), more than max_seq_len {max_len} (length_policy = \"error\")",
            ex.source,
            len - start
        ))),
        LengthPolicy::TruncatePromptStart => {
            let head = usize::from(
                bos.is_some() && ex.input_ids.first() == bos.as_ref() && ex.labels[0] == IGNORE,
            );
            let head = head.min(start);
            if max_len <= head {
                return Err(Error::msg(format!(
                    "max_seq_len {max_len} leaves no room for any token after BOS"
                )));
            }
            let room = max_len - head;
            let completion = len - start;
            if completion <= room {
                // Keep the head, the last `room - completion` prompt tokens, the completion.
                let cut = len - max_len;
                ex.input_ids.drain(head..head + cut);
                ex.labels.drain(head..head + cut);
                stats.truncated_prompt += 1;
            } else {
                ex.input_ids.drain(head..start);
                ex.labels.drain(head..start);
                ex.input_ids.truncate(max_len);
                ex.labels.truncate(max_len);
                stats.truncated_completion += 1;
            }
            Ok(Some(ex))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::src;

    /// BOS (id 1) + prompt 10..10+p + completion 100..100+c, completion trained.
    fn example(p: u32, c: u32) -> Example {
        let mut ids = vec![1];
        let mut labels = vec![IGNORE];
        for i in 0..p {
            ids.push(10 + i);
            labels.push(IGNORE);
        }
        for i in 0..c {
            ids.push(100 + i);
            labels.push((100 + i) as i64);
        }
        Example {
            input_ids: ids,
            labels,
            source: src(4),
        }
    }

    #[test]
    fn truncation_cuts_the_prompt_start_and_keeps_bos_and_completion() {
        let mut st = LengthStats::default();
        let out = apply_length_policy(
            example(6, 3),
            7,
            LengthPolicy::TruncatePromptStart,
            Some(1),
            &mut st,
        )
        .unwrap()
        .unwrap();
        // 1 + 6 + 3 = 10 tokens into 7: BOS, the last 3 prompt tokens, the 3 completion tokens.
        assert_eq!(out.input_ids, vec![1, 13, 14, 15, 100, 101, 102]);
        assert_eq!(
            out.labels,
            vec![IGNORE, IGNORE, IGNORE, IGNORE, 100, 101, 102]
        );
        assert_eq!(st.truncated_prompt, 1);
        let fits = apply_length_policy(
            example(2, 2),
            5,
            LengthPolicy::TruncatePromptStart,
            Some(1),
            &mut st,
        )
        .unwrap()
        .unwrap();
        assert_eq!(fits, example(2, 2));
        assert_eq!(st.fit, 1);
    }

    #[test]
    fn a_completion_too_long_alone_is_cut_at_its_end_and_counted() {
        let mut st = LengthStats::default();
        let out = apply_length_policy(
            example(4, 6),
            4,
            LengthPolicy::TruncatePromptStart,
            Some(1),
            &mut st,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.input_ids, vec![1, 100, 101, 102]);
        assert_eq!(out.labels, vec![IGNORE, 100, 101, 102]);
        assert_eq!(st.truncated_completion, 1);
        assert_eq!(st.truncated_prompt, 0);
        // Without a BOS id, nothing is kept at the head.
        let out = apply_length_policy(
            example(4, 6),
            4,
            LengthPolicy::TruncatePromptStart,
            None,
            &mut st,
        )
        .unwrap()
        .unwrap();
        assert_eq!(out.input_ids, vec![100, 101, 102, 103]);
    }

    #[test]
    fn drop_counts_and_error_names_the_example() {
        let mut st = LengthStats::default();
        assert!(
            apply_length_policy(example(6, 3), 7, LengthPolicy::Drop, Some(1), &mut st)
                .unwrap()
                .is_none()
        );
        assert_eq!(st.dropped, 1);
        let e = apply_length_policy(example(6, 3), 7, LengthPolicy::Error, Some(1), &mut st)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "d/train.jsonl: line 4: example is 10 tokens (prompt 7, completion 3), more than max_seq_len 7 (length_policy = \"error\")"
        );
    }
}
