//! Tests of TSV input, classification / seq2seq / clm / span-corruption examples, and batches
//! for every kind of targets.
use candle_core::Device;
use serde_json::{json, Value};

use super::testutil::{minilm, shared_data, t5_like, tiny_tokenizer, words, TempDir};
use super::{
    encode_seq2seq_pair, load, load_task, read_rows, BatchConfig, Batcher, DataConfig, DataTask,
    Example, LabelMap, Loc, Masking, Source, Targets, TextEncoder, IGNORE,
};

fn config(v: Value) -> DataConfig {
    serde_json::from_value(v).unwrap()
}

fn fields(rows: &super::Rows) -> Vec<Value> {
    rows.rows
        .iter()
        .map(|r| Value::Object(r.fields.clone()))
        .collect()
}

#[test]
fn tsv_is_read_as_glue_writes_it() {
    let d = TempDir::new("tsv-glue");
    // No quoting: quotes are text, and a record never spans lines.
    let p = d.write(
        "train.tsv",
        "sentence\tlabel\nhe said \"hi , and left \t1\nit 's \"fine\" \t0\n",
    );
    let rows = read_rows(&p, None).unwrap();
    assert_eq!(
        fields(&rows),
        vec![
            json!({"sentence": "he said \"hi , and left ", "label": "1"}),
            json!({"sentence": "it 's \"fine\" ", "label": "0"}),
        ]
    );
    assert_eq!(rows.rows[1].loc, Loc::Line(3));
    let p = d.write("bad.tsv", "sentence\tlabel\ngood \t1\nno tab here 0\n");
    let e = read_rows(&p, None).unwrap_err().to_string();
    assert!(
        e.contains("bad.tsv: line 3: 1 fields, but the header has 2"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    let p = d.write("extra.tsv", "a\tb\n1\t2\t3\n");
    let e = read_rows(&p, None).unwrap_err().to_string();
    assert!(e.contains("extra.tsv: line 2: 3 fields"), "{e}");
}

/// SST-2 as GLUE ships it, with the real all-MiniLM-L6-v2 tokenizer: every sentence becomes
/// `[CLS] pieces [SEP]` exactly as the tokenizers library encodes it, with its class id.
#[test]
fn sst2_classification_rows_with_a_label_list() {
    let tok = minilm();
    let dir = shared_data("sst2/glue");
    let cfg = config(json!({
        "train": "train.tsv", "validation": "dev.tsv", "template": "{sentence}",
        "label_field": "label", "labels": ["negative", "positive"], "max_seq_len": 128
    }));
    let p = load_task(&cfg, &dir, tok, 512, DataTask::SequenceClassification).unwrap();
    assert_eq!(p.targets, Targets::Sequence);
    let count = |exs: &[Example], class: i64| exs.iter().filter(|e| e.labels == [class]).count();
    // The counts in shared/data/sst2/SOURCE.md.
    assert_eq!((count(&p.train, 1), count(&p.train, 0)), (37_569, 29_780));
    assert_eq!(
        (count(&p.validation, 1), count(&p.validation, 0)),
        (444, 428)
    );
    assert_eq!(
        p.labels,
        Some(LabelMap {
            names: vec!["negative".into(), "positive".into()],
            from_integers: false
        })
    );
    assert!(
        p.summary().contains("classes: 0 = negative, 1 = positive"),
        "{}",
        p.summary()
    );
    // The reference encoding: the tokenizer with its own post-processor (which also pads to
    // 128 per the file's settings; padding is dropped by the attention mask).
    let rows = read_rows(&dir.join("dev.tsv"), None).unwrap();
    for (row, ex) in rows.rows.iter().zip(&p.validation) {
        let text = row.fields["sentence"].as_str().unwrap();
        let want = tok.inner().encode(text, true).unwrap();
        let ids: Vec<u32> = want
            .get_ids()
            .iter()
            .zip(want.get_attention_mask())
            .filter(|(_, m)| **m == 1)
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(ex.input_ids, ids, "{}", ex.source);
        let label: i64 = row.fields["label"].as_str().unwrap().parse().unwrap();
        assert_eq!(ex.labels, vec![label]);
    }
    // One class per row in a batch.
    let bc = p.configure(BatchConfig {
        shuffle: false,
        ..BatchConfig::new(8, p.max_seq_len, 0)
    });
    let b = Batcher::new(p.validation.clone(), bc, Device::Cpu).unwrap();
    let plan = b.plan_for(0);
    let batch = b.build(&plan[0]).unwrap();
    assert_eq!(batch.labels.dims(), &[8]);
    assert_eq!(batch.n_loss_tokens, 8);
    let classes: Vec<i64> = batch.labels.to_vec1().unwrap();
    for (r, row) in plan[0].iter().enumerate() {
        assert_eq!(classes[r], p.validation[row[0]].labels[0]);
    }
}

#[test]
fn string_labels_get_sorted_ids_and_unknown_labels_are_errors() {
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("cls-labels");
    d.write(
        "train.jsonl",
        "{\"t\": \"the cat\", \"y\": \"pos\"}\n{\"t\": \"the dog\", \"y\": \"neg\"}\n{\"t\": \"a\", \"y\": \"pos\"}\n",
    );
    d.write(
        "dev.jsonl",
        "{\"t\": \"the cat\", \"y\": \"neg\"}\n{\"t\": \"b\", \"y\": \"neutral\"}\n",
    );
    let base = json!({"train": "train.jsonl", "template": "{t}", "label_field": "y"});
    let p = load_task(
        &config(base.clone()),
        d.dir(),
        &tok,
        64,
        DataTask::SequenceClassification,
    )
    .unwrap();
    let map = p.labels.clone().unwrap();
    assert_eq!(map.names, vec!["neg", "pos"]);
    assert_eq!(
        map.hf_config(),
        json!({"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}})
    );
    let classes: Vec<i64> = p.train.iter().map(|e| e.labels[0]).collect();
    assert_eq!(classes, vec![1, 0, 1]);
    // No post-processor: the model's BOS, then the text.
    assert_eq!(p.train[0].input_ids, words(&tok, "<s> the cat"));
    // A validation label the training data never had: file, line, field and value.
    let mut v = base.clone();
    v["validation"] = json!("dev.jsonl");
    let e = load_task(
        &config(v),
        d.dir(),
        &tok,
        64,
        DataTask::SequenceClassification,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "dev.jsonl: line 2: field `y`: label \"neutral\" is not one of the labels (neg, pos)"
        ),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);

    // With a label list: names and integer ids both map; outside the list is an error.
    d.write("ints.csv", "t,y\nthe cat,1\nthe dog,positive\nthe mat,2\n");
    let cfg = config(
        json!({"train": "ints.csv", "template": "{t}", "label_field": "y",
                            "labels": ["negative", "positive"]}),
    );
    let e = load_task(&cfg, d.dir(), &tok, 64, DataTask::SequenceClassification)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ints.csv: line 4: field `y`: label 2 is out of range: there are 2 classes"),
        "{e}"
    );
    d.write(
        "ok.csv",
        "t,y\nthe cat,1\nthe dog,positive\nthe mat,negative\n",
    );
    let cfg = config(
        json!({"train": "ok.csv", "template": "{t}", "label_field": "y",
                            "labels": ["negative", "positive"]}),
    );
    let p = load_task(&cfg, d.dir(), &tok, 64, DataTask::SequenceClassification).unwrap();
    let classes: Vec<i64> = p.train.iter().map(|e| e.labels[0]).collect();
    assert_eq!(classes, vec![1, 1, 0]);

    // Integer labels without a list are the class ids; mixing kinds, missing fields, floats
    // and duplicate names are errors naming where.
    for (rows, want) in [
        ("{\"t\": \"a\", \"y\": 2}\n{\"t\": \"b\", \"y\": 0}\n", None),
        (
            "{\"t\": \"a\", \"y\": 2}\n{\"t\": \"b\", \"y\": \"pos\"}\n",
            Some("mixes integer and string labels"),
        ),
        (
            "{\"t\": \"a\", \"y\": 1}\n{\"t\": \"b\"}\n",
            Some("m.jsonl: line 2: no field `y`"),
        ),
        (
            "{\"t\": \"a\", \"y\": 1.5}\n",
            Some("m.jsonl: line 1: field `y`: expected an integer or a string label, found 1.5"),
        ),
        (
            "{\"t\": \"a\", \"y\": -1}\n",
            Some("m.jsonl: line 1: field `y`: label -1 is negative"),
        ),
    ] {
        d.write("m.jsonl", rows);
        let cfg = config(json!({"train": "m.jsonl", "template": "{t}", "label_field": "y"}));
        match (
            load_task(&cfg, d.dir(), &tok, 64, DataTask::SequenceClassification),
            want,
        ) {
            (Ok(p), None) => {
                assert_eq!(p.labels.unwrap().names, vec!["0", "1", "2"]);
                assert_eq!(p.train[0].labels, vec![2]);
            }
            (Err(e), Some(want)) => {
                let e = e.to_string();
                assert!(e.contains(want), "{e}");
                assert_eq!(e.lines().count(), 1);
            }
            (r, want) => panic!("{rows}: {:?} / {want:?}", r.map(|p| p.labels)),
        }
    }
    let cfg = config(json!({"train": "m.jsonl", "template": "{t}", "labels": ["a", "a"]}));
    let e = load_task(&cfg, d.dir(), &tok, 64, DataTask::SequenceClassification)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `labels`: `a` appears twice"), "{e}");
}

/// Words to WordPiece pieces with the real MiniLM tokenizer: the first piece of a word carries
/// its label, the rest and the special tokens -100 (transformers' token classification).
#[test]
fn token_classification_labels_the_first_piece_of_each_word() {
    let tok = minilm();
    let d = TempDir::new("tok-cls");
    d.write(
        "ner.jsonl",
        &[
            json!({"tokens": ["EU", "rejects", "German", "call", "to", "boycott", "U.S.", "lamb"],
                   "ner_tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-LOC", "O"]}),
            json!({"tokens": ["Peter", "Zwolinski"], "ner_tags": ["B-PER", "I-PER"]}),
        ]
        .map(|v| v.to_string())
        .join("\n"),
    );
    let labels = ["O", "B-PER", "I-PER", "B-ORG", "B-LOC", "B-MISC"];
    let cfg = config(json!({"train": "ner.jsonl", "label_field": "ner_tags", "labels": labels}));
    let p = load_task(&cfg, d.dir(), tok, 64, DataTask::TokenClassification).unwrap();
    assert_eq!(p.targets, Targets::Token);
    let rows = read_rows(&d.path("ner.jsonl"), None).unwrap();
    let (cls, sep) = (
        tok.token_to_id("[CLS]").unwrap(),
        tok.token_to_id("[SEP]").unwrap(),
    );
    let enc = TextEncoder::new(tok).unwrap();
    let mut multi_piece = 0;
    for (row, ex) in rows.rows.iter().zip(&p.train) {
        // Each word tokenized on its own (WordPiece pieces do not cross words).
        let mut ids = vec![cls];
        let mut want = vec![IGNORE];
        for (w, t) in row.fields["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .zip(row.fields["ner_tags"].as_array().unwrap())
        {
            let pieces = enc.content(w.as_str().unwrap()).unwrap();
            let class = labels.iter().position(|l| t.as_str() == Some(*l)).unwrap() as i64;
            multi_piece += usize::from(pieces.len() > 1);
            for (k, &id) in pieces.iter().enumerate() {
                ids.push(id);
                want.push(if k == 0 { class } else { IGNORE });
            }
        }
        ids.push(sep);
        want.push(IGNORE);
        assert_eq!(ex.input_ids, ids);
        assert_eq!(ex.labels, want);
    }
    assert!(multi_piece >= 2, "the test needs words of several pieces");
    // Without a list, string tags get sorted ids.
    let cfg = config(json!({"train": "ner.jsonl", "label_field": "ner_tags"}));
    let p = load_task(&cfg, d.dir(), tok, 64, DataTask::TokenClassification).unwrap();
    assert_eq!(
        p.labels.unwrap().names,
        vec!["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    );
    d.write(
        "bad.jsonl",
        &json!({"tokens": ["a", "b"], "ner_tags": ["O"]}).to_string(),
    );
    let cfg = config(json!({"train": "bad.jsonl", "label_field": "ner_tags"}));
    let e = load_task(&cfg, d.dir(), tok, 64, DataTask::TokenClassification)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jsonl: line 1: field `ner_tags`: 1 labels for 2 words in `tokens`"),
        "{e}"
    );
    d.write(
        "bad.jsonl",
        &json!({"tokens": "a b", "ner_tags": ["O"]}).to_string(),
    );
    let e = load_task(&cfg, d.dir(), tok, 64, DataTask::TokenClassification)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("field `tokens`: expected a list of words"),
        "{e}"
    );
}

#[test]
fn seq2seq_pairs_put_the_prompt_in_the_encoder_and_the_completion_in_the_targets() {
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("s2s");
    d.write(
        "t.jsonl",
        "{\"q\": \"the cat sat\", \"a\": \"on the mat\"}\n{\"q\": \"a b c d e\", \"a\": \"x y\"}\n",
    );
    let base = json!({"train": "t.jsonl", "template": "summarize : {q}", "completion": "{a}"});
    let p = load_task(&config(base.clone()), d.dir(), &tok, 64, DataTask::Seq2Seq).unwrap();
    assert_eq!(p.targets, Targets::Decoder);
    // No post-processor: the model's BOS, and EOS closes the encoder input (as T5's inputs
    // end with </s>).
    assert_eq!(
        p.train[0].input_ids,
        words(&tok, "<s> summarize : the cat sat </s>")
    );
    let target = |s: &str| -> Vec<i64> { words(&tok, s).into_iter().map(i64::from).collect() };
    assert_eq!(p.train[0].labels, target("on the mat </s>"));
    assert_eq!(p.train[1].labels, target("x y </s>"));
    assert_eq!(
        encode_seq2seq_pair(
            &tok,
            "summarize : the cat sat",
            "on the mat",
            super::testutil::src(1)
        )
        .unwrap()
        .labels,
        p.train[0].labels
    );

    // Decoder targets in a batch: (b, longest target), padded with -100; every token counted.
    let bc = p.configure(BatchConfig {
        shuffle: false,
        ..BatchConfig::new(2, 64, 3)
    });
    let b = Batcher::new(p.train.clone(), bc, Device::Cpu).unwrap();
    let batch = b.build(&[vec![0], vec![1]]).unwrap();
    assert_eq!(batch.targets, Targets::Decoder);
    assert_eq!(batch.input_ids.dims(), &[2, 9]);
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2().unwrap();
    assert_eq!(labels[0], target("on the mat </s>"));
    let mut short = target("x y </s>");
    short.push(IGNORE);
    assert_eq!(labels[1], short);
    assert_eq!(batch.n_loss_tokens, 4 + 3);
    assert_eq!(batch.n_tokens, 7 + 9 + 4 + 3);

    // Too long: the prompt start is cut (BOS and EOS kept); a target is cut at its end,
    // keeping EOS.
    let mut v = base;
    v["max_seq_len"] = json!(4);
    v["max_target_len"] = json!(3);
    let p = load_task(&config(v.clone()), d.dir(), &tok, 64, DataTask::Seq2Seq).unwrap();
    assert_eq!(p.train[0].input_ids, words(&tok, "<s> cat sat </s>"));
    assert_eq!(p.train[1].input_ids, words(&tok, "<s> d e </s>"));
    assert_eq!(p.train[0].labels, target("on the </s>"));
    assert_eq!(p.train[1].labels, target("x y </s>"));
    assert_eq!(
        (
            p.stats[0].length.truncated_completion,
            p.stats[0].length.truncated_prompt
        ),
        (1, 1)
    );
    v["length_policy"] = json!("error");
    let e = load_task(&config(v.clone()), d.dir(), &tok, 64, DataTask::Seq2Seq)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.jsonl: line 1: the encoder input is 5 tokens, more than the 2 that fit"),
        "{e}"
    );
    v["length_policy"] = json!("drop");
    v["max_seq_len"] = json!(7);
    v["max_target_len"] = json!(8);
    let p = load_task(&config(v), d.dir(), &tok, 64, DataTask::Seq2Seq).unwrap();
    assert_eq!(p.train.len(), 1);
    assert_eq!(p.stats[0].length.dropped, 1);
}

/// DialogSum with a T5-style tokenizer: the targets are the summary's pieces and EOS, nothing
/// of the prompt.
#[test]
fn seq2seq_dialogsum_targets_are_the_summary() {
    let tok = t5_like();
    let dir = shared_data("dialogsum");
    let cfg = config(json!({
        "train": "dialogsum.dev.jsonl", "max_seq_len": 512, "max_target_len": 256,
        "template": "Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
        "completion": "{summary}"
    }));
    let p = load_task(&cfg, &dir, tok, 512, DataTask::Seq2Seq).unwrap();
    let eos = tok.token_to_id("</s>").unwrap();
    let rows = read_rows(&dir.join("dialogsum.dev.jsonl"), None).unwrap();
    assert_eq!(p.train.len(), rows.rows.len());
    for (row, ex) in rows.rows.iter().zip(&p.train) {
        let mut want: Vec<i64> = tok
            .encode(row.fields["summary"].as_str().unwrap(), false)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        want.push(eos as i64);
        assert_eq!(ex.labels, want, "{}", ex.source);
        assert_eq!(*ex.input_ids.last().unwrap(), eos);
        assert!(ex.len() <= 512);
        // What perplexity scores is what training sees.
        if ex.len() < 512 {
            let prompt = format!(
                "Summarize the following conversation.\n\n{}\n\nSummary:",
                row.fields["dialogue"].as_str().unwrap()
            );
            let summary = row.fields["summary"].as_str().unwrap();
            let pair = encode_seq2seq_pair(tok, &prompt, summary, ex.source.clone()).unwrap();
            assert_eq!(&pair, ex);
        }
    }
}

#[test]
fn clm_concatenates_documents_with_eos_into_chunks() {
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("clm");
    d.write(
        "t.jsonl",
        "{\"t\": \"the cat sat\"}\n{\"t\": \"on the mat\"}\n",
    );
    let cfg = config(json!({"train": "t.jsonl", "text": "{t}", "max_seq_len": 4}));
    // `text` alone means clm for the causal LM loader.
    let p = load(&cfg, d.dir(), &tok, 64).unwrap();
    assert_eq!(p.targets, Targets::NextToken);
    let ids: Vec<Vec<u32>> = p.train.iter().map(|e| e.input_ids.clone()).collect();
    assert_eq!(
        ids,
        vec![
            words(&tok, "<s> the cat sat"),
            words(&tok, "</s> <s> on the"),
            words(&tok, "mat </s>"),
        ]
    );
    for e in &p.train {
        assert_eq!(
            e.labels,
            e.input_ids.iter().map(|&i| i as i64).collect::<Vec<_>>()
        );
    }
    let lines: Vec<Loc> = p.train.iter().map(|e| e.source.loc).collect();
    assert_eq!(lines, vec![Loc::Line(1), Loc::Line(1), Loc::Line(2)]);
    assert_eq!(p.stats[0].tokens, 10);
    assert_eq!(
        p.train,
        load_task(&cfg, d.dir(), &tok, 64, DataTask::Clm)
            .unwrap()
            .train
    );
}

/// Span corruption through the pipeline: chunks that corrupt to exactly max_seq_len input
/// tokens, `<extra_id_N>` sentinels from the tokenizer, decoder targets, fresh spans per epoch.
#[test]
fn span_corruption_batches_from_dialogsum() {
    let tok = t5_like();
    let cfg = config(json!({"train": "dialogsum.dev.jsonl", "text": "{dialogue}",
                            "max_seq_len": 128}));
    let p = load_task(
        &cfg,
        &shared_data("dialogsum"),
        tok,
        512,
        DataTask::SpanCorruption,
    )
    .unwrap();
    assert_eq!(p.targets, Targets::Decoder);
    let Some(Masking::SpanCorruption(sc)) = &p.masking else {
        panic!("no span corruption")
    };
    let sentinel = |j: usize| tok.token_to_id(&format!("<extra_id_{j}>")).unwrap();
    assert_eq!(sc.sentinels[..3], [sentinel(0), sentinel(1), sentinel(2)]);
    assert!(p.train[..p.train.len() - 1].iter().all(|e| e.len() == 141));
    let bc = p.configure(BatchConfig {
        shuffle: false,
        seed: 9,
        ..BatchConfig::new(4, p.max_seq_len, 0)
    });
    let mut b = Batcher::new(p.train.clone(), bc, Device::Cpu).unwrap();
    let first = b.next_batch().unwrap();
    assert_eq!(first.input_ids.dims(), &[4, 128]);
    assert_eq!(first.labels.dims(), &[4, 29]);
    let inputs: Vec<Vec<u32>> = first.input_ids.to_vec2().unwrap();
    let labels: Vec<Vec<i64>> = first.labels.to_vec2().unwrap();
    assert_eq!(
        inputs[0][1..].iter().filter(|&&i| i == sentinel(0)).count(),
        1
    );
    assert_eq!(labels[0][0], sentinel(0) as i64);
    // Epoch 1 corrupts the same chunks differently.
    let epoch1 = b.build_for_epoch(&b.plan_for(0)[0], 1).unwrap();
    assert_ne!(epoch1.input_ids.to_vec2::<u32>().unwrap(), inputs);
    assert_eq!(
        b.build_for_epoch(&b.plan_for(0)[0], 0)
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap(),
        inputs
    );
}

fn example(ids: &[u32], labels: &[i64]) -> Example {
    Example {
        input_ids: ids.to_vec(),
        labels: labels.to_vec(),
        source: Source {
            file: std::sync::Arc::from(std::path::Path::new("t.jsonl")),
            loc: Loc::Line(1),
            task: None,
        },
    }
}

#[test]
fn batches_lay_out_labels_by_targets() {
    let cfg = |targets| BatchConfig {
        shuffle: false,
        targets,
        ..BatchConfig::new(2, 8, 0)
    };
    // Per-token labels are not shifted: the first position keeps its label.
    let exs = vec![example(&[5, 6, 7], &[50, IGNORE, 70]), example(&[8], &[80])];
    let b = Batcher::new(exs.clone(), cfg(Targets::Token), Device::Cpu).unwrap();
    let batch = b.build(&[vec![0], vec![1]]).unwrap();
    let labels: Vec<Vec<i64>> = batch.labels.to_vec2().unwrap();
    assert_eq!(labels, vec![vec![50, IGNORE, 70], vec![80, IGNORE, IGNORE]]);
    assert_eq!(batch.n_loss_tokens, 3);
    // The same examples as next-token targets: the first label of each is ignored.
    let b = Batcher::new(exs, cfg(Targets::NextToken), Device::Cpu).unwrap();
    let labels: Vec<Vec<i64>> = b
        .build(&[vec![0], vec![1]])
        .unwrap()
        .labels
        .to_vec2()
        .unwrap();
    assert_eq!(labels, vec![vec![IGNORE, IGNORE, 70], vec![IGNORE; 3]]);
    // Raw chunks of a masking objective carry no labels until masked; without the masking
    // they are refused.
    let e = Batcher::new(
        vec![example(&[1, 2], &[])],
        cfg(Targets::Token),
        Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("t.jsonl: line 1: 0 labels for 2 input tokens"),
        "{e}"
    );
}

#[test]
fn task_and_objective_pick_the_examples_and_misplaced_keys_are_errors() {
    use DataTask::*;
    for (task, objective, want) in [
        (None, "sft", CausalSft),
        (Some("causal_lm"), "clm", Clm),
        (Some("seq2seq_lm"), "sft", Seq2Seq),
        (Some("seq2seq_lm"), "span_corruption", SpanCorruption),
        (None, "mlm", Mlm),
        (
            Some("sequence_classification"),
            "sft",
            SequenceClassification,
        ),
        (Some("token_classification"), "sft", TokenClassification),
    ] {
        assert_eq!(DataTask::new(task, objective).unwrap(), want);
    }
    for (task, objective, want) in [
        (
            Some("causal_lm"),
            "mlm",
            "key `objective`: objective = \"mlm\" trains encoders",
        ),
        (Some("seq2seq_lm"), "clm", "trains decoders"),
        (
            Some("causal_lm"),
            "span_corruption",
            "trains encoder-decoders",
        ),
        (None, "mask", "unknown objective `mask`"),
        (Some("classify"), "sft", "unknown task `classify`"),
    ] {
        let e = DataTask::new(task, objective).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("keys");
    d.write("t.jsonl", "{\"t\": \"a\", \"y\": 1}\n");
    for (v, kind, want) in [
        (
            json!({"text": "{t}", "template": "{t}", "completion": "{t}"}),
            CausalSft,
            "key `text`: not used for causal LM data",
        ),
        (
            json!({"template": "{t}", "completion": "{y}"}),
            SequenceClassification,
            "key `completion`: not used for sequence classification data",
        ),
        (
            json!({"text": "{t}", "mlm_probability": 0.2}),
            Clm,
            "key `mlm_probability`: not used for clm data",
        ),
        (
            json!({"template": "{t}"}),
            Mlm,
            "key `template`: not used for mlm data (pre-training objectives read raw text",
        ),
        (json!({}), SpanCorruption, "key `text`: missing"),
        (
            json!({"text": "{t}", "packing": true}),
            Mlm,
            "key `packing`: not used for mlm data",
        ),
        (
            json!({"label_field": "y"}),
            SequenceClassification,
            "key `template`: missing",
        ),
    ] {
        let mut v = v;
        v["train"] = json!("t.jsonl");
        let e = load_task(&config(v), d.dir(), &tok, 64, kind)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
        assert_eq!(e.lines().count(), 1);
    }
}
