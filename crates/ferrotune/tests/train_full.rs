//! Full and selective fine-tuning end to end on a tiny model (tests/fixtures/models, 2
//! layers) with a word-level tokenizer: every optimizer lowers the loss comparably, selective
//! rules (regex, layers, bitfit) train exactly what they select and the changed tensors put
//! onto the base give the trained model.
use candle_core::{DType, Device};
use ferrotune::model::{self, LoadOptions};
use ferrotune::train::{self, ProgressMode, RunOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::common;
use common::{repo, rev_model as tiny_model, reverse_rows, tmp};

/// A run folder with the tiny model and the reverse task; `body` is appended to the config
/// (method, sections).
fn setup(tag: &str, body: &str) -> (PathBuf, train::LoadedConfig) {
    let dir = tmp(tag);
    tiny_model(&dir);
    let rows = reverse_rows(8, 5);
    std::fs::write(dir.join("train.jsonl"), &rows).unwrap();
    std::fs::write(dir.join("dev.jsonl"), &rows).unwrap();
    let text = format!(
        r#"model = "model"
output_dir = "out"
{body}
[data]
train = "train.jsonl"
validation = "dev.jsonl"
template = "{{q}} ="
completion = " {{a}}"
"#
    );
    let config = dir.join("run.toml");
    std::fs::write(&config, text).unwrap();
    let c = train::load_config(&config, &[]).unwrap();
    (dir, c)
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: ProgressMode::Quiet,
        ..Default::default()
    }
}

const TRAIN: &str = "batch_size = 4\nmax_seq_len = 32\nlog_every = 1000\nmax_steps = 30\neval_batches = 0\nwarmup_steps = 3\nweight_decay = 0.01\n";

#[test]
fn every_optimizer_lowers_the_loss_comparably_in_full_fine_tuning() {
    let mut finals = Vec::new();
    for (opt, extra) in [
        ("adamw", "lr = 3e-3\n"),
        (
            "adamw_8bit",
            "lr = 3e-3\n[train.adamw_8bit]\nmin_8bit_size = 256\n",
        ),
        ("adafactor", "lr = 3e-3\n[train.adafactor]\nbeta1 = 0.9\n"),
        (
            "sgd",
            "lr = 0.1\n[train.sgd]\nmomentum = 0.9\nnesterov = true\n",
        ),
    ] {
        let body = format!("method = \"full\"\n[train]\noptimizer = \"{opt}\"\n{TRAIN}{extra}");
        let (dir, c) = setup(&format!("opt-{opt}"), &body);
        let s = train::run(&c, &quiet()).unwrap();
        let (first, last) = (s.initial_val_loss.unwrap(), s.final_val_loss.unwrap());
        eprintln!("{opt}: val loss {first:.6} -> {last:.6}");
        assert!(last < 0.5 * first, "{opt}: val loss {first} -> {last}");
        assert!(dir.join("out/model/model.safetensors").is_file());
        finals.push((opt, (first - last) / first));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // 8-bit AdamW and Adafactor remove as much of the initial loss as AdamW, within 5% (on a
    // task the tiny model memorises; the issue's comparison on the quickstart is the lead's).
    let adamw = finals[0].1;
    for (opt, gain) in &finals[1..3] {
        assert!(*gain > 0.95 * adamw, "{opt}: {gain} vs adamw {adamw}");
    }
}

/// Every parameter of a saved HF folder.
fn weights(dir: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn selective_rules_train_what_they_select_and_the_changes_apply_to_the_base() {
    let body = format!(
        "method = \"selective\"\n[selective]\nregex = \"mlp\\\\.(up|down)_proj\"\nlayers = \"1\"\n[train]\n{TRAIN}lr = 3e-3\n"
    );
    let (dir, c) = setup("selective", &body);
    let s = train::run(&c, &quiet()).unwrap();
    assert!(s.final_val_loss.unwrap() < s.initial_val_loss.unwrap());
    let base = weights(&dir.join("model"));
    let trained = weights(&dir.join("out/model"));
    let want = [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    ];
    let mut changed: Vec<&str> = trained
        .iter()
        .filter(|(k, v)| base[*k] != **v)
        .map(|(k, _)| k.as_str())
        .collect();
    changed.sort();
    assert_eq!(changed, want, "exactly the selected tensors changed");
    assert_eq!(
        s.trainable_params,
        want.iter().map(|k| base[*k].len()).sum::<usize>()
    );
    // adapter/: only the changed tensors, and a config naming them and the base.
    let adapter = dir.join("out/adapter");
    let file = candle_core::safetensors::load(adapter.join("selective.safetensors"), &Device::Cpu)
        .unwrap();
    let mut keys: Vec<&String> = file.keys().collect();
    keys.sort();
    assert_eq!(keys, want);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("selective_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "SELECTIVE");
    assert_eq!(cfg["layers"], "1");
    // Onto the base: its state dict becomes the trained model's.
    let mut m = model::load(
        dir.join("model").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let n = ferrotune::peft::selective::apply(&mut *m.model, &adapter).unwrap();
    assert_eq!(n, 2);
    let sd = m.model.state_dict(DType::F32).unwrap();
    for (k, v) in &trained {
        let got: Vec<f32> = sd[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&got, v, "{k}");
    }
    // A file naming a tensor the model lacks is a one-line error naming it.
    let mut bad = file.clone();
    let t = bad.remove(want[0]).unwrap();
    bad.insert("model.layers.9.mlp.up_proj.weight".into(), t);
    candle_core::safetensors::save(&bad, adapter.join("selective.safetensors")).unwrap();
    let mut m = model::load(
        dir.join("model").to_str().unwrap(),
        &LoadOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    let e = ferrotune::peft::selective::apply(&mut *m.model, &adapter)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.9.mlp.up_proj.weight") && !e.contains('\n'),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bitfit_on_a_family_without_biases_is_a_one_line_error_naming_it() {
    let body = format!("method = \"selective\"\n[selective]\nbitfit = true\n[train]\n{TRAIN}");
    let (dir, c) = setup("bitfit", &body);
    let e = train::run(&c, &quiet()).unwrap_err().to_string();
    assert!(
        e.contains("bitfit") && e.contains("no biases") && !e.contains('\n'),
        "{e}"
    );
    assert!(e.to_lowercase().contains("llama"), "names the family: {e}");
    // An empty [selective] is a config error naming the section.
    let (_, c2) = {
        let d = tmp("bitfit-empty");
        std::fs::write(d.join("run.toml"), "model = \"m\"\noutput_dir = \"o\"\nmethod = \"selective\"\n[data]\ntrain = \"t.jsonl\"\n[selective]\n").unwrap();
        (d.clone(), train::load_config(&d.join("run.toml"), &[]))
    };
    let e = c2.unwrap_err().to_string();
    assert!(e.contains("selective") && e.contains("regex"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_run_shards_model_weights_above_max_shard_size_and_the_folder_loads_back() {
    let body = format!(
        "method = \"full\"\n[train]\n{}max_shard_size = \"40KB\"\n",
        TRAIN.replace("max_steps = 30", "max_steps = 2")
    );
    let (dir, c) = setup("shards", &body);
    train::run(&c, &quiet()).unwrap();
    let m = dir.join("out/model");
    assert!(!m.join("model.safetensors").exists());
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(m.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() > 1, "{files:?}");
    let n = files.len();
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let size = std::fs::metadata(m.join(f)).unwrap().len();
        // a shard holds at most 40 KB of tensors unless one tensor alone is larger
        let tensors = candle_core::safetensors::load(m.join(f), &Device::Cpu).unwrap();
        assert!(size <= 41_000 || tensors.len() == 1, "{f}: {size} bytes");
    }
    let total: u64 = index["metadata"]["total_size"].as_u64().unwrap();
    // The folder loads back (`--model runs/x/model`) with every trained tensor.
    let loaded = model::load(m.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let sd = loaded.model.state_dict(DType::F32).unwrap();
    let sum: u64 = sd.values().map(|t| (t.elem_count() * 4) as u64).sum();
    assert_eq!(sum, total);
    assert_eq!(sd.len(), map.len());
    // A bad size is a one-line error naming the key.
    let e = train::load_config(
        &dir.join("run.toml"),
        &["train.max_shard_size=\"big\"".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("max_shard_size") && !e.contains('\n'), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bitfit_on_bert_trains_only_the_biases_and_freezes_the_rest() {
    let dir = repo().join("tests/fixtures/bert/tiny-bert");
    let mut m = model::load(dir.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let cfg = ferrotune::peft::selective::SelectiveConfig {
        bitfit: true,
        layers: Some(ferrotune::peft::selective::LayerRange::Text("0".into())),
        ..Default::default()
    };
    let vars = ferrotune::peft::selective::select(&mut *m.model, &cfg).unwrap();
    assert!(!vars.is_empty());
    for (n, _) in &vars {
        assert!(n.ends_with("bias") && n.contains(".layer.0."), "{n}");
    }
    // Every selected bias is a linear's (LayerNorm biases are norms') or a norm's; no linear
    // weight stayed trainable.
    for lin in m.model.linears() {
        assert!(
            !matches!(lin.weight(), ferrotune::nn::LinearWeight::Trainable(_)),
            "{} is still trainable",
            lin.name()
        );
    }
}

/// The logits of the model in `dir` (an HF folder) on `ids`, one row per position.
fn folder_logits(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let cfg = model::config_from_hf_dir(dir).unwrap();
    let src = ferrotune::model::SafetensorsSource::open(dir, &LoadOptions::default(), &Device::Cpu)
        .unwrap();
    let m = model::Llama::load(&src, &cfg).unwrap();
    let t = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&t, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn worst_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Tensor names, shapes and dtypes of every safetensors file in an HF folder.
fn tensor_layout(dir: &Path) -> Vec<(String, Vec<usize>, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.push((name, view.shape().to_vec(), format!("{:?}", view.dtype())));
            }
        }
    }
    out.sort();
    out
}

/// A fully fine-tuned model folder (sharded, with its tokenizer) is what transformers loads:
/// `tests/fixtures/full_ft/llama/model/` is the `model/` of this very run, committed, and
/// `transformers_expected.json` holds transformers' logits for it (`reference/full_ft_check.py
/// --fixture tests/fixtures/full_ft/llama --write`). Here: our logits of the committed folder
/// equal transformers' within 1e-4, the tokenizer transformers loaded from it encodes as ours,
/// and a fresh run writes the same files, tensors and config (its weights may differ in the last
/// bits from one CPU to another, so its logits are checked loosely).
/// FERROTUNE_WRITE_FULL_FT_FIXTURES=1 rewrites the committed folder.
#[test]
fn a_fully_fine_tuned_folder_gives_transformers_logits() {
    let body = format!(
        "method = \"full\"\n[train]\nlr = 3e-3\n{}max_shard_size = \"40KB\"\n",
        TRAIN.replace("max_steps = 30", "max_steps = 12")
    );
    let (dir, c) = setup("full-hf", &body);
    train::run(&c, &quiet()).unwrap();
    let fresh = dir.join("out/model");
    let fixture = repo().join("tests/fixtures/full_ft/llama");
    let committed = fixture.join("model");
    let text = "rev red blue green =";
    let tok = ferrotune::tokenizer::Tokenizer::from_hf_dir(&fresh).unwrap();
    let ids: Vec<u32> = tok.encode(text, true).unwrap();
    assert!(ids.len() >= 4, "{ids:?}");
    if std::env::var_os("FERROTUNE_WRITE_FULL_FT_FIXTURES").is_some() {
        let _ = std::fs::remove_dir_all(&committed);
        std::fs::create_dir_all(&committed).unwrap();
        for e in std::fs::read_dir(&fresh).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, committed.join(p.file_name().unwrap())).unwrap();
        }
        let exp = serde_json::json!({ "text": text, "input_ids": ids });
        std::fs::write(
            fixture.join("input.json"),
            serde_json::to_string_pretty(&exp).unwrap(),
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        return; // transformers' numbers come next: reference/full_ft_check.py --fixture ... --write
    }
    let exp = common::read_json(&fixture.join("transformers_expected.json"));
    let want_ids: Vec<u32> = exp["transformers_input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // transformers' tokenizer, loaded from the committed folder, gives the same text tokens.
    // The BOS: ours honours tokenizer_config's add_bos_token; transformers' generic
    // PreTrainedTokenizerFast (this word-level test tokenizer names no class) ignores it, where
    // its LlamaTokenizerFast honours it. The logits below are of our ids in both.
    assert_eq!(ids[0], 1, "{ids:?}");
    assert_eq!(ids[1..], want_ids[..], "tokenizer of {text:?}");
    let want: Vec<Vec<f32>> = exp["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(common::floats)
        .collect();
    let ours = folder_logits(&committed, &ids);
    let d = worst_diff(&ours, &want);
    assert!(
        d < 1e-4,
        "committed folder: logits differ from transformers' by {d}"
    );
    eprintln!("committed full fine-tuned folder: logits within {d:e} of transformers'");
    // The fresh run wrote the same layout (files, tensors, config) as the committed one.
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&fresh), names(&committed));
    assert_eq!(tensor_layout(&fresh), tensor_layout(&committed));
    let config = |d: &Path| common::read_json(&d.join("config.json"));
    assert_eq!(config(&fresh), config(&committed));
    // Trained: far from the base model's logits, close to the committed run's.
    let base = folder_logits(&dir.join("model"), &ids);
    let moved = worst_diff(&base, &want);
    let fresh_d = worst_diff(&folder_logits(&fresh, &ids), &want);
    assert!(moved > 0.5, "training moved the logits by only {moved}");
    eprintln!("fresh run: within {fresh_d:e} of the committed run (training moved them {moved})");
    assert!(
        fresh_d < 0.05 * moved,
        "fresh run: logits differ from the committed run's by {fresh_d} (training moved them {moved})"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
