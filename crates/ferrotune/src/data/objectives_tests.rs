//! Tests of the pre-training objectives on real text: DialogSum dialogues tokenized with the
//! all-MiniLM-L6-v2 WordPiece tokenizer.
use std::collections::HashSet;

use super::objectives::*;
use super::testutil::{minilm, shared_data};
use super::{
    load_task, read_rows, BatchConfig, Batcher, DataConfig, DataTask, TextEncoder, IGNORE,
};
use candle_core::Device;
use serde_json::json;

fn dialogues(n: usize) -> Vec<String> {
    let rows = read_rows(&shared_data("dialogsum").join("dialogsum.dev.jsonl"), None).unwrap();
    rows.rows
        .iter()
        .take(n)
        .map(|r| r.fields["dialogue"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn noise_counts_follow_random_spans_noise_mask() {
    // (length, noise tokens, spans), worked by hand from transformers' formulas:
    // noise = round(length * 0.15) clamped to 1..length-1 (numpy rounds half to even),
    // spans = max(1, round(min(noise, length - unclamped noise) / 3)).
    for (length, noise, spans) in [
        (568, 85, 28), // 85.2 -> 85; 85 / 3 = 28.3
        (100, 15, 5),  // 15 / 3 = 5
        (30, 4, 1),    // 4.5 rounds to 4 (half to even); 4 / 3 = 1.3
        (10, 2, 1),    // 1.5 rounds to 2
        (3, 1, 1),     // 0.45 -> 0, clamped to 1
        (2, 1, 1),
    ] {
        assert_eq!(
            noise_counts(length, 0.15, 3.0),
            (noise, spans),
            "length {length}"
        );
    }
    // transformers' compute_input_and_target_lengths(512, 0.15, 3): 568 raw tokens make an input
    // of 568 - 85 + 28 + 1 = 512 tokens and a target of 85 + 28 + 1 = 114; 569 would make 513.
    assert_eq!(expanded_lengths(512, 0.15, 3.0), (568, 114));
    // 141 tokens: 21 noise, 7 spans, 120 + 7 + 1 = 128 inputs, 21 + 7 + 1 = 29 targets.
    assert_eq!(expanded_lengths(128, 0.15, 3.0), (141, 29));
}

#[test]
fn noise_masks_alternate_spans_with_exact_counts() {
    let mut rng = chunk_rng(1, 0, 0);
    for length in 2..400 {
        let mask = random_spans_noise_mask(length, 0.15, 3.0, &mut rng);
        assert_eq!(mask.len(), length);
        let (noise, spans) = noise_counts(length, 0.15, 3.0);
        assert_eq!(
            mask.iter().filter(|&&m| m).count(),
            noise,
            "length {length}"
        );
        let starts = (0..length)
            .filter(|&i| mask[i] && (i == 0 || !mask[i - 1]))
            .count();
        assert_eq!(starts, spans, "length {length}");
        // Non-noise first, noise last (the spans are interleaved pairs).
        assert!(!mask[0] && mask[length - 1], "length {length}");
    }
}

#[test]
fn corruption_replaces_spans_by_sentinels_in_order() {
    // "thank you for inviting me to your party last week ." with "for inviting" and "last"
    // as noise (the T5 paper's example; targets end with EOS as transformers makes them).
    let ids: Vec<u32> = (10..21).collect();
    let noise = [
        false, false, true, true, false, false, false, false, true, false, false,
    ];
    let (inputs, targets) = corrupt_with_mask(&ids, &noise, &[99, 98, 97], 1);
    assert_eq!(inputs, vec![10, 11, 99, 14, 15, 16, 17, 98, 19, 20, 1]);
    assert_eq!(targets, vec![99, 12, 13, 98, 18, 1]);
}

#[test]
fn chunks_cut_the_concatenation_and_name_their_first_document() {
    let docs = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9, 10], vec![11]];
    let chunks = chunk_documents(&docs, 4, 2);
    assert_eq!(
        chunks,
        vec![
            (vec![1, 2, 3, 4], 0),
            (vec![5, 6, 7, 8], 1),
            (vec![9, 10, 11], 2)
        ]
    );
    // A last chunk shorter than `min_last` is dropped.
    assert_eq!(chunk_documents(&docs, 5, 2).len(), 2);
    assert_eq!(chunk_documents(&[vec![1, 2, 3, 4, 5, 6]], 5, 2).len(), 1);
}

/// Parse targets `<s0> span0 <s1> span1 ... EOS` and put the spans back in place of the
/// sentinels in the inputs.
fn reassemble(
    inputs: &[u32],
    targets: &[u32],
    sentinels: &[u32],
    eos: u32,
) -> (Vec<u32>, Vec<usize>) {
    assert_eq!(inputs.last(), Some(&eos));
    assert_eq!(targets.last(), Some(&eos));
    let mut spans: Vec<Vec<u32>> = Vec::new();
    for &id in &targets[..targets.len() - 1] {
        if spans.len() < sentinels.len() && id == sentinels[spans.len()] {
            spans.push(Vec::new());
        } else {
            spans
                .last_mut()
                .expect("targets start with a sentinel")
                .push(id);
        }
    }
    let mut out = Vec::new();
    let mut next = 0;
    for &id in &inputs[..inputs.len() - 1] {
        if next < spans.len() && id == sentinels[next] {
            out.extend(&spans[next]);
            next += 1;
        } else {
            out.push(id);
        }
    }
    assert_eq!(
        next,
        spans.len(),
        "every target span has its sentinel in the inputs"
    );
    (out, spans.iter().map(Vec::len).collect())
}

/// The acceptance test: on real text, inputs + targets give back the original exactly; over
/// 10k+ tokens the noise fraction is 0.15 ± 0.02 and the mean span length 3 ± 0.5.
#[test]
fn span_corruption_on_dialogsum_reassembles_with_t5_statistics() {
    let enc = TextEncoder::new(minilm()).unwrap();
    let eos = enc.token_to_id("[SEP]").unwrap();
    let vocab = enc.vocab_size();
    let sentinels = top_of_vocab_sentinels(vocab, 100);
    let docs: Vec<Vec<u32>> = dialogues(120)
        .iter()
        .map(|d| {
            let mut ids = enc.content(d).unwrap();
            ids.push(eos);
            ids
        })
        .collect();
    // The sentinels must not be ids the text uses, or reassembly would be ambiguous.
    let used: HashSet<u32> = docs.iter().flatten().copied().collect();
    assert!(sentinels.iter().all(|s| !used.contains(s)));
    let sc = SpanCorruption {
        noise_density: 0.15,
        mean_noise_span_length: 3.0,
        sentinels: sentinels.clone(),
        eos_id: eos,
    };
    sc.check().unwrap();
    let (chunk_len, target_len) = expanded_lengths(512, 0.15, 3.0);
    let chunks = chunk_documents(&docs, chunk_len, 2);
    let (mut tokens, mut noise, mut spans) = (0usize, 0usize, 0usize);
    for (k, (chunk, _)) in chunks.iter().enumerate() {
        let (inputs, targets) = sc.apply(chunk, &mut chunk_rng(7, 0, k)).unwrap();
        let (back, span_lens) = reassemble(&inputs, &targets, &sentinels, eos);
        assert_eq!(&back, chunk, "chunk {k}");
        if chunk.len() == chunk_len {
            assert_eq!((inputs.len(), targets.len()), (512, target_len));
        }
        tokens += chunk.len();
        noise += span_lens.iter().sum::<usize>();
        spans += span_lens.len();
        // The same seed and epoch give the same corruption; another epoch another one.
        assert_eq!(
            sc.apply(chunk, &mut chunk_rng(7, 0, k)).unwrap(),
            (inputs.clone(), targets)
        );
        assert_ne!(sc.apply(chunk, &mut chunk_rng(7, 1, k)).unwrap().0, inputs);
    }
    assert!(tokens >= 10_000, "{tokens} tokens");
    let fraction = noise as f64 / tokens as f64;
    let mean_span = noise as f64 / spans as f64;
    assert!((fraction - 0.15).abs() <= 0.02, "noise fraction {fraction}");
    assert!(
        (mean_span - 3.0).abs() <= 0.5,
        "mean span length {mean_span}"
    );
}

fn mlm_config(extra: serde_json::Value) -> DataConfig {
    let mut v = json!({"train": "dialogsum.dev.jsonl", "text": "{dialogue}", "max_seq_len": 128});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

/// The acceptance test for MLM: on DialogSum through the data pipeline, 15% ± 2% of the
/// non-special tokens are selected, 80/10/10 ± 3% of them become [MASK] / a random id / stay;
/// masks change between epochs and repeat for the same seed and epoch.
#[test]
fn mlm_masks_on_dialogsum_have_bert_statistics() {
    let tok = minilm();
    let cfg = mlm_config(json!({}));
    let p = load_task(&cfg, &shared_data("dialogsum"), tok, 512, DataTask::Mlm).unwrap();
    let Some(masking @ Masking::Mlm(_)) = p.masking.clone() else {
        panic!("mlm data without its masking")
    };
    let mask_id = tok.token_to_id("[MASK]").unwrap();
    let cls = tok.token_to_id("[CLS]").unwrap();
    let specials: HashSet<u32> = tok
        .inner()
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    assert!(p.train.iter().all(|e| e.len() <= 128));
    assert_eq!(p.train[0].input_ids[0], cls);
    let (mut candidates, mut selected, mut masked, mut random, mut kept) = (0, 0, 0, 0, 0);
    let mut differ = 0;
    for (i, ex) in p.train.iter().enumerate() {
        let m = masking.apply(ex, 5, 0, i).unwrap();
        assert_eq!(m.input_ids.len(), ex.input_ids.len());
        for k in 0..ex.len() {
            let orig = ex.input_ids[k];
            if specials.contains(&orig) {
                assert_eq!(m.labels[k], IGNORE, "special token selected");
                assert_eq!(m.input_ids[k], orig);
                continue;
            }
            candidates += 1;
            if m.labels[k] == IGNORE {
                assert_eq!(m.input_ids[k], orig, "unselected token changed");
                continue;
            }
            assert_eq!(m.labels[k], orig as i64);
            selected += 1;
            match m.input_ids[k] {
                id if id == mask_id => masked += 1,
                id if id == orig => kept += 1,
                _ => random += 1,
            }
        }
        assert_eq!(
            masking.apply(ex, 5, 0, i).unwrap(),
            m,
            "same seed and epoch"
        );
        if masking.apply(ex, 5, 1, i).unwrap().labels != m.labels {
            differ += 1;
        }
    }
    assert!(candidates >= 10_000, "{candidates} tokens");
    let share = |n: usize, of: usize| n as f64 / of as f64;
    let sel = share(selected, candidates);
    assert!((sel - 0.15).abs() <= 0.02, "selected {sel}");
    for (what, n, want) in [
        ("[MASK]", masked, 0.8),
        ("random", random, 0.1),
        ("kept", kept, 0.1),
    ] {
        let s = share(n, selected);
        assert!((s - want).abs() <= 0.03, "{what}: {s}");
    }
    assert_eq!(
        differ,
        p.train.len(),
        "every chunk gets new masks in the next epoch"
    );
    // `data preview` shows the masks of epoch 0, the loss positions marked.
    let text = p.preview(tok, 2, 5, super::PreviewStyle::Brackets);
    assert!(text.contains("[[[MASK]"), "{text}");

    // Batches carry exactly these masks: per-token labels, not shifted, first position kept.
    let bc = p.configure(BatchConfig {
        shuffle: false,
        seed: 5,
        ..BatchConfig::new(4, p.max_seq_len, 0)
    });
    let mut b = Batcher::new(p.train.clone(), bc, Device::Cpu).unwrap();
    let plan = b.plan_for(0);
    let batch = b.next_batch().unwrap();
    assert_eq!(batch.targets, super::Targets::Token);
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2().unwrap();
    let inputs: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
    for (r, row) in plan[0].iter().enumerate() {
        let want = masking.apply(&p.train[row[0]], 5, 0, row[0]).unwrap();
        let n = want.len();
        assert_eq!(&inputs[r][..n], &want.input_ids[..]);
        assert_eq!(&labels[r][..n], &want.labels[..]);
        assert!(labels[r][n..].iter().all(|&l| l == IGNORE));
    }
}

/// Whole-word masking: a word (a piece and the `##` pieces after it) is selected, and replaced,
/// as one: all its pieces or none, all the same way.
#[test]
fn whole_word_masking_masks_every_piece_of_a_word_together() {
    let tok = minilm();
    let cfg = mlm_config(json!({"whole_word_mask": true}));
    let p = load_task(&cfg, &shared_data("dialogsum"), tok, 512, DataTask::Mlm).unwrap();
    let masking = p.masking.clone().unwrap();
    let mask_id = tok.token_to_id("[MASK]").unwrap();
    let specials: HashSet<u32> = [0, 100, 101, 102, 103]
        .into_iter()
        .filter(|&id| tok.id_to_token(id).is_some_and(|t| t.starts_with('[')))
        .collect();
    assert_eq!(specials.len(), 5);
    let (mut candidates, mut selected, mut multi_piece_selected) = (0, 0, 0);
    for (i, ex) in p.train.iter().enumerate() {
        let m = masking.apply(ex, 3, 0, i).unwrap();
        // Words from the token strings, independently of the implementation.
        let mut words: Vec<Vec<usize>> = Vec::new();
        for (k, &id) in ex.input_ids.iter().enumerate() {
            if specials.contains(&id) {
                continue;
            }
            let piece = tok.id_to_token(id).unwrap();
            match words.last_mut() {
                Some(w) if piece.starts_with("##") && *w.last().unwrap() == k - 1 => w.push(k),
                _ => words.push(vec![k]),
            }
        }
        for w in &words {
            candidates += w.len();
            let sel: Vec<bool> = w.iter().map(|&k| m.labels[k] != IGNORE).collect();
            assert!(
                sel.iter().all(|&s| s == sel[0]),
                "chunk {i}: word at {w:?} partly selected"
            );
            if !sel[0] {
                continue;
            }
            selected += w.len();
            if w.len() > 1 {
                multi_piece_selected += 1;
            }
            let how = |k: usize| match m.input_ids[k] {
                id if id == mask_id => 0,
                id if id == ex.input_ids[k] => 1,
                _ => 2,
            };
            assert!(
                w.iter().all(|&k| how(k) == how(w[0])),
                "chunk {i}: word at {w:?} replaced piece by piece"
            );
        }
    }
    let share = selected as f64 / candidates as f64;
    assert!((share - 0.15).abs() <= 0.02, "selected {share}");
    assert!(
        multi_piece_selected > 20,
        "{multi_piece_selected} multi-piece words selected"
    );
}

#[test]
fn objective_settings_are_range_checked() {
    let tok = minilm();
    let dir = shared_data("dialogsum");
    for (extra, key) in [
        (json!({"mlm_probability": 0.0}), "mlm_probability"),
        (json!({"mlm_probability": 1.5}), "mlm_probability"),
    ] {
        let e = load_task(&mlm_config(extra), &dir, tok, 512, DataTask::Mlm)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("key `{key}`")), "{e}");
        assert_eq!(e.lines().count(), 1);
    }
    let sc = |d: f64, m: f64| SpanCorruption {
        noise_density: d,
        mean_noise_span_length: m,
        sentinels: vec![1],
        eos_id: 0,
    };
    assert!(sc(0.15, 3.0).check().is_ok());
    for (s, key) in [
        (sc(0.0, 3.0), "noise_density"),
        (sc(1.0, 3.0), "noise_density"),
        (sc(f64::NAN, 3.0), "noise_density"),
        (sc(0.15, 0.5), "mean_noise_span_length"),
        (sc(0.15, f64::INFINITY), "mean_noise_span_length"),
    ] {
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains(&format!("key `{key}`")), "{e}");
    }
    // A BERT tokenizer has no <extra_id_N> sentinels: span corruption says so.
    let e = load_task(
        &mlm_config(json!({})),
        &dir,
        tok,
        512,
        DataTask::SpanCorruption,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("<extra_id_0>"), "{e}");
}
