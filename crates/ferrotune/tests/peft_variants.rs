//! IA3, DoRA and LoRA with rank_pattern / alpha_pattern / rsLoRA to and from PEFT, on SmolLM2
//! (the fetched GGUF in f32 = `.cache/models/smollm2-hf`, CAUSAL_LM) and the tiny T5 v1.1 (SEQ_2_SEQ_LM). The PEFT-made
//! adapters and PEFT's numbers for the committed ferrotune-made ones come from
//! reference/peft_variants.py (see its docstring); fixtures in tests/fixtures/peft/variants/.
use candle_core::{DType, Device, Tensor};
use ferrotune::data::{Batch, Targets, IGNORE};
use ferrotune::model::{Model, ModelSource};
use ferrotune::peft::ia3::{self, Ia3Config};
use ferrotune::peft::lora::{self, LoraConfig, ModuleSpec};
use ferrotune::peft::{self, format};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

use crate::common;
use common::{
    adapter_keys, dequantized, load_fixture, matrix, max_abs, max_abs_diff, read_json, repo,
    smollm2_gguf, t5_batch,
};

fn variants_dir(name: &str) -> PathBuf {
    repo().join("tests/fixtures/peft/variants").join(name)
}

const FAMILIES: [&str; 2] = ["smollm2", "t5"];
const VARIANTS: [&str; 3] = ["ia3", "dora", "patterns"];

fn load(family: &str) -> Box<dyn Model> {
    // SmolLM2: the fetched GGUF dequantized to f32, bit-identical to the f32 HF folder the
    // reference script gives PEFT (proven by smollm2.rs), so CI needs no Python environment.
    match family {
        "smollm2" => {
            ferrotune::model::load_source(
                ModelSource::Gguf(smollm2_gguf()),
                &dequantized(),
                &Device::Cpu,
            )
            .unwrap()
            .model
        }
        _ => load_fixture("tests/fixtures/t5/t5-v1_1"),
    }
}

/// The batch of an expected.json: SmolLM2's ids as one causal row; T5's padded batch.
fn batch(family: &str, exp: &Value) -> Batch {
    if family == "smollm2" {
        let ids: Vec<i64> = exp["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let mut labels = ids.clone();
        labels[0] = IGNORE;
        let t = ids.len();
        return Batch {
            input_ids: matrix(&[ids], DType::U32),
            labels: matrix(&[labels], DType::I64),
            targets: Targets::NextToken,
            position_ids: Tensor::arange(0u32, t as u32, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            attention_mask: Tensor::ones((1, t), DType::U8, &Device::Cpu).unwrap(),
            segment_ids: None,
            n_loss_tokens: t - 1,
            n_tokens: t,
            sources: Vec::new(),
        };
    }
    t5_batch(exp)
}

/// Mean NLL over the labelled tokens, as transformers computes it.
fn nll(m: &dyn Model, b: &Batch) -> f64 {
    let (sum, n) = m.loss_sum(b, false).unwrap();
    sum.to_scalar::<f32>().unwrap() as f64 / n as f64
}

fn rel(got: f64, want: f64) -> f64 {
    ((got - want) / want).abs()
}

/// A merged model: PEFT's merged NLL (`merged_nll_mean`) and, for T5, PEFT's merged target
/// weights (`targets`, a safetensors file).
fn check_merged(
    m: &dyn Model,
    b: &Batch,
    exp: &Value,
    family: &str,
    variant: &str,
    targets: &Path,
) {
    let merged = nll(m, b);
    let want = exp["merged_nll_mean"].as_f64().unwrap();
    assert!(
        rel(merged, want) < 1e-4,
        "{family}-{variant} merged: {merged} vs {want}"
    );
    if family == "t5" {
        let d = merged_weights_diff(m, targets);
        assert!(
            d < 1e-5,
            "{family}-{variant}: merged weights differ from PEFT's by {d:e}"
        );
    }
}

/// Every adapted weight of `m` against `file` (PEFT's merge_and_unload): max |diff| relative
/// to the largest weight.
fn merged_weights_diff(m: &dyn Model, file: &Path) -> f32 {
    let want = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    assert!(!want.is_empty());
    let mut worst = 0f32;
    for (k, w) in want {
        let name = k.strip_suffix(".weight").unwrap();
        let lin = m
            .linears()
            .into_iter()
            .find(|l| l.name() == name)
            .unwrap_or_else(|| panic!("{name}: no such linear"));
        let got = lin.weight().to_dense_f32().unwrap();
        let d = max_abs_diff(&got, &w);
        let s = max_abs(&w);
        worst = worst.max(d / s);
    }
    worst
}

// ---- (a) PEFT-made adapters load here -------------------------------------------------------

/// Each PEFT-made adapter gives PEFT's NLL (1e-4 relative) and parameter report; merging gives
/// PEFT's merged NLL and, on T5, PEFT's merged weights (1e-5 relative); an IA3 or DoRA merge
/// unmerges back to the on-the-fly numbers.
#[test]
fn peft_made_variant_adapters_match_peft() {
    for family in FAMILIES {
        for variant in VARIANTS {
            let d = variants_dir(&format!("{family}-{variant}-peft"));
            let exp = read_json(&d.join("expected.json"));
            let b = batch(family, &exp);
            let mut m = load(family);
            let base = nll(&*m, &b);
            assert!(
                rel(base, exp["base_nll_mean"].as_f64().unwrap()) < 1e-4,
                "{family} base {base} vs {}",
                exp["base_nll_mean"]
            );
            let loaded = format::load_adapter(&mut *m, &d, "default").unwrap();
            assert_eq!(
                loaded.params.to_string(),
                exp["report"].as_str().unwrap(),
                "{family}-{variant}"
            );
            let got = nll(&*m, &b);
            let want = exp["nll_mean"].as_f64().unwrap();
            eprintln!(
                "{family}-{variant} (PEFT-made): nll {got:.8} vs PEFT {want:.8}, rel {:.2e}",
                rel(got, want)
            );
            assert!(rel(got, want) < 1e-4, "{family}-{variant}: {got} vs {want}");
            assert!(
                rel(got, base) > 1e-3,
                "{family}-{variant}: the adapter changes nothing"
            );
            if variant != "patterns" {
                if variant == "ia3" {
                    ia3::merge_adapter(&mut *m, "default").unwrap();
                    assert!(rel(nll(&*m, &b), got) < 1e-5);
                    ia3::unmerge_adapter(&mut *m, "default").unwrap();
                } else {
                    lora::merge_adapter(&mut *m, "default").unwrap();
                    assert!(rel(nll(&*m, &b), got) < 1e-5);
                    lora::unmerge_adapter(&mut *m, "default").unwrap();
                }
                assert!(rel(nll(&*m, &b), got) < 1e-5, "{family}-{variant}: unmerge");
            }
            peft::merge_and_unload(&mut *m, "default").unwrap();
            check_merged(
                &*m,
                &b,
                &exp,
                family,
                variant,
                &d.join("merged_targets.safetensors"),
            );
        }
    }
}

// ---- (b) ferrotune-made adapters load in PEFT -----------------------------------------------

fn list(v: &[&str]) -> Option<ModuleSpec> {
    Some(ModuleSpec::List(v.iter().map(|s| s.to_string()).collect()))
}

/// Our adapter for a case, attached to `m` with random non-zero weights; returns the config
/// it is saved with.
enum Cfg {
    Lora(Box<LoraConfig>),
    Ia3(Box<Ia3Config>),
}

fn our_config(family: &str, variant: &str) -> Cfg {
    let smol = family == "smollm2";
    let task = if smol { "CAUSAL_LM" } else { "SEQ_2_SEQ_LM" };
    match variant {
        "ia3" => {
            let mut c = if smol {
                Ia3Config {
                    target_modules: Some(ModuleSpec::One(
                        r"model\.layers\.[01]\.(self_attn\.(k_proj|v_proj)|mlp\.down_proj)".into(),
                    )),
                    feedforward_modules: Some(ModuleSpec::One(r".*\.mlp\.down_proj".into())),
                    ..Default::default()
                }
            } else {
                // The family defaults (k, v, wo; wo feed-forward), filled in on attach.
                Ia3Config::default()
            };
            c.task_type = Some(task.into());
            Cfg::Ia3(Box::new(c))
        }
        "dora" => {
            let mut c = LoraConfig::new(
                2,
                4.0,
                if smol {
                    &["q_proj", "v_proj"]
                } else {
                    &["q", "v", "wo"]
                },
            );
            c.use_dora = true;
            if smol {
                c.layers_to_transform = Some(lora::LayerIndices::List(vec![0, 1]));
            }
            c.task_type = Some(task.into());
            Cfg::Lora(Box::new(c))
        }
        _ => {
            let mut c = LoraConfig::new(4, 8.0, &[]);
            c.use_rslora = true;
            if smol {
                c.target_modules = list(&["q_proj", "v_proj", "o_proj"]);
                c.layers_to_transform = Some(lora::LayerIndices::List(vec![0, 1]));
                c.rank_pattern.insert("v_proj".into(), 2);
                c.rank_pattern
                    .insert(r"layers\.1\.self_attn\.q_proj".into(), 3);
                c.alpha_pattern.insert("o_proj".into(), 3.0);
                c.alpha_pattern
                    .insert(r"layers\.0\.self_attn\.q_proj".into(), 16.0);
            } else {
                c.target_modules = list(&["q", "v", "wi_0", "wo"]);
                c.rank_pattern.insert("v".into(), 2);
                c.rank_pattern
                    .insert(r"decoder\.block\.1\.layer\.2\.DenseReluDense\.wo".into(), 3);
                c.alpha_pattern.insert("wi_0".into(), 3.0);
                c.alpha_pattern.insert(
                    r"encoder\.block\.0\.layer\.0\.SelfAttention\.q".into(),
                    16.0,
                );
            }
            c.task_type = Some(task.into());
            Cfg::Lora(Box::new(c))
        }
    }
}

fn randomize(m: &dyn Model, seed: u64, amp: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (p, v) in peft::adapter_params(m, "default") {
        let n = v.elem_count();
        let u: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let u = Tensor::from_vec(u, v.shape(), &Device::Cpu).unwrap();
        let new = if p.ends_with("ia3_l") {
            ((u * 0.3).unwrap() + 1.0).unwrap()
        } else if p.ends_with("lora_magnitude_vector") {
            (v.as_tensor() * ((u * 0.1).unwrap() + 1.0).unwrap()).unwrap()
        } else {
            (u * amp as f64).unwrap()
        };
        v.set(&new).unwrap();
    }
}

/// Write our adapter for every case into `dir/<family>-<variant>` with expected.json (the
/// inputs, our NLL and report); returns the NLLs.
fn write_ours(dir: &Path) -> Vec<f64> {
    let mut out = Vec::new();
    for (i, family) in FAMILIES.iter().enumerate() {
        for (j, variant) in VARIANTS.iter().enumerate() {
            let peft_exp = read_json(&variants_dir(&format!(
                "{family}-{variant}-peft/expected.json"
            )));
            let b = batch(family, &peft_exp);
            let mut m = load(family);
            let seed = 10 * i as u64 + j as u64;
            let d = dir.join(format!("{family}-{variant}"));
            let report = match our_config(family, variant) {
                Cfg::Lora(c) => {
                    let info = lora::attach_lora(&mut *m, &c, "default", seed).unwrap();
                    randomize(
                        &*m,
                        seed + 100,
                        if *family == "smollm2" { 0.05 } else { 0.3 },
                    );
                    format::save_adapter(&*m, "default", &*c, &d).unwrap();
                    info.params.to_string()
                }
                Cfg::Ia3(c) => {
                    let c = ia3::config_for_model(&*m, &c);
                    let info = ia3::attach_ia3(&mut *m, &c, "default", seed).unwrap();
                    randomize(&*m, seed + 100, 0.0);
                    format::save_adapter(&*m, "default", &c, &d).unwrap();
                    info.params.to_string()
                }
            };
            let got = nll(&*m, &b);
            let mut exp = serde_json::json!({"input_ids": peft_exp["input_ids"], "nll_mean": got, "report": report});
            for k in ["attention_mask", "labels"] {
                if let Some(v) = peft_exp.get(k) {
                    exp[k] = v.clone();
                }
            }
            std::fs::write(d.join("expected.json"), exp.to_string()).unwrap();
            // Reloading our files reproduces our numbers exactly.
            let mut fresh = load(family);
            format::load_adapter(&mut *fresh, &d, "default").unwrap();
            assert_eq!(nll(&*fresh, &b), got, "{family}-{variant}: reload");
            out.push(got);
        }
    }
    out
}

/// (b) Writes our adapters for every case with our numbers to a temp folder for
/// `reference/peft_variants.py --check DIR` (printed). With FERROTUNE_WRITE_PEFT_FIXTURE=1 it
/// (re)writes tests/fixtures/peft/variants/<case>-ferrotune/ instead; then
/// `reference/peft_variants.py --ferrotune-fixture-only` writes PEFT's numbers for them.
#[test]
fn ferrotune_variant_adapters_for_peft() {
    let write_fixture = std::env::var_os("FERROTUNE_WRITE_PEFT_FIXTURE").is_some();
    let dir = std::env::temp_dir().join(format!("ferrotune-peft-variants-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_ours(&dir);
    // PEFT's key names: a DoRA file holds the magnitudes, an IA3 file its vectors.
    let dora = adapter_keys(&dir.join("t5-dora"));
    assert!(dora.contains(
        &"base_model.model.decoder.block.0.layer.0.SelfAttention.q.lora_magnitude_vector"
            .to_string()
    ));
    let ia3k = adapter_keys(&dir.join("t5-ia3"));
    assert!(ia3k
        .contains(&"base_model.model.decoder.block.0.layer.2.DenseReluDense.wo.ia3_l".to_string()));
    assert_eq!(adapter_keys(&dir.join("smollm2-ia3")).len(), 6);
    if write_fixture {
        for f in FAMILIES {
            for v in VARIANTS {
                let to = variants_dir(&format!("{f}-{v}-ferrotune"));
                std::fs::create_dir_all(&to).unwrap();
                for name in [format::CONFIG_FILE, format::WEIGHTS_FILE, "expected.json"] {
                    std::fs::copy(dir.join(format!("{f}-{v}")).join(name), to.join(name)).unwrap();
                }
            }
        }
        eprintln!("wrote tests/fixtures/peft/variants/*-ferrotune; now: .venv/bin/python reference/peft_variants.py --ferrotune-fixture-only");
    } else {
        eprintln!(
            "ferrotune adapters in {0}\n  check: .venv/bin/python reference/peft_variants.py --check {0}",
            dir.display()
        );
    }
}

/// (b) The committed ferrotune-made adapters give PEFT's own numbers (peft_expected.json):
/// NLL within 1e-4 relative, PEFT's report, PEFT's merged NLL after our merge and, on T5,
/// PEFT's merged weights.
#[test]
fn committed_ferrotune_variant_adapters_match_peft() {
    for family in FAMILIES {
        for variant in VARIANTS {
            let d = variants_dir(&format!("{family}-{variant}-ferrotune"));
            let exp = read_json(&d.join("peft_expected.json"));
            let b = batch(family, &exp);
            let mut m = load(family);
            let loaded = format::load_adapter(&mut *m, &d, "default").unwrap();
            assert_eq!(loaded.params.to_string(), exp["report"].as_str().unwrap());
            let got = nll(&*m, &b);
            let want = exp["nll_mean"].as_f64().unwrap();
            eprintln!(
                "{family}-{variant} (ours, in PEFT): nll {got:.8} vs PEFT {want:.8}, rel {:.2e}",
                rel(got, want)
            );
            assert!(rel(got, want) < 1e-4, "{family}-{variant}: {got} vs {want}");
            peft::merge_and_unload(&mut *m, "default").unwrap();
            check_merged(
                &*m,
                &b,
                &exp,
                family,
                variant,
                &d.join("peft_merged_targets.safetensors"),
            );
        }
    }
}

// ---- Bad files -----------------------------------------------------------------------------

fn copy_case(name: &str, tag: &str) -> PathBuf {
    let from = variants_dir(name);
    let to = std::env::temp_dir().join(format!(
        "ferrotune-peft-variants-bad-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for f in [format::CONFIG_FILE, format::WEIGHTS_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

fn edit_config(d: &Path, f: impl FnOnce(&mut Value)) {
    let p = d.join(format::CONFIG_FILE);
    let mut v = read_json(&p);
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// The error of loading the adapter in `dir`, which must be one line.
fn load_error(m: &mut dyn Model, dir: &Path) -> String {
    let e = format::load_adapter(m, dir, "default")
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

/// An IA3 vector of the wrong orientation, a DoRA config whose file has no magnitudes, and
/// `feedforward_modules` outside `target_modules` are one-line errors naming the file and the
/// tensor or key; nothing stays attached.
#[test]
fn bad_variant_adapters_are_one_line_errors() {
    let t5_ia3 = copy_case("t5-ia3-peft", "ia3");
    edit_config(&t5_ia3, |v| {
        v["feedforward_modules"] = serde_json::json!([])
    });
    let mut m = load("t5");
    let e = load_error(&mut *m, &t5_ia3);
    assert!(
        e.contains("DenseReluDense.wo.ia3_l` is [1, 32]") && e.contains("output scaling"),
        "{e}"
    );
    assert!(peft::adapter_names(&*m).is_empty());

    let t5_lora = copy_case("t5-patterns-peft", "dora");
    edit_config(&t5_lora, |v| v["use_dora"] = true.into());
    let e = load_error(&mut *m, &t5_lora);
    assert!(e.contains("lora_magnitude_vector` is missing"), "{e}");

    let t5_ff = copy_case("t5-ia3-peft", "ff");
    edit_config(&t5_ff, |v| {
        v["feedforward_modules"] = serde_json::json!(["wi_0"])
    });
    let e = load_error(&mut *m, &t5_ff);
    assert!(
        e.contains("`feedforward_modules`") && e.contains("adapter_config.json"),
        "{e}"
    );
    assert!(peft::adapter_names(&*m).is_empty());
}
