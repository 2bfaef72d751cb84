//! Every expected value comes from `reference/metrics_fixtures.py` (rouge-score, sacrebleu,
//! nltk). DialogSum rows hold only field names in the fixture; their texts are read from the
//! shared data set beside the repository (`../shared`, or `FERROTUNE_SHARED_DIR`).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;

use super::pytext::is_py_space;
use super::*;

/// Absolute tolerance: the brief asks for 1e-4; the ports do the same float operations in the
/// same order, so anything past a few ulps would be a real difference.
const TOL: f64 = 1e-9;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/metrics"
    ))
}

fn load_json(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run reference/metrics_fixtures.py)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture() -> &'static Value {
    static CASES: OnceLock<Value> = OnceLock::new();
    CASES.get_or_init(|| load_json("cases.json"))
}

fn shared_dir() -> PathBuf {
    match std::env::var_os("FERROTUNE_SHARED_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")),
    }
}

/// DialogSum test records by `fname`.
fn dialogsum() -> &'static HashMap<String, Value> {
    static DS: OnceLock<HashMap<String, Value>> = OnceLock::new();
    DS.get_or_init(|| {
        let path = shared_dir().join("data/dialogsum/dialogsum.test.jsonl");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; the metric tests need the shared DialogSum data (../shared beside the \
                 repository, or set FERROTUNE_SHARED_DIR)",
                path.display()
            )
        });
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("DialogSum line is JSON");
                (v["fname"].as_str().expect("fname").to_string(), v)
            })
            .collect()
    })
}

fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_string()
}

/// The prediction and references of a fixture case, synthetic or DialogSum.
fn case_texts(case: &Value) -> (String, Vec<String>) {
    if let Some(spec) = case.get("dialogsum") {
        let rec = &dialogsum()[spec["fname"].as_str().expect("fname")];
        let split = spec["split_sentences"].as_bool().expect("split_sentences");
        let fix = |s: String| if split { s.replace(". ", ".\n") } else { s };
        let field = |f: &Value| fix(str_of(&rec[f.as_str().expect("field name")]));
        let pred = field(&spec["prediction"]);
        let refs = spec["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(field)
            .collect();
        (pred, refs)
    } else {
        let refs = case["references"]
            .as_array()
            .expect("references")
            .iter()
            .map(str_of)
            .collect();
        (str_of(&case["prediction"]), refs)
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected an integer, got {v}"))
}

#[test]
fn porter_stemmer_matches_nltk() {
    let stems = load_json("stems.json");
    let stems = stems.as_array().expect("list");
    assert!(stems.len() > 2000, "{} words", stems.len());
    let mut bad = Vec::new();
    for pair in stems {
        let (word, want) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        let got = porter_stem(word);
        if got != want {
            bad.push(format!("{word}: got {got}, nltk {want}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ: {:?}",
        bad.len(),
        stems.len(),
        &bad[..bad.len().min(20)]
    );
}

#[test]
fn tokenizers_match_rouge_score_and_sacrebleu_13a() {
    let toks = fixture()["tokenize"].as_array().unwrap();
    assert!(toks.len() > 500);
    for t in toks {
        let text = t["text"].as_str().unwrap();
        let want: Vec<String> = t["rouge_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(rouge_tokenize(text), want, "rouge tokens of {text:?}");
        assert_eq!(tokenize_13a(text), str_of(&t["tok13a"]), "13a of {text:?}");
    }
}

#[test]
fn whitespace_and_lowercasing_match_python_on_every_code_point() {
    let uni = &fixture()["unicode"];
    let ws: Vec<u32> = uni["py_whitespace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u(v) as u32)
        .collect();
    let ours: Vec<u32> = (0..=0x10FFFFu32)
        .filter_map(char::from_u32)
        .filter(|&c| is_py_space(c))
        .map(u32::from)
        .collect();
    assert_eq!(ours, ws, "str.isspace() code points");
    // Non-ASCII characters that survive rouge-score's tokenizer (through lowercasing to ASCII).
    let want: HashMap<u32, Vec<String>> = uni["lower_ascii"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                u(&p[0]) as u32,
                p[1].as_array().unwrap().iter().map(str_of).collect(),
            )
        })
        .collect();
    assert!(!want.is_empty());
    let mut buf = [0u8; 4];
    for c in (0x80..=0x10FFFFu32).filter_map(char::from_u32) {
        let got = rouge_tokenize(c.encode_utf8(&mut buf));
        let expected = want.get(&u32::from(c)).cloned().unwrap_or_default();
        assert_eq!(got, expected, "rouge tokens of U+{:04X}", u32::from(c));
    }
}

#[test]
fn rouge_matches_rouge_score_per_example() {
    let cases = fixture()["cases"].as_array().unwrap();
    assert!(cases.len() >= 300);
    let mut max_diff = 0.0f64;
    let mut n_dialogsum = 0;
    for case in cases {
        n_dialogsum += case.get("dialogsum").is_some() as usize;
        let (pred, refs) = case_texts(case);
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let got = rouge_detail(&pred, &refs);
        for (name, prf) in [
            ("rouge1", got.rouge1),
            ("rouge2", got.rouge2),
            ("rougeL", got.rouge_l),
            ("rougeLsum", got.rouge_lsum),
        ] {
            let want = &case[name];
            for (k, g) in [("p", prf.precision), ("r", prf.recall), ("f", prf.fmeasure)] {
                let d = (g - f(&want[k])).abs();
                max_diff = max_diff.max(d);
                assert!(
                    d <= TOL,
                    "case {}: {name}.{k} = {g}, rouge-score {}",
                    case["id"],
                    want[k]
                );
            }
        }
        let short = rouge(&pred, &refs);
        assert_eq!(short.rouge1, got.rouge1.fmeasure);
        assert_eq!(short.rouge_lsum, got.rouge_lsum.fmeasure);
    }
    assert_eq!(n_dialogsum, 40);
    eprintln!(
        "rouge: max |diff| over {} cases x 12 values = {max_diff:e}",
        cases.len()
    );
}

#[test]
fn bleu_and_score_rows_match_reference_per_group() {
    let cases = fixture()["cases"].as_array().unwrap();
    let groups = fixture()["groups"].as_array().unwrap();
    let (mut bleu_diff, mut rouge_diff) = (0.0f64, 0.0f64);
    for g in groups {
        let name = g["name"].as_str().unwrap();
        let max_refs = g["max_refs"].as_u64().map(|m| m as usize);
        let rows: Vec<(String, Vec<String>)> = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| {
                let (p, mut r) = case_texts(&cases[u(id) as usize]);
                if let Some(m) = max_refs {
                    r.truncate(m);
                }
                (p, r)
            })
            .collect();
        let (preds, refs): (Vec<String>, Vec<Vec<String>>) = rows.iter().cloned().unzip();
        let want = &g["bleu"];
        let got = corpus_bleu_detail(&preds, &refs);
        let ints = |v: &Value| -> Vec<u64> { v.as_array().unwrap().iter().map(u).collect() };
        assert_eq!(got.counts.to_vec(), ints(&want["counts"]), "{name}: counts");
        assert_eq!(got.totals.to_vec(), ints(&want["totals"]), "{name}: totals");
        assert_eq!(got.sys_len, u(&want["sys_len"]), "{name}: sys_len");
        assert_eq!(got.ref_len, u(&want["ref_len"]), "{name}: ref_len");
        assert!(
            (got.bp - f(&want["bp"])).abs() <= TOL,
            "{name}: bp {} vs {}",
            got.bp,
            want["bp"]
        );
        for (k, p) in got.precisions.iter().enumerate() {
            let w = f(&want["precisions"][k]);
            assert!((p - w).abs() <= TOL, "{name}: precision {k}: {p} vs {w}");
        }
        let d = (got.score - f(&want["score"])).abs();
        bleu_diff = bleu_diff.max(d);
        assert!(
            d <= TOL,
            "{name}: BLEU {} vs sacrebleu {}",
            got.score,
            want["score"]
        );
        assert_eq!(corpus_bleu(&preds, &refs), got.score);

        let s = score_rows(&rows);
        let ws = &g["scores"];
        let c = corpus_rouge(&preds, &refs);
        for (k, v, cv) in [
            ("rouge1", s.rouge1, c.rouge1),
            ("rouge2", s.rouge2, c.rouge2),
            ("rougeL", s.rouge_l, c.rouge_l),
            ("rougeLsum", s.rouge_lsum, c.rouge_lsum),
        ] {
            let d = (v - f(&ws[k])).abs();
            rouge_diff = rouge_diff.max(d);
            assert!(d <= TOL, "{name}: mean {k} {v} vs {}", ws[k]);
            assert_eq!(v, cv, "{name}: score_rows and corpus_rouge agree on {k}");
        }
        assert!(
            (s.bleu - f(&ws["bleu"])).abs() <= TOL,
            "{name}: score_rows bleu"
        );
        assert!(
            (s.exact_match - f(&ws["exact_match"])).abs() <= TOL,
            "{name}: exact_match"
        );
        assert_eq!(s.n as u64, u(&ws["n"]), "{name}: n");
    }
    eprintln!(
        "groups: {} ; max |diff| BLEU {bleu_diff:e}, mean ROUGE {rouge_diff:e}",
        groups.len()
    );
}

#[test]
fn scores_serialize_with_the_documented_field_names() {
    let rows = vec![("a b c d".to_string(), vec!["a b c d".to_string()])];
    let v = serde_json::to_value(score_rows(&rows)).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bleu",
            "exact_match",
            "n",
            "rouge1",
            "rouge2",
            "rougeL",
            "rougeLsum"
        ]
    );
    assert_eq!(v["n"], 1);
}

#[test]
fn empty_inputs_score_zero() {
    assert_eq!(score_rows(&[]), Scores::default());
    assert_eq!(rouge("some words here", &[]), RougeScores::default());
    // A row without references is scored against one empty reference (brevity penalty 1).
    let b = corpus_bleu_detail(&["x y".to_string()], &[vec![]]);
    assert_eq!((b.sys_len, b.ref_len, b.score), (2, 0, 0.0));
}

#[test]
fn exact_match_matches_reference() {
    let mut n = 0;
    for case in fixture()["cases"].as_array().unwrap() {
        let (pred, refs) = case_texts(case);
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        assert_eq!(
            exact_match(&pred, &refs),
            case["em_strict"].as_bool().unwrap(),
            "case {}",
            case["id"]
        );
        assert_eq!(
            exact_match_normalized(&pred, &refs),
            case["em_normalized"].as_bool().unwrap(),
            "case {}",
            case["id"]
        );
        n += 1;
    }
    let (mut strict, mut normalized) = (0, 0);
    for e in fixture()["exact_match"].as_array().unwrap() {
        let pred = e["prediction"].as_str().unwrap();
        let refs: Vec<&str> = e["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let (ws, wn) = (
            e["strict"].as_bool().unwrap(),
            e["normalized"].as_bool().unwrap(),
        );
        assert_eq!(exact_match(pred, &refs), ws, "strict {pred:?} vs {refs:?}");
        assert_eq!(
            exact_match_normalized(pred, &refs),
            wn,
            "normalized {pred:?} vs {refs:?}"
        );
        strict += ws as usize;
        normalized += wn as usize;
        n += 1;
    }
    // The pairs must exercise both outcomes of both flavours.
    assert!(
        strict > 0 && normalized > strict && normalized < n,
        "{strict} {normalized} {n}"
    );
    let preds = vec![
        "Paris".to_string(),
        "paris!".to_string(),
        "Rome".to_string(),
    ];
    let refs = vec![
        vec!["Paris".to_string()],
        vec!["Paris".to_string()],
        vec!["Milan".to_string()],
    ];
    assert_eq!(accuracy(&preds, &refs, false), 1.0 / 3.0);
    assert_eq!(accuracy(&preds, &refs, true), 2.0 / 3.0);
}

/// A scratch file that is removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, content: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("ferrotune-metrics-{}-{name}", std::process::id()));
        std::fs::write(&p, content).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn read_predictions_reads_both_row_forms() {
    let f = Scratch::new(
        "ok.jsonl",
        "{\"prediction\": \"a\", \"reference\": \"b\", \"id\": 7}\n\n  \n\
         {\"prediction\": \"\", \"references\": [\"c\", \"d\"]}\r\n",
    );
    let rows = read_predictions(&f.0).unwrap();
    assert_eq!(
        rows,
        vec![
            ("a".to_string(), vec!["b".to_string()]),
            (String::new(), vec!["c".to_string(), "d".to_string()]),
        ]
    );
}

#[test]
fn texts_too_long_for_rouge_l_are_refused_by_line_and_the_lcs_matches_the_table() {
    let long = "a ".repeat(20_000);
    let row = format!("{{\"prediction\": \"{long}\", \"reference\": \"{long}\"}}\n");
    let f = Scratch::new(
        "huge.jsonl",
        &format!("{{\"prediction\": \"a\", \"reference\": \"a\"}}\n{row}"),
    );
    let e = read_predictions(&f.0).unwrap_err().to_string();
    assert!(
        e.contains("line 2") && e.contains("20000 words") && e.contains("word pairs"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    // the two-row LCS length agrees with the full table on the fixtures' kind of text
    let t = |s: &str| rouge::tokenize(s);
    for (a, b) in [
        ("the cat sat on the mat", "the mat sat on a cat"),
        ("a b c d e f", "f e d c b a"),
        ("", "a"),
        ("x y x y x", "y x y"),
    ] {
        let (a, b) = (t(a), t(b));
        let table = rouge::lcs_table(&a, &b)[a.len()][b.len()];
        assert_eq!(rouge::lcs_len(&a, &b), table, "{a:?} {b:?}");
    }
}

#[test]
fn read_predictions_errors_name_file_line_and_field() {
    let good = "{\"prediction\": \"p\", \"reference\": \"r\"}\n";
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "malformed",
            "{\"prediction\": \"p\", \"reference\": }",
            &["line 2", "invalid JSON", "column"],
        ),
        ("not_object", "[1, 2]", &["line 2", "JSON object", "a list"]),
        (
            "no_prediction",
            "{\"reference\": \"r\"}",
            &["line 2", "missing field `prediction`"],
        ),
        (
            "prediction_type",
            "{\"prediction\": 3, \"reference\": \"r\"}",
            &["line 2", "`prediction`", "a number"],
        ),
        (
            "no_reference",
            "{\"prediction\": \"p\"}",
            &["line 2", "`reference`", "`references`"],
        ),
        (
            "reference_type",
            "{\"prediction\": \"p\", \"reference\": [\"r\"]}",
            &["line 2", "`reference` must be a string", "a list"],
        ),
        (
            "references_type",
            "{\"prediction\": \"p\", \"references\": \"r\"}",
            &["line 2", "`references` must be a list", "a string"],
        ),
        (
            "references_item",
            "{\"prediction\": \"p\", \"references\": [\"r\", null]}",
            &["line 2", "`references[1]`", "null"],
        ),
        (
            "references_empty",
            "{\"prediction\": \"p\", \"references\": []}",
            &["line 2", "`references`", "empty"],
        ),
        (
            "both",
            "{\"prediction\": \"p\", \"reference\": \"r\", \"references\": [\"r\"]}",
            &["line 2", "both"],
        ),
    ];
    for (name, second_line, needles) in cases {
        let f = Scratch::new(&format!("{name}.jsonl"), &format!("{good}{second_line}\n"));
        let msg = read_predictions(&f.0).expect_err(name).to_string();
        assert!(
            msg.contains(&*f.0.to_string_lossy()),
            "{name}: no file in {msg:?}"
        );
        assert!(!msg.contains('\n'), "{name}: not one line: {msg:?}");
        for n in *needles {
            assert!(msg.contains(n), "{name}: {n:?} not in {msg:?}");
        }
    }
    for (name, content) in [("empty", ""), ("blank", "\n  \n")] {
        let f = Scratch::new(&format!("{name}.jsonl"), content);
        let msg = read_predictions(&f.0).expect_err(name).to_string();
        assert!(
            msg.contains(&*f.0.to_string_lossy()) && msg.contains("empty"),
            "{name}: {msg}"
        );
    }
    let missing = std::env::temp_dir().join("ferrotune-metrics-no-such-file.jsonl");
    let msg = read_predictions(&missing).unwrap_err().to_string();
    assert!(msg.contains("no-such-file"), "{msg}");
}

#[test]
fn score_rows_reports_each_row_to_its_progress() {
    let rows: Vec<(String, Vec<String>)> = (0..5)
        .map(|i| (format!("a b {i}"), vec![format!("a b c {i}")]))
        .collect();
    let rec = crate::progress::Recorder::default();
    let s = super::score_rows_with_progress(&rows, &rec);
    assert_eq!(s, score_rows(&rows));
    let events = rec.0.borrow();
    assert_eq!(events[0], ("start score rows".to_string(), 5));
    assert_eq!(rec.advanced(), 5);
    assert_eq!(events.last().unwrap().0, "finish");
}
