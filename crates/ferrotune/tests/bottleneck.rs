//! Bottleneck adapters (Houlsby / Pfeiffer) on every family, on the tiny fixtures: where they
//! go, that a fresh one changes nothing, and that a trained one survives its adapter folder
//! (written, read back onto a fresh model, same outputs). The file format is ours (PEFT has no
//! bottleneck adapters); a file that does not fit the model is a one-line error.
use candle_core::{DType, Device, Tensor};
use ferrotune::data::{Batch, Targets};
use ferrotune::model::Model;
use ferrotune::peft::bottleneck::{self, AdapterType, BottleneckConfig};
use ferrotune::peft::{self, format, PeftMethod};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;
use common::{flat, load_fixture, max_diff};

fn load(rel: &str) -> Box<dyn Model> {
    // The tiny LLaMA fixtures have no tokenizer: build the model alone.
    match rel.strip_prefix("tests/fixtures/models/") {
        Some(name) => Box::new(common::tiny(name)),
        None => load_fixture(rel),
    }
}

const LLAMA: &str = "tests/fixtures/models/tiny-llama-gqa-untied";
const T5: &str = "tests/fixtures/t5/t5-v1_1";
const BERT: &str = "tests/fixtures/bert/tiny-bert";

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap()
}

/// A small batch of the model's own kind: next-token (LLaMA), decoder targets (T5), masked-LM
/// targets (BERT).
fn batch(m: &dyn Model) -> Batch {
    let input = ids(&[&[5, 9, 17, 3, 8, 21], &[7, 7, 30, 2, 11, 4]]);
    let (labels, targets) = match m.family() {
        "t5" => (
            ids(&[&[12, 6, 1], &[3, 19, 1]])
                .to_dtype(DType::I64)
                .unwrap(),
            Targets::Decoder,
        ),
        "bert" => (input.to_dtype(DType::I64).unwrap(), Targets::Token),
        _ => (input.to_dtype(DType::I64).unwrap(), Targets::NextToken),
    };
    let mask = Tensor::ones(input.dims(), DType::U8, &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, 6, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((2, 1))
        .unwrap();
    Batch {
        input_ids: input,
        labels,
        targets,
        attention_mask: mask,
        position_ids: pos,
        segment_ids: None,
        n_loss_tokens: 0,
        n_tokens: 0,
        sources: Vec::new(),
    }
}

fn logits(m: &dyn Model) -> Vec<f32> {
    flat(&m.logits(&batch(m)).unwrap())
}

fn cfg(t: AdapterType) -> BottleneckConfig {
    BottleneckConfig {
        adapter_type: t,
        reduction_factor: 4.0,
        ..BottleneckConfig::default()
    }
}

/// The wrapped module names' last two parts, counted.
fn wrapped(m: &dyn Model, name: &str) -> Vec<String> {
    m.linears()
        .iter()
        .filter(|l| l.adapters().any(|(n, _)| n == name))
        .map(|l| l.name().to_string())
        .collect()
}

#[test]
fn houlsby_wraps_attention_and_feed_forward_outputs_pfeiffer_only_feed_forward() {
    for (rel, houlsby_suffixes, pfeiffer_suffixes) in [
        (
            LLAMA,
            vec![".self_attn.o_proj", ".mlp.down_proj"],
            vec![".mlp.down_proj"],
        ),
        (
            T5,
            vec![
                ".SelfAttention.o",
                ".EncDecAttention.o",
                ".DenseReluDense.wo",
            ],
            vec![".DenseReluDense.wo"],
        ),
        (
            BERT,
            vec![".attention.output.dense", ".output.dense"],
            vec![".output.dense"],
        ),
    ] {
        for (t, suffixes) in [
            (AdapterType::Houlsby, houlsby_suffixes),
            (AdapterType::Pfeiffer, pfeiffer_suffixes),
        ] {
            let mut m = load(rel);
            let layers = m.dims().layers;
            cfg(t).attach(&mut *m, "a", 0).unwrap();
            let names = wrapped(&*m, "a");
            assert!(!names.is_empty(), "{rel} {t:?}");
            for n in &names {
                assert!(suffixes.iter().any(|s| n.ends_with(s)), "{rel} {t:?}: {n}");
                let attention =
                    n.contains("attention.output") || n.ends_with(".o") || n.ends_with("o_proj");
                assert!(t == AdapterType::Houlsby || !attention, "{rel} {t:?}: {n}");
            }
            // Every block has its feed-forward adapter (T5: encoder and decoder blocks).
            let ff = names.iter().filter(|n| {
                n.ends_with("down_proj")
                    || n.ends_with(".wo")
                    || (n.ends_with(".output.dense") && !n.contains("attention"))
            });
            assert!(ff.count() >= layers, "{rel} {t:?}: {names:?}");
        }
    }
}

/// Random values for every adapter tensor (a trained adapter), seeded.
fn randomize(m: &dyn Model, name: &str, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in peft::adapter_params(m, name) {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

#[test]
fn fresh_adapters_change_nothing_trained_ones_survive_their_folder() {
    for rel in [LLAMA, T5, BERT] {
        for t in [AdapterType::Houlsby, AdapterType::Pfeiffer] {
            let mut m = load(rel);
            let base = logits(&*m);
            let mut c = cfg(t);
            c.task_type = Some(m.task_type().as_peft().to_string());
            c.attach(&mut *m, "default", 7).unwrap();
            assert_eq!(
                logits(&*m),
                base,
                "{rel} {t:?}: a fresh adapter is the identity"
            );
            randomize(&*m, "default", 1);
            let tuned = logits(&*m);
            assert!(
                max_diff(&tuned, &base) > 1e-3,
                "{rel} {t:?}: the adapter must matter"
            );
            // Switched off, the base model comes back.
            peft::set_adapters_enabled(&mut *m, false);
            assert_eq!(logits(&*m), base, "{rel} {t:?}");
            peft::set_adapters_enabled(&mut *m, true);

            let dir = std::env::temp_dir().join(format!(
                "ferrotune-bottleneck-{}-{t:?}-{}",
                rel.replace('/', "_"),
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            format::save_adapter(&*m, "default", &c, &dir).unwrap();
            let mut fresh = load(rel);
            let loaded = format::load_adapter(&mut *fresh, &dir, "x").unwrap();
            assert!(matches!(
                loaded.config,
                format::AdapterConfig::Bottleneck(_)
            ));
            assert_eq!(
                loaded.params.trainable,
                peft::param_count(&*m, "default").trainable
            );
            let back = logits(&*fresh);
            assert!(max_diff(&back, &tuned) < 1e-6, "{rel} {t:?}");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn a_file_for_another_model_or_config_is_a_one_line_error() {
    let mut m = load(LLAMA);
    let c = cfg(AdapterType::Houlsby);
    c.attach(&mut *m, "default", 1).unwrap();
    let dir = std::env::temp_dir().join(format!("ferrotune-bottleneck-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    format::save_adapter(&*m, "default", &c, &dir).unwrap();
    // The config now asks for wider bottlenecks than the file holds.
    let cfg_path = dir.join(format::CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["reduction_factor"] = 2.0.into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let mut fresh = load(LLAMA);
    let e = format::load_adapter(&mut *fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("adapter_down.weight") && e.contains("adapter_model.safetensors"),
        "{e}"
    );
    assert!(
        peft::adapter_names(&*fresh).is_empty(),
        "nothing stays attached"
    );
    // Pfeiffer positions with a Houlsby file: the attention adapters are left over.
    v["reduction_factor"] = 4.0.into();
    v["adapter_type"] = "pfeiffer".into();
    std::fs::write(&cfg_path, v.to_string()).unwrap();
    let e = format::load_adapter(&mut *fresh, &dir, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("o_proj") && e.contains("belongs to no module"),
        "{e}"
    );
    // A bottleneck adapter cannot be folded into the weights.
    format::load_adapter(
        &mut *fresh,
        &{
            v["adapter_type"] = "houlsby".into();
            std::fs::write(&cfg_path, v.to_string()).unwrap();
            dir.clone()
        },
        "x",
    )
    .unwrap();
    let e = peft::merge_and_unload(&mut *fresh, "x")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot be merged") || e.contains("not LoRA"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = bottleneck::resolve_targets;
}
