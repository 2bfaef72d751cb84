//! `ferrotune bench`: lm-evaluation-harness task files run on our models, with lm-eval's
//! prompts, tokenization, metrics, standard errors and results layout, so the numbers agree with
//! `lm_eval --model hf` (checked against it: `reference/lm_eval_fixtures.py`).
//!
//! Flow: [`task`] reads the YAML → [`docs`] loads the split → [`prompt`] builds each document's
//! context(s) and continuations → [`score`] tokenizes and runs the model (log-likelihoods with
//! shared prefixes, or greedy generation) → [`metrics`] per sample, aggregated with standard
//! errors → [`BenchReport::to_lm_eval_json`]. [`forgetting`] compares two runs sample by sample.
pub mod docs;
pub mod forgetting;
pub mod metrics;
pub mod prompt;
pub mod pyrandom;
pub mod score;
pub mod task;

use crate::model::{ArchitectureKind, Model};
use crate::progress::Progress;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use docs::Doc;
use metrics::{Aggregation, Item};
use prompt::{value_text, Prompter};
use score::{encode_pair, TokenRequest};
use serde_json::{json, Map, Value};
use task::{GroupConfig, OutputType, TaskConfig};

/// lm-eval's default few-shot seed (`--fewshot_random_seed`).
pub const FEWSHOT_SEED: u64 = 1234;
/// Most documents per task `--limit` accepts (a larger one is a typo).
pub const MAX_LIMIT: usize = 10_000_000;
/// Sequences per scoring pass unless `--batch-size` says otherwise: enough rows that every
/// weight is read once for many tokens.
pub const DEFAULT_BATCH_SIZE: usize = 32;
/// Most few-shot examples.
pub const MAX_FEWSHOT: usize = 1024;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Overrides each task's `num_fewshot` (lm-eval's `--num_fewshot`).
    pub num_fewshot: Option<usize>,
    /// Score the first N documents of each task.
    pub limit: Option<usize>,
    /// Sequences per forward pass when scoring log-likelihoods (recorded in the results);
    /// each batch also shares the prefix its sequences have in common.
    pub batch_size: usize,
    pub apply_chat_template: bool,
    pub fewshot_seed: u64,
    /// Keep per-sample logs in the report.
    pub log_samples: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            num_fewshot: None,
            limit: None,
            batch_size: DEFAULT_BATCH_SIZE,
            apply_chat_template: false,
            fewshot_seed: FEWSHOT_SEED,
            log_samples: false,
        }
    }
}

impl BenchOptions {
    pub fn validate(&self) -> Result<()> {
        if self.limit == Some(0) || self.limit.is_some_and(|l| l > MAX_LIMIT) {
            return Err(Error::key(
                "bench",
                "limit",
                format!("expected 1 to {MAX_LIMIT}"),
            ));
        }
        if self.num_fewshot.is_some_and(|k| k > MAX_FEWSHOT) {
            return Err(Error::key(
                "bench",
                "num_fewshot",
                format!("expected 0 to {MAX_FEWSHOT}"),
            ));
        }
        if self.batch_size == 0 || self.batch_size > 4096 {
            return Err(Error::key("bench", "batch_size", "expected 1 to 4096"));
        }
        Ok(())
    }
}

/// One metric of one task.
#[derive(Debug, Clone)]
pub struct MetricResult {
    pub name: String,
    pub aggregation: Aggregation,
    pub higher_is_better: bool,
    pub value: f64,
    pub stderr: Option<f64>,
    /// The per-sample items, in document order (paired comparisons use them).
    pub items: Vec<Item>,
}

/// What one task gave.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub task: String,
    pub alias: String,
    pub output_type: OutputType,
    pub num_fewshot: usize,
    pub n_original: usize,
    pub n_effective: usize,
    pub metrics: Vec<MetricResult>,
    /// Per-sample records (lm-eval's `--log_samples` layout), when asked for.
    pub samples: Vec<Value>,
    /// Per-sample raw answers: (log-likelihood, is_greedy) per request of the document, or the
    /// generated text. Always kept (tests and the fixtures compare them).
    pub responses: Vec<Response>,
    pub version: Value,
    pub config: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Loglikelihoods(Vec<(f64, bool)>),
    Rolling(f64),
    Generated(String),
}

impl TaskResult {
    pub fn metric(&self, name: &str) -> Option<&MetricResult> {
        self.metrics.iter().find(|m| m.name == name)
    }
}

/// Group rows (`aggregate_metric_list`).
#[derive(Debug, Clone)]
pub struct GroupResult {
    pub group: String,
    pub tasks: Vec<String>,
    pub metrics: Vec<(String, f64, Option<f64>)>,
}

/// A whole `bench` run of one model.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub model: String,
    pub adapter: Option<String>,
    pub tasks: Vec<TaskResult>,
    pub groups: Vec<GroupResult>,
    pub options: BenchOptions,
    pub chat_template: Option<String>,
    pub seconds: f64,
}

/// One document's requests and what is known before scoring.
struct DocPlan {
    doc_id: usize,
    contexts: Vec<String>,
    /// (context, continuation) text pairs, one per log-likelihood request.
    pairs: Vec<(String, String)>,
    choices: Vec<String>,
    gold: Value,
    /// Index range of its requests in the flat request list.
    first: usize,
    count: usize,
}

fn shots_for<'d>(
    t: &TaskConfig,
    pool: &'d [Doc],
    k: usize,
    doc: &Doc,
    rnd: &mut pyrandom::PyRandom,
) -> Result<Vec<(usize, &'d Doc)>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    // lm-eval passes the document to exclude when the few-shot split "is" the test split
    // (both unset counts as equal there, and changes how many draws the sampler makes).
    let fs_split = t.fewshot.split.as_deref().or(t.fewshot_split.as_deref());
    let exclude = fs_split == t.test_split.as_deref();
    let src = t.file.display().to_string();
    if t.fewshot.sampler.as_deref() == Some("first_n") {
        let pool: Vec<(usize, &Doc)> = pool
            .iter()
            .enumerate()
            .filter(|(_, d)| !(exclude && *d == doc))
            .collect();
        if k > pool.len() {
            return Err(Error::key(
                &src,
                "num_fewshot",
                format!(
                    "{k} examples asked for, the few-shot split has {}",
                    pool.len()
                ),
            ));
        }
        return Ok(pool.into_iter().take(k).collect());
    }
    let draw = if exclude { k + 1 } else { k };
    if draw > pool.len() {
        let what = if exclude {
            format!("{k} examples asked for besides the document itself, the few-shot split has {} documents in all", pool.len())
        } else {
            format!(
                "{k} examples asked for, the few-shot split has {}",
                pool.len()
            )
        };
        return Err(Error::key(&src, "num_fewshot", what));
    }
    let picked: Vec<(usize, &Doc)> = rnd
        .sample(pool.len(), draw)
        .into_iter()
        .map(|i| (i, &pool[i]))
        .collect();
    if !exclude {
        return Ok(picked);
    }
    let kept: Vec<(usize, &Doc)> = picked
        .iter()
        .filter(|(_, d)| *d != doc)
        .take(k)
        .copied()
        .collect();
    if kept.len() == k {
        return Ok(kept);
    }
    // Duplicates of the document in the pool: draw again without any copy of it (lm-eval does).
    let rest: Vec<(usize, &Doc)> = pool.iter().enumerate().filter(|(_, d)| *d != doc).collect();
    if k > rest.len() {
        return Err(Error::key(
            &src,
            "num_fewshot",
            "not enough few-shot examples besides the document",
        ));
    }
    Ok(rnd
        .sample(rest.len(), k)
        .into_iter()
        .map(|i| rest[i])
        .collect())
}

/// The most tokens the model reads (lm-eval's `max_length`: the model's context, else 2048).
fn max_length(model: &dyn Model) -> usize {
    model.context_length().unwrap_or(2048)
}

/// Check a task before any model runs: its documents load, and the first document's prompt
/// (with its few-shot examples) and answer build. What `train --dry-run` and `bench` check
/// up front, so a typo fails in seconds, not after a base model's benchmark or a training run.
pub fn check_task(t: &TaskConfig, opts: &BenchOptions) -> Result<()> {
    let eval = docs::load_split(t, docs::eval_split_name(t)?)?;
    let Some(first) = eval.docs.first() else {
        return Err(Error::key(
            t.file.display().to_string(),
            "dataset_path",
            "the split has no documents",
        ));
    };
    let k = opts.num_fewshot.or(t.num_fewshot).unwrap_or(0);
    let pool = fewshot_pool(t, k, &eval.docs)?;
    let prompter = Prompter::new(t, first)?;
    let mut rnd = pyrandom::PyRandom::new(opts.fewshot_seed);
    let shots = shots_for(t, &pool, k, first, &mut rnd)?;
    prompter.contexts(first, 0, &shots, None)?;
    if t.doc_to_choice.is_some() {
        prompter.choices(first, 0, false)?;
    }
    prompter.target(first, 0, false)?;
    Ok(())
}

/// The documents few-shot examples are drawn from (none for 0-shot).
fn fewshot_pool(t: &TaskConfig, k: usize, eval_docs: &[Doc]) -> Result<Vec<Doc>> {
    if k == 0 {
        return Ok(Vec::new());
    }
    let name = docs::fewshot_split_name(t).ok_or_else(|| {
        Error::key(
            t.file.display().to_string(),
            "fewshot_split",
            "few-shot examples need a split to come from",
        )
    })?;
    if Some(name) == docs::eval_split_name(t).ok() {
        return Ok(eval_docs.to_vec());
    }
    docs::load_split(t, name).map(|s| s.docs)
}

/// Run one task.
pub fn run_task(
    model: &dyn Model,
    tok: &Tokenizer,
    t: &TaskConfig,
    opts: &BenchOptions,
    progress: &dyn Progress,
) -> Result<TaskResult> {
    if model.kind() == ArchitectureKind::Encoder {
        return Err(Error::msg(format!(
            "{} is an encoder: it neither scores continuations nor generates, so it cannot run lm-eval tasks",
            model.describe()
        )));
    }
    let seq2seq = model.kind() == ArchitectureKind::EncoderDecoder;
    let eval = docs::load_split(t, docs::eval_split_name(t)?)?;
    let n_original = eval.docs.len();
    if n_original == 0 {
        return Err(Error::key(
            t.file.display().to_string(),
            "dataset_path",
            "the split has no documents",
        ));
    }
    let n = opts.limit.unwrap_or(usize::MAX).min(n_original);
    let docs = &eval.docs[..n];
    let Some(first_doc) = docs.first() else {
        return Err(Error::key("bench", "limit", "expected at least 1 document"));
    };
    let k = opts.num_fewshot.or(t.num_fewshot).unwrap_or(0);
    let fewshot_docs = fewshot_pool(t, k, &eval.docs)?;
    let chat = if opts.apply_chat_template {
        Some(tok.chat_template().ok_or_else(|| {
            Error::msg("--apply-chat-template: the model's tokenizer has no chat template")
        })?)
    } else {
        None
    };
    let prompter = Prompter::new(t, first_doc)?;
    let mut rnd = pyrandom::PyRandom::new(opts.fewshot_seed);
    let mc_delim = if chat.is_some() {
        String::new()
    } else {
        t.target_delimiter.clone()
    };
    let mut plans = Vec::with_capacity(n);
    let mut pairs_total = 0usize;
    for (i, doc) in docs.iter().enumerate() {
        let shots = shots_for(t, &fewshot_docs, k, doc, &mut rnd)?;
        let contexts = prompter.contexts(doc, i, &shots, chat)?;
        let choices = if t.doc_to_choice.is_some() {
            prompter.choices(doc, i, false)?
        } else {
            Vec::new()
        };
        let gold = if prompter.multiple_input {
            prompter.text(doc, i, false)?
        } else {
            prompter.target(doc, i, false)?
        };
        let ctx0 = contexts.first().cloned().unwrap_or_default();
        let pairs: Vec<(String, String)> = match t.output_type {
            OutputType::MultipleChoice if prompter.multiple_input => {
                let cont = value_text(&prompter.target(doc, i, false)?);
                contexts
                    .iter()
                    .map(|c| (c.clone(), format!("{mc_delim}{cont}")))
                    .collect()
            }
            OutputType::MultipleChoice => choices
                .iter()
                .map(|c| (ctx0.clone(), format!("{mc_delim}{c}")))
                .collect(),
            OutputType::Loglikelihood => vec![(ctx0.clone(), value_text(&gold))],
            OutputType::LoglikelihoodRolling => vec![(String::new(), value_text(&gold))],
            OutputType::GenerateUntil => vec![(ctx0.clone(), String::new())],
        };
        plans.push(DocPlan {
            doc_id: i,
            contexts,
            first: pairs_total,
            count: pairs.len(),
            pairs,
            choices,
            gold,
        });
        pairs_total += plans.last().map_or(0, |p| p.count);
    }
    let responses = answer(model, tok, t, &plans, seq2seq, opts.batch_size, progress)?;
    let mut result = process(t, &plans, docs, responses, k, n_original, opts)?;
    result.alias = t.alias.clone().unwrap_or_else(|| t.task.clone());
    Ok(result)
}

/// Run the model on every document's requests.
fn answer(
    model: &dyn Model,
    tok: &Tokenizer,
    t: &TaskConfig,
    plans: &[DocPlan],
    seq2seq: bool,
    self_batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Response>> {
    let max_len = max_length(model);
    match t.output_type {
        OutputType::MultipleChoice | OutputType::Loglikelihood => {
            let mut reqs = Vec::new();
            for p in plans {
                for (c, x) in &p.pairs {
                    reqs.push(encode_pair(tok, c, x, seq2seq)?);
                }
            }
            let lls = score::loglikelihoods(model, &reqs, max_len, self_batch, progress)?;
            Ok(plans
                .iter()
                .map(|p| {
                    Response::Loglikelihoods(
                        lls[p.first..p.first + p.count]
                            .iter()
                            .map(|l| (l.ll, l.is_greedy))
                            .collect(),
                    )
                })
                .collect())
        }
        OutputType::LoglikelihoodRolling => {
            // lm-eval divides by the documents' total length: with no text at all that is
            // 0 / 0, and the perplexities came out NaN with exit status 0.
            if plans
                .iter()
                .all(|p| p.pairs.first().is_none_or(|x| x.1.is_empty()))
            {
                return Err(Error::key(
                    t.file.display().to_string(),
                    "doc_to_target",
                    "every document is empty: loglikelihood_rolling has no text to score",
                ));
            }
            let prefix = score::prefix_token(tok)?;
            let mut reqs: Vec<TokenRequest> = Vec::new();
            let mut spans = Vec::with_capacity(plans.len());
            for p in plans {
                let text = p.pairs.first().map(|x| x.1.as_str()).unwrap_or_default();
                let ids = tok.encode(text, false)?;
                let w = score::rolling_windows(&ids, prefix, max_len);
                spans.push((reqs.len(), w.len()));
                reqs.extend(w);
            }
            let lls = score::loglikelihoods(model, &reqs, max_len, self_batch, progress)?;
            Ok(spans
                .iter()
                .map(|&(a, n)| Response::Rolling(lls[a..a + n].iter().map(|l| l.ll).sum()))
                .collect())
        }
        OutputType::GenerateUntil => {
            let g = t.generation_kwargs.clone().ok_or_else(|| {
                Error::key(t.file.display().to_string(), "generation_kwargs", "missing")
            })?;
            let max_gen_toks = g.max_gen_toks.or(g.max_new_tokens).unwrap_or(256);
            let temperature = if g.do_sample {
                g.temperature.unwrap_or(1.0)
            } else {
                0.0
            };
            let mut until = g.stops();
            // lm-eval adds the EOS text to the stops; generation stops on EOS here anyway.
            if let Some(eos) = tok.eos_token() {
                if !until.iter().any(|u| u == eos) {
                    until.push(eos.to_string());
                }
            }
            let mut reqs = Vec::with_capacity(plans.len());
            for p in plans {
                let ctx = p.contexts.first().map(String::as_str).unwrap_or_default();
                reqs.push(score::GenRequest {
                    context: score::tok_encode(tok, ctx)?,
                    until: until.clone(),
                    max_gen_toks,
                    temperature,
                    top_p: g.top_p,
                    top_k: g.top_k,
                    seed: 1234,
                });
            }
            Ok(score::generations(model, tok, &reqs, progress)?
                .into_iter()
                .map(Response::Generated)
                .collect())
        }
    }
}

/// Gold choice indices of a multiple-choice document (lm-eval: an index, a choice string, or a
/// list of them; anything outside the choices is -100, never right).
fn gold_indices(gold: &Value, choices: &[String]) -> (Vec<i64>, bool) {
    let one = |v: &Value| -> i64 {
        match v {
            Value::Number(n) => n
                .as_u64()
                .filter(|&i| (i as usize) < choices.len())
                .map_or(-100, |i| i as i64),
            Value::String(s) => choices
                .iter()
                .position(|c| c == s)
                .map_or(-100, |i| i as i64),
            _ => -100,
        }
    };
    match gold {
        Value::Array(v) => (v.iter().map(one).collect(), true),
        other => (vec![one(other)], false),
    }
}

fn count_words(s: &str) -> f64 {
    // Python's len(re.split(r"\s+", s)): leading/trailing whitespace give empty pieces.
    let mut n = 1usize;
    let mut in_ws = false;
    for c in s.chars() {
        if c.is_whitespace() {
            if !in_ws {
                n += 1;
            }
            in_ws = true;
        } else {
            in_ws = false;
        }
    }
    n as f64
}

fn process(
    t: &TaskConfig,
    plans: &[DocPlan],
    docs: &[Doc],
    responses: Vec<Response>,
    k: usize,
    n_original: usize,
    opts: &BenchOptions,
) -> Result<TaskResult> {
    let mut items: Vec<(String, Vec<Item>)> = Vec::new();
    fn push(items: &mut Vec<(String, Vec<Item>)>, name: &str, it: Item) {
        match items.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(it),
            None => items.push((name.to_string(), vec![it])),
        }
    }
    let wants = |m: &str| t.metric_list.iter().any(|s| s.metric == m);
    let mut calib = Vec::new();
    // Documents whose gold answer is not among the choices (lm-eval warns and scores them wrong).
    let mut off_choices: Vec<usize> = Vec::new();
    let mut samples = Vec::new();
    for (p, resp) in plans.iter().zip(&responses) {
        let mut record = Map::new();
        match (t.output_type, resp) {
            (OutputType::MultipleChoice, Response::Loglikelihoods(r)) => {
                let lls: Vec<f64> = r.iter().map(|x| x.0).collect();
                let lens: Vec<f64> = p.choices.iter().map(|c| c.chars().count() as f64).collect();
                let bytes: Vec<f64> = p.choices.iter().map(|c| c.len() as f64).collect();
                let pred = metrics::argmax(&lls);
                let norm: Vec<f64> = lls.iter().zip(&lens).map(|(l, n)| l / n).collect();
                let pred_norm = metrics::argmax(&norm);
                let byte: Vec<f64> = lls.iter().zip(&bytes).map(|(l, n)| l / n).collect();
                let pred_byte = metrics::argmax(&byte);
                let (gold, multi) = gold_indices(&p.gold, &p.choices);
                if gold.is_empty() || gold.contains(&-100) {
                    off_choices.push(p.doc_id);
                }
                let hit = |i: usize| f64::from(u8::from(gold.contains(&(i as i64))));
                let first_gold = gold.first().copied().unwrap_or(-100);
                let em = if multi {
                    f64::from(u8::from(
                        gold.iter()
                            .any(|&g| g >= 0 && r.get(g as usize).is_some_and(|x| x.1)),
                    ))
                } else if first_gold >= 0 {
                    f64::from(u8::from(r.get(first_gold as usize).is_some_and(|x| x.1)))
                } else {
                    0.0
                };
                let probs = metrics::softmax(&lls);
                calib.push((probs.get(pred).copied().unwrap_or(0.0), hit(pred) > 0.0));
                for spec in &t.metric_list {
                    let it = match spec.metric.as_str() {
                        "acc" => Item::Value(hit(pred)),
                        "acc_norm" => Item::Value(hit(pred_norm)),
                        "acc_bytes" => Item::Value(hit(pred_byte)),
                        "exact_match" => Item::Value(em),
                        "f1" | "mcc" => Item::Pair(first_gold, pred as i64),
                        _ => continue,
                    };
                    push(&mut items, &spec.metric, it);
                }
                record.insert(
                    "resps".into(),
                    json!(r
                        .iter()
                        .map(|x| vec![json!(x.0), json!(x.1)])
                        .collect::<Vec<_>>()),
                );
            }
            (OutputType::Loglikelihood, Response::Loglikelihoods(r)) => {
                let (ll, greedy) = r.first().copied().unwrap_or((0.0, false));
                if wants("perplexity") {
                    push(&mut items, "perplexity", Item::Value(ll));
                }
                if wants("acc") {
                    push(&mut items, "acc", Item::Value(f64::from(u8::from(greedy))));
                }
                record.insert("resps".into(), json!([[ll, greedy]]));
            }
            (OutputType::LoglikelihoodRolling, Response::Rolling(ll)) => {
                let text = value_text(&p.gold);
                for spec in &t.metric_list {
                    let w = match spec.metric.as_str() {
                        "word_perplexity" => count_words(&text),
                        _ => text.len() as f64,
                    };
                    push(&mut items, &spec.metric, Item::Weighted(*ll, w));
                }
                record.insert("resps".into(), json!([ll]));
            }
            (OutputType::GenerateUntil, Response::Generated(text)) => {
                let refs: Vec<String> = match (&p.gold, p.choices.is_empty()) {
                    (Value::Number(i), false) => {
                        vec![i
                            .as_u64()
                            .and_then(|i| p.choices.get(i as usize))
                            .cloned()
                            .unwrap_or_default()]
                    }
                    (Value::Array(v), _) => v.iter().map(value_text).collect(),
                    (g, _) => vec![value_text(g)],
                };
                let ref_strs: Vec<&str> = refs.iter().map(String::as_str).collect();
                for spec in &t.metric_list {
                    match spec.metric.as_str() {
                        "exact_match" => {
                            let v = refs
                                .iter()
                                .map(|r| metrics::exact_match_with(text, r, spec))
                                .fold(0.0, f64::max);
                            push(&mut items, "exact_match", Item::Value(v));
                        }
                        "bleu" => push(&mut items, "bleu", Item::Text(text.clone(), refs.clone())),
                        m @ ("rouge" | "rouge1" | "rouge2" | "rougeL" | "rougeLsum") => {
                            let r = crate::eval::metrics::rouge(text, &ref_strs);
                            let all = [
                                ("rouge1", r.rouge1),
                                ("rouge2", r.rouge2),
                                ("rougeL", r.rouge_l),
                                ("rougeLsum", r.rouge_lsum),
                            ];
                            for (name, v) in all {
                                if m == "rouge" || m == name {
                                    push(&mut items, name, Item::Value(v));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                record.insert("resps".into(), json!([[text]]));
            }
            _ => {
                return Err(Error::msg(
                    "bench: a response does not match its task's output type",
                ))
            }
        }
        if opts.log_samples {
            record.insert("doc_id".into(), json!(p.doc_id));
            record.insert(
                "doc".into(),
                Value::Object(docs.get(p.doc_id).cloned().unwrap_or_default()),
            );
            record.insert("target".into(), p.gold.clone());
            let args: Vec<Value> = if t.output_type == OutputType::GenerateUntil {
                vec![json!({"arg_0": p.contexts.first(), "arg_1": t.generation_kwargs})]
            } else if t.output_type == OutputType::LoglikelihoodRolling {
                p.pairs
                    .iter()
                    .map(|(_, text)| json!({"arg_0": text}))
                    .collect()
            } else {
                p.pairs
                    .iter()
                    .map(|(c, x)| json!({"arg_0": c, "arg_1": x}))
                    .collect()
            };
            record.insert("arguments".into(), Value::Array(args));
            if let Some(r) = record.get("resps").cloned() {
                record.insert("filtered_resps".into(), r);
            }
            for (name, v) in &items {
                if let Some(last) = v.last() {
                    record.insert(
                        name.clone(),
                        serde_json::to_value(last).unwrap_or(Value::Null),
                    );
                }
            }
            samples.push(Value::Object(record));
        }
    }
    if let Some(&first) = off_choices.first() {
        tracing::warn!(
            "{}: {} of {} documents have a target that is not one of their choices (first: sample {first}); they count as wrong",
            t.file.display(),
            off_choices.len(),
            plans.len()
        );
    }
    let mut out_metrics = Vec::new();
    for (name, its) in items {
        let spec = t
            .metric_list
            .iter()
            .find(|s| s.metric == name || (s.metric == "rouge" && name.starts_with("rouge")));
        let (mut agg, mut hib) = metrics::default_aggregation(&name);
        if let Some(s) = spec {
            if let Some(h) = s.higher_is_better {
                hib = h;
            }
            if let Some(a) = &s.aggregation {
                agg = match a.as_str() {
                    "mean" => Aggregation::Mean,
                    "perplexity" => Aggregation::Perplexity,
                    "weighted_perplexity" => Aggregation::WeightedPerplexity,
                    "bits_per_byte" => Aggregation::BitsPerByte,
                    "f1" => Aggregation::F1,
                    "matthews_corrcoef" => Aggregation::Mcc,
                    "bleu" => Aggregation::Bleu,
                    other => {
                        return Err(Error::key(
                            t.file.display().to_string(),
                            "metric_list.aggregation",
                            format!("`{other}` is not supported (mean, perplexity, weighted_perplexity, bits_per_byte, f1, matthews_corrcoef, bleu)"),
                        ))
                    }
                };
            }
        }
        out_metrics.push(MetricResult {
            value: agg.apply(&its),
            stderr: agg.stderr(&its),
            name,
            aggregation: agg,
            higher_is_better: hib,
            items: its,
        });
    }
    if t.output_type == OutputType::MultipleChoice && !calib.is_empty() {
        // Beyond lm-eval: how well the choice probabilities are calibrated (lower is better).
        let items: Vec<Item> = calib.iter().map(|&(c, ok)| Item::Calib(c, ok)).collect();
        out_metrics.push(MetricResult {
            name: "ece".into(),
            aggregation: Aggregation::Ece,
            higher_is_better: false,
            value: Aggregation::Ece.apply(&items),
            stderr: None,
            items,
        });
    }
    Ok(TaskResult {
        task: t.task.clone(),
        alias: t.task.clone(),
        output_type: t.output_type,
        num_fewshot: k,
        n_original,
        n_effective: plans.len(),
        metrics: out_metrics,
        samples,
        responses,
        version: t.version.clone(),
        config: t.raw.clone(),
    })
}

/// Run every task (and aggregate groups).
pub fn run(
    model: &dyn Model,
    tok: &Tokenizer,
    tasks: &[TaskConfig],
    groups: &[GroupConfig],
    opts: &BenchOptions,
    progress: &dyn Progress,
) -> Result<BenchReport> {
    opts.validate()?;
    let t0 = std::time::Instant::now();
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        progress.println(&format!("bench: {} ({})", t.task, t.output_type.as_str()));
        results.push(run_task(model, tok, t, opts, progress)?);
    }
    let groups = groups.iter().map(|g| group_result(g, &results)).collect();
    Ok(BenchReport {
        model: String::new(),
        adapter: None,
        tasks: results,
        groups,
        options: opts.clone(),
        chat_template: if opts.apply_chat_template {
            tok.chat_template().map(|c| c.source().to_string())
        } else {
            None
        },
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// lm-eval's group aggregation: the size-weighted (or plain) mean of the members' metric, with
/// the pooled standard error.
fn group_result(g: &GroupConfig, results: &[TaskResult]) -> GroupResult {
    let members: Vec<&TaskResult> = g
        .members
        .iter()
        .filter_map(|m| {
            let name = match m {
                task::GroupMember::Name(n) => n.as_str(),
                task::GroupMember::Inline(t) => t.task.as_str(),
            };
            results.iter().find(|r| r.task == name)
        })
        .collect();
    let mut metrics_out = Vec::new();
    for (metric, by_size) in &g.aggregate {
        let rows: Vec<(f64, Option<f64>, f64)> = members
            .iter()
            .filter_map(|r| {
                r.metric(metric)
                    .map(|m| (m.value, m.stderr, r.n_effective as f64))
            })
            .collect();
        if rows.is_empty() {
            tracing::warn!(
                "group `{}` ({}): no member reports `{metric}`, which its aggregate_metric_list names; no group row for it",
                g.group,
                g.file.display()
            );
            continue;
        }
        let w: Vec<f64> = rows
            .iter()
            .map(|r| if *by_size { r.2 } else { 1.0 })
            .collect();
        let total: f64 = w.iter().sum();
        let value = rows.iter().zip(&w).map(|(r, w)| r.0 * w).sum::<f64>() / total;
        let stderr = if rows.iter().all(|r| r.1.is_some()) {
            if *by_size {
                let n: f64 = rows.iter().map(|r| r.2).sum();
                let var = rows
                    .iter()
                    .map(|r| (r.2 - 1.0) * r.1.unwrap_or(0.0).powi(2) * r.2)
                    .sum::<f64>()
                    / (n - rows.len() as f64);
                Some((var / n).sqrt())
            } else {
                let k = rows.len() as f64;
                Some(
                    rows.iter()
                        .map(|r| r.1.unwrap_or(0.0).powi(2))
                        .sum::<f64>()
                        .sqrt()
                        / k,
                )
            }
        } else {
            None
        };
        metrics_out.push((metric.clone(), value, stderr));
    }
    GroupResult {
        group: g.group.clone(),
        tasks: members.iter().map(|r| r.task.clone()).collect(),
        metrics: metrics_out,
    }
}

fn num(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::String(format!("{x}")), Value::Number)
}

impl BenchReport {
    /// lm-eval's `results` object: `{task: {"alias", "acc,none", "acc_stderr,none", ...}}`.
    pub fn results_object(&self) -> Value {
        let mut res = Map::new();
        for g in &self.groups {
            let mut m = Map::new();
            m.insert("alias".into(), json!(g.group));
            for (name, v, se) in &g.metrics {
                m.insert(format!("{name},none"), num(*v));
                m.insert(format!("{name}_stderr,none"), se.map_or(json!("N/A"), num));
            }
            res.insert(g.group.clone(), Value::Object(m));
        }
        for t in &self.tasks {
            let mut m = Map::new();
            m.insert("alias".into(), json!(t.alias));
            for x in &t.metrics {
                m.insert(format!("{},none", x.name), num(x.value));
                m.insert(
                    format!("{}_stderr,none", x.name),
                    x.stderr.map_or(json!("N/A"), num),
                );
            }
            res.insert(t.task.clone(), Value::Object(m));
        }
        Value::Object(res)
    }

    /// The whole results file, in lm-eval's layout (plus ferrotune's own keys beside it).
    pub fn to_lm_eval_json(&self) -> Value {
        let mut configs = Map::new();
        let mut versions = Map::new();
        let mut n_shot = Map::new();
        let mut hib = Map::new();
        let mut n_samples = Map::new();
        let mut group_subtasks = Map::new();
        for g in &self.groups {
            group_subtasks.insert(g.group.clone(), json!(g.tasks));
        }
        for t in &self.tasks {
            configs.insert(t.task.clone(), Value::Object(t.config.clone()));
            versions.insert(t.task.clone(), t.version.clone());
            n_shot.insert(t.task.clone(), json!(t.num_fewshot));
            let h: Map<String, Value> = t
                .metrics
                .iter()
                .map(|m| (m.name.clone(), json!(m.higher_is_better)))
                .collect();
            hib.insert(t.task.clone(), Value::Object(h));
            n_samples.insert(
                t.task.clone(),
                json!({"original": t.n_original, "effective": t.n_effective}),
            );
            if !self.groups.iter().any(|g| g.tasks.contains(&t.task)) {
                group_subtasks.insert(t.task.clone(), json!([]));
            }
        }
        json!({
            "results": self.results_object(),
            "group_subtasks": group_subtasks,
            "configs": configs,
            "versions": versions,
            "n-shot": n_shot,
            "higher_is_better": hib,
            "n-samples": n_samples,
            "config": {
                "model": "ferrotune",
                "model_args": self.model,
                "adapter": self.adapter,
                "batch_size": self.options.batch_size,
                "limit": self.options.limit,
                "bootstrap_iters": metrics::BOOTSTRAP_ITERS,
                "fewshot_seed": self.options.fewshot_seed,
            },
            "chat_template": self.chat_template,
            "apply_chat_template": self.options.apply_chat_template,
            "fewshot_as_multiturn": false,
            "system_instruction": Value::Null,
            "total_evaluation_time_seconds": format!("{:.3}", self.seconds),
        })
    }

    /// A plain-text table of every task's metrics (lm-eval's `make_table` columns).
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| Task | n-shot | n | Metric | Value | Stderr |\n|---|---:|---:|---|---:|---:|\n",
        );
        for t in &self.tasks {
            for m in &t.metrics {
                let arrow = if m.higher_is_better { "↑" } else { "↓" };
                let se = m.stderr.map_or("N/A".to_string(), |e| format!("{e:.4}"));
                s.push_str(&format!(
                    "| {} | {} | {} | {} {arrow} | {:.4} | {se} |\n",
                    t.alias, t.num_fewshot, t.n_effective, m.name, m.value
                ));
            }
        }
        for g in &self.groups {
            for (name, v, se) in &g.metrics {
                let se = se.map_or("N/A".to_string(), |e| format!("{e:.4}"));
                s.push_str(&format!(
                    "| {} (group) | | | {name} | {v:.4} | {se} |\n",
                    g.group
                ));
            }
        }
        s
    }
}
