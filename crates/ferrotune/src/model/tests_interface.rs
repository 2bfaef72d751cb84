//! Tests of the model interface: LLaMA through `dyn Model`, the family-agnostic code paths
//! (adapter task types, tasks and objectives, generation and perplexity refusals) on a model
//! that reports another kind, and per-model quantization settings.
use super::family::{cannot_generate, resolve_task};
use super::*;
use crate::data::testutil::{tiny_tokenizer, TempDir};
use crate::data::{self, Batch, BatchConfig, Batcher, Example, Targets, IGNORE};
use crate::generate::{decoder_for, Decoder, Engine};
use crate::nn::{Embedding, Linear};
use crate::peft::{self, LoraConfig};
use crate::quant::{ActPrecision, BackwardWeights, QuantSettings};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn tiny_with(opts: &LoadOptions) -> Llama {
    let dir = fixture("tiny-llama-gqa-untied");
    let cfg = config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, opts, &Device::Cpu).unwrap();
    Llama::load(&src, &cfg).unwrap()
}

fn tiny() -> Llama {
    tiny_with(&LoadOptions::default())
}

fn tiny_boxed() -> Box<dyn Model> {
    Box::new(tiny())
}

/// A LLaMA model that reports another kind of model: the family-agnostic code must follow what
/// the interface says, not what the model is.
struct Disguised {
    inner: Llama,
    kind: ArchitectureKind,
    task_type: TaskType,
    objective: Objective,
    tasks: Vec<Task>,
}

impl Disguised {
    fn encoder() -> Self {
        Disguised {
            inner: tiny(),
            kind: ArchitectureKind::Encoder,
            task_type: TaskType::SeqCls,
            objective: Objective::Mlm,
            tasks: vec![Task::SequenceClassification, Task::TokenClassification],
        }
    }
    fn seq2seq() -> Self {
        Disguised {
            inner: tiny(),
            kind: ArchitectureKind::EncoderDecoder,
            task_type: TaskType::Seq2SeqLm,
            objective: Objective::SpanCorruption,
            tasks: vec![Task::Seq2SeqLm],
        }
    }
}

impl Model for Disguised {
    fn family(&self) -> &'static str {
        "disguised"
    }
    fn architecture(&self) -> String {
        "DisguisedModel".into()
    }
    fn kind(&self) -> ArchitectureKind {
        self.kind
    }
    fn pretraining_objective(&self) -> Objective {
        self.objective
    }
    fn task_type(&self) -> TaskType {
        self.task_type
    }
    fn tasks(&self) -> Vec<Task> {
        self.tasks.clone()
    }
    fn device(&self) -> &Device {
        Model::device(&self.inner)
    }
    fn dims(&self) -> Dims {
        self.inner.dims()
    }
    fn context_length(&self) -> Option<usize> {
        None
    }
    fn linears(&self) -> Vec<&Linear> {
        Model::linears(&self.inner)
    }
    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        Model::linears_mut(&mut self.inner)
    }
    fn embeddings(&self) -> Vec<&Embedding> {
        self.inner.embeddings()
    }
    fn embeddings_mut(&mut self) -> Vec<&mut Embedding> {
        self.inner.embeddings_mut()
    }
    fn tied(&self, name: &str) -> bool {
        self.inner.tied(name)
    }
    fn output_layer(&self) -> Option<&str> {
        self.inner.output_layer()
    }
    fn other_params(&self) -> Vec<(String, Tensor)> {
        self.inner.other_params()
    }
    fn make_trainable(&mut self, modules: Option<&[String]>) -> crate::Result<Vec<(String, Var)>> {
        self.inner.make_trainable(modules)
    }
    fn loss_sum(&self, batch: &Batch, train: bool) -> crate::Result<(Tensor, usize)> {
        self.inner.loss_sum(batch, train)
    }
    fn logits(&self, batch: &Batch) -> crate::Result<Tensor> {
        self.inner.logits(batch)
    }
    fn activation_floats_per_token(&self, dropout: bool) -> u64 {
        self.inner.activation_floats_per_token(dropout)
    }
    fn layer_floats_per_token(&self, dropout: bool) -> u64 {
        Model::layer_floats_per_token(&self.inner, dropout)
    }
    fn decoder(&self) -> crate::Result<Box<dyn Decoder + '_>> {
        match self.kind {
            ArchitectureKind::Encoder => Err(cannot_generate(self)),
            _ => self.inner.decoder(),
        }
    }
    fn state_dict(&self, dtype: DType) -> crate::Result<HashMap<String, Tensor>> {
        self.inner.state_dict(dtype)
    }
    fn hf_config(&self) -> crate::Result<serde_json::Value> {
        self.inner.hf_config()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[test]
fn llama_describes_itself_through_the_interface() {
    let m = tiny_boxed();
    assert_eq!(m.family(), "llama");
    assert_eq!(m.architecture(), "LlamaForCausalLM");
    assert_eq!(m.kind(), ArchitectureKind::Decoder);
    assert_eq!(m.kind().as_str(), "decoder");
    assert_eq!(m.pretraining_objective().as_str(), "clm");
    assert_eq!(m.task_type().as_peft(), "CAUSAL_LM");
    assert_eq!(m.tasks(), vec![Task::CausalLm]);
    assert_eq!(m.context_length(), Some(256));
    let d = m.dims();
    assert_eq!(
        (d.layers, d.hidden_size, d.kv_heads, d.vocab_size),
        (2, 64, 2, 256)
    );
    assert!(m.downcast_ref::<Llama>().is_some());
    assert!(m.downcast_ref::<Disguised>().is_none());
    // Every PEFT string round-trips; an unknown one is refused.
    for t in TaskType::ALL {
        assert_eq!(TaskType::from_peft(t.as_peft()), Some(t));
    }
    assert_eq!(TaskType::from_peft("QUESTION_ANS"), None);
    for t in Task::ALL {
        assert_eq!(Task::parse(t.as_str()), Some(t));
    }
}

/// The interface's names and weights are the checkpoint's: every tensor of model.safetensors
/// comes back from `state_dict` under its name with its values, and the linears are named as
/// those tensors minus `.weight`.
#[test]
fn state_dict_and_layer_names_are_the_checkpoints() {
    let m = tiny_boxed();
    let file = candle_core::safetensors::load(
        fixture("tiny-llama-gqa-untied").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let sd = m.state_dict(DType::F32).unwrap();
    let mut want: Vec<&String> = file.keys().collect();
    let mut got: Vec<&String> = sd.keys().collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for (k, t) in &file {
        let diff = (sd[k].to_dtype(DType::F32).unwrap() - t.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{k}");
    }
    for lin in m.linears() {
        assert!(
            file.contains_key(&format!("{}.weight", lin.name())),
            "{}",
            lin.name()
        );
    }
    // The parameter count adds up the same tensors.
    let all: usize = file.values().map(|t| t.elem_count()).sum();
    assert_eq!(peft::param_count(&*m, "none").all, all);
    let stored: u64 = family::parameter_storage(&*m).iter().map(|p| p.1).sum();
    assert_eq!(stored as usize, all);
}

/// The training forward through the interface is the causal-LM loss: the same number as the
/// mean cross-entropy of the full logits at the trained positions.
#[test]
fn loss_sum_is_the_cross_entropy_of_the_trained_positions() {
    let m = tiny_boxed();
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(k, &id)| if k >= 7 { id as i64 } else { IGNORE })
        .collect();
    let ex = Example {
        input_ids: ids.clone(),
        labels,
        source: crate::data::testutil::src(1),
    };
    let bc = BatchConfig {
        shuffle: false,
        ..BatchConfig::new(1, 12, 0)
    };
    let batch = Batcher::new(vec![ex], bc, Device::Cpu)
        .unwrap()
        .build(&[vec![0]])
        .unwrap();
    let (sum, n) = m.loss_sum(&batch, false).unwrap();
    assert_eq!(n, 5);
    let logits: Vec<Vec<f32>> = m
        .logits(&batch)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut want = 0.0f64;
    for k in 7..12 {
        let row = &logits[k - 1];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        want += lse - row[ids[k] as usize] as f64;
    }
    let got = sum.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
    // Targets a causal LM cannot train on are a one-line error, not a wrong loss.
    let seq = Batch {
        targets: Targets::Sequence,
        labels: Tensor::new(&[1i64], &Device::Cpu).unwrap(),
        ..batch
    };
    let e = m.loss_sum(&seq, false).unwrap_err().to_string();
    assert!(
        e.contains("causal language model") && e.contains("one class per sequence"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn adapters_carry_the_models_task_type_and_a_mismatch_is_refused() {
    let d = TempDir::new("iface-task-type");
    let mut m = tiny_boxed();
    let cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj"]);
    peft::attach_lora(&mut *m, &cfg, "a", 1).unwrap();
    let dir = d.path("adapter");
    peft::save_adapter(&*m, "a", &cfg, &dir).unwrap();
    let config_path = dir.join(peft::format::CONFIG_FILE);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(written["task_type"], "CAUSAL_LM");

    // The CAUSAL_LM adapter on a sequence-to-sequence model: one line naming the key.
    let mut s2s: Box<dyn Model> = Box::new(Disguised::seq2seq());
    let e = peft::load_adapter(&mut *s2s, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`task_type`") && e.contains("CAUSAL_LM") && e.contains("SEQ_2_SEQ_LM"),
        "{e}"
    );
    assert!(e.contains(peft::format::CONFIG_FILE), "{e}");
    assert_eq!(e.lines().count(), 1);
    assert!(
        peft::adapter_names(&*s2s).is_empty(),
        "nothing stays attached"
    );
    // ... and on the causal LM it loads.
    let mut fresh = tiny_boxed();
    peft::load_adapter(&mut *fresh, &dir, "x").unwrap();

    // Written for the other model, it carries that model's task type, and loads there.
    let mut s2s: Box<dyn Model> = Box::new(Disguised::seq2seq());
    peft::attach_lora(&mut *s2s, &cfg, "b", 1).unwrap();
    let dir2 = d.path("adapter2");
    peft::save_adapter(&*s2s, "b", &cfg, &dir2).unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir2.join(peft::format::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(v["task_type"], "SEQ_2_SEQ_LM");
    let mut other: Box<dyn Model> = Box::new(Disguised::seq2seq());
    peft::load_adapter(&mut *other, &dir2, "y").unwrap();

    // PEFT allows a null task type; an unknown one is an error naming it.
    let mut v = written.clone();
    v["task_type"] = serde_json::Value::Null;
    std::fs::write(&config_path, v.to_string()).unwrap();
    let mut fresh = tiny_boxed();
    peft::load_adapter(&mut *fresh, &dir, "x").unwrap();
    v["task_type"] = "QUESTION_ANS".into();
    std::fs::write(&config_path, v.to_string()).unwrap();
    let mut fresh = tiny_boxed();
    let e = peft::load_adapter(&mut *fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`task_type`") && e.contains("QUESTION_ANS"),
        "{e}"
    );
}

#[test]
fn tasks_and_objectives_are_checked_against_the_model() {
    use crate::train::config::Objective as O;
    let llama = tiny();
    assert_eq!(resolve_task(&llama, None), Ok(Task::CausalLm));
    assert_eq!(
        resolve_task(&llama, Some(Task::CausalLm)),
        Ok(Task::CausalLm)
    );
    let e = resolve_task(&llama, Some(Task::Seq2SeqLm)).unwrap_err();
    assert!(
        e.contains("`seq2seq_lm`") && e.contains("`causal_lm`"),
        "{e}"
    );
    let enc = Disguised::encoder();
    assert_eq!(resolve_task(&enc, None), Ok(Task::SequenceClassification));
    let e = resolve_task(&enc, Some(Task::CausalLm)).unwrap_err();
    assert!(
        e.contains("sequence_classification") && e.contains("token_classification"),
        "{e}"
    );

    assert!(O::Sft.check_fits(&llama).is_ok());
    assert!(O::Sft.check_fits(&enc).is_ok());
    let e = O::Mlm.check_fits(&llama).unwrap_err();
    assert!(
        e.contains("`mlm` is for encoder models") && e.contains("`clm`"),
        "{e}"
    );
    let e = O::SpanCorruption.check_fits(&enc).unwrap_err();
    assert!(e.contains("encoder-decoder"), "{e}");
    // The fitting objective trains.
    assert!(O::Clm.check_fits(&llama).is_ok());
    assert!(O::Mlm.check_fits(&enc).is_ok());
}

#[test]
fn an_encoder_cannot_generate_or_score_completions() {
    let enc = Disguised::encoder();
    let e = decoder_for(&enc, Engine::Auto).err().unwrap().to_string();
    assert!(
        e.contains("is an encoder") && e.contains("cannot generate"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
    let d = TempDir::new("iface-enc-ppl");
    let data = d.write("d.jsonl", "{\"q\": \"the cat\", \"a\": \"sat\"}\n");
    let tok = tiny_tokenizer(None);
    let e = crate::perplexity::completion_perplexity(
        &enc,
        &tok,
        &data,
        "{q}",
        " {a}",
        None,
        &crate::progress::NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is an encoder"), "{e}");
    let e = crate::perplexity::sequence_nll(&enc, &[1, 2, 3], 8, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a decoder"), "{e}");
    // The fast engine is LLaMA's accelerator only.
    assert!(crate::engine::FastDecoder::new(&enc).is_none());
    assert!(crate::engine::FastDecoder::new(&tiny()).is_some());
}

/// The completion perplexity of a decoder: completion tokens and EOS are scored given the
/// prompt, nothing else; the value is the mean NLL computed from the full logits.
#[test]
fn completion_perplexity_scores_the_completion_and_eos() {
    let m = tiny();
    let tok = tiny_tokenizer(None);
    let d = TempDir::new("iface-ppl");
    let data = d.write(
        "d.jsonl",
        "{\"q\": \"the cat sat\", \"a\": \"on the mat\"}\n{\"q\": \"hello\", \"a\": \"hi there\"}\n",
    );
    let nll = crate::perplexity::completion_perplexity(
        &m,
        &tok,
        &data,
        "{q} :",
        " {a}",
        None,
        &crate::progress::NoProgress,
    )
    .unwrap();
    // 3 + 1 and 2 + 1 tokens (EOS included).
    assert_eq!(nll.tokens, 7);
    let mut want = 0.0f64;
    for (q, a) in [("the cat sat :", "on the mat"), ("hello :", "hi there")] {
        let prompt = tok.encode(q, true).unwrap();
        let mut completion = tok.encode(a, false).unwrap();
        completion.push(tok.eos_ids()[0]);
        let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = m
            .forward(&t, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for k in prompt.len()..ids.len() {
            let row = &logits[k - 1];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            want += lse - row[ids[k] as usize] as f64;
        }
    }
    assert!(
        (nll.total - want).abs() < 1e-4 * want,
        "{} vs {want}",
        nll.total
    );
    assert!((nll.mean() - want / 7.0).abs() < 1e-5, "{}", nll.mean());
}

#[test]
fn seq2seq_pairs_encode_the_prompt_and_target_the_completion() {
    let tok = tiny_tokenizer(None);
    let ex = data::encode_seq2seq_pair(&tok, "the cat", "sat on", crate::data::testutil::src(1))
        .unwrap();
    let eos = tok.eos_ids()[0];
    let mut want_in = tok.encode("the cat", true).unwrap();
    want_in.push(eos);
    assert_eq!(ex.input_ids, want_in);
    let mut want_labels: Vec<i64> = tok
        .encode("sat on", false)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    want_labels.push(eos as i64);
    assert_eq!(ex.labels, want_labels);
    assert_eq!(
        data::prompt_ids(ArchitectureKind::EncoderDecoder, &ex),
        &ex.input_ids[..]
    );
    let dec = data::encode_pair_for(
        ArchitectureKind::Decoder,
        &tok,
        "the cat",
        " sat on",
        crate::data::testutil::src(1),
    )
    .unwrap();
    assert_eq!(
        data::prompt_ids(ArchitectureKind::Decoder, &dec),
        &tok.encode("the cat", true).unwrap()[..]
    );
}

/// The quantization settings are the model's: two models in one process, one set up for
/// training (8-bit activations, the Q8 transposed backward) and one for serving (16 bits,
/// exact), each computes as it would alone, whatever the other does.
#[test]
fn two_models_in_one_process_keep_their_own_quant_settings() {
    let q8 = LoadOptions {
        requantize: Some(candle_core::quantized::GgmlDType::Q8_0),
        ..Default::default()
    };
    let train = QuantSettings {
        activation: ActPrecision::I8,
        backward: BackwardWeights::Q8Transposed,
    };
    let serve = QuantSettings {
        activation: ActPrecision::I16,
        backward: BackwardWeights::Exact,
    };
    let ids = Tensor::new(&[[5u32, 17, 42, 99, 3, 250, 7, 8]], &Device::Cpu).unwrap();
    // What each computes alone: logits and the gradient reaching the embeddings' output.
    let alone = |s: QuantSettings| {
        let m = tiny_with(&q8);
        m.set_quant_settings(s);
        run(&m, &ids)
    };
    let want_train = alone(train);
    let want_serve = alone(serve);
    assert_ne!(
        want_train.0, want_serve.0,
        "8 and 16 bit activations differ"
    );
    assert_ne!(want_train.1, want_serve.1, "the backward methods differ");

    let trainer = tiny_with(&q8);
    let server = tiny_with(&q8);
    trainer.set_quant_settings(train);
    server.set_quant_settings(serve);
    assert_eq!(Model::quant_settings(&trainer), train);
    assert_eq!(Model::quant_settings(&server), serve);
    for _ in 0..2 {
        assert_eq!(run(&server, &ids), want_serve);
        assert_eq!(run(&trainer, &ids), want_train);
    }
}

/// Logits and the gradient of their sum with respect to the embedding output, flattened.
fn run(m: &Llama, ids: &Tensor) -> (Vec<f32>, Vec<f32>) {
    let x = Var::from_tensor(&m.embed_tokens.forward(ids).unwrap()).unwrap();
    let (cos, sin) = (
        m.cos.narrow(0, 0, 8).unwrap(),
        m.sin.narrow(0, 0, 8).unwrap(),
    );
    let mut h = x.as_tensor().clone();
    for l in &m.layers {
        h = l.forward(&h, &cos, &sin, 0, None, true).unwrap();
    }
    let logits = m.lm_head.forward(&m.norm.forward(&h).unwrap()).unwrap();
    let g = logits.sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (flat(&logits), flat(g.get(x.as_tensor()).unwrap()))
}

#[test]
fn an_evaluation_without_the_graph_gives_the_same_loss_and_keeps_no_graph() {
    // The evaluation's loss (`nn::without_graph`) must be the training-mode-off loss to the
    // bit, and hold no autograd graph back to the trainable weights of the layers.
    let mut m = tiny();
    let params = m.make_all_trainable().unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let labels: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    let ex = Example {
        input_ids: ids,
        labels,
        source: crate::data::testutil::src(1),
    };
    let bc = BatchConfig {
        shuffle: false,
        ..BatchConfig::new(1, 12, 0)
    };
    let batch = Batcher::new(vec![ex], bc, Device::Cpu)
        .unwrap()
        .build(&[vec![0]])
        .unwrap();
    let (with_graph, _) = m.loss_sum(&batch, false).unwrap();
    let (without, _) = crate::nn::without_graph(|| m.loss_sum(&batch, false)).unwrap();
    assert!(!crate::nn::graph_off(), "the flag is restored");
    let v = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    assert_eq!(v(&with_graph).to_bits(), v(&without).to_bits());
    let layer_weight = &params
        .iter()
        .find(|(n, _)| n == "model.layers.0.mlp.up_proj.weight")
        .unwrap()
        .1;
    assert!(with_graph
        .backward()
        .unwrap()
        .get(layer_weight.as_tensor())
        .is_some());
    assert!(without
        .backward()
        .unwrap()
        .get(layer_weight.as_tensor())
        .is_none());
}
