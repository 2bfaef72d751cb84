//! A mixed batch (PEFT's `adapter_names=`): several adapters on one base, each row of a batch
//! naming its own (or none); every row's logits equal that row run alone on a model with only
//! its adapter attached. Adapters: the PEFT-made LoRAs of tests/fixtures/peft/combine and a
//! bottleneck adapter with random weights.
use candle_core::{DType, Device, Tensor};
use ferrotune::data::{Batch, Targets};
use ferrotune::model::{LoadOptions, Model, SafetensorsSource};
use ferrotune::peft::bottleneck::{AdapterType, BottleneckConfig};
use ferrotune::peft::{self, format, PeftMethod};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

fn model() -> Box<dyn Model> {
    let dir = repo().join("tests/fixtures/models/tiny-llama-gqa-untied");
    let cfg = ferrotune::model::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    Box::new(ferrotune::model::Llama::load(&src, &cfg).unwrap())
}

fn batch(rows: &[Vec<u32>]) -> Batch {
    let t = rows[0].len();
    let ids = Tensor::from_vec(rows.concat(), (rows.len(), t), &Device::Cpu).unwrap();
    let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((rows.len(), 1))
        .unwrap();
    Batch {
        labels: ids.to_dtype(DType::I64).unwrap(),
        attention_mask: Tensor::ones((rows.len(), t), DType::U8, &Device::Cpu).unwrap(),
        input_ids: ids,
        targets: Targets::NextToken,
        position_ids: pos,
        segment_ids: None,
        n_loss_tokens: 0,
        n_tokens: 0,
        sources: Vec::new(),
    }
}

fn logits(m: &dyn Model, rows: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let l = m.logits(&batch(rows)).unwrap();
    (0..rows.len())
        .map(|i| l.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn bottleneck() -> BottleneckConfig {
    BottleneckConfig {
        adapter_type: AdapterType::Houlsby,
        reduction_factor: 8.0,
        ..BottleneckConfig::default()
    }
}

/// Attach adapter `name` (a fixture LoRA, or the seeded bottleneck adapter) to `m`.
fn attach(m: &mut dyn Model, name: &str) {
    if name == "bn" {
        bottleneck().attach(m, "bn", 0).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for (_, v) in peft::adapter_params(m, "bn") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.3..0.3))
                .collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    } else {
        let dir = repo().join("tests/fixtures/peft/combine").join(name);
        format::load_adapter(m, &dir, name).unwrap();
    }
}

#[test]
fn each_row_of_a_mixed_batch_equals_the_row_alone_with_its_adapter() {
    let rows: Vec<Vec<u32>> = (0..5u32)
        .map(|r| (0..10).map(|i| (r * 41 + i * 7 + 3) % 256).collect())
        .collect();
    let names = [Some("a"), Some("bn"), None, Some("c"), Some("a")];
    let mut m = model();
    for n in ["a", "c", "bn"] {
        attach(&mut *m, n);
    }
    peft::set_row_adapters(&mut *m, Some(&names)).unwrap();
    let mixed = logits(&*m, &rows);
    let base_alone = logits(&*model(), &rows[2..3]);
    for (i, name) in names.iter().enumerate() {
        let want = match name {
            None => base_alone[0].clone(),
            Some(n) => {
                let mut alone = model();
                attach(&mut *alone, n);
                logits(&*alone, &rows[i..i + 1]).remove(0)
            }
        };
        let d = mixed[i]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "row {i} ({name:?}): {d}");
    }
    // The adapters differ, so the check above can fail: rows 0 and 4 (adapter a) against
    // the same tokens with adapter c.
    peft::set_row_adapters(&mut *m, Some(&[Some("c"); 5])).unwrap();
    let with_c = logits(&*m, &rows);
    let d = with_c[0]
        .iter()
        .zip(&mixed[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d > 1e-3, "{d}");
    // A name that is not attached, a batch of another size: one-line errors.
    let e = peft::set_row_adapters(&mut *m, Some(&[Some("zz")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("zz") && e.contains("attached"), "{e}");
    peft::set_row_adapters(&mut *m, Some(&[Some("a"), None])).unwrap();
    let e = m.logits(&batch(&rows)).unwrap_err().to_string();
    assert!(e.contains("2 rows") && e.contains("has 5"), "{e}");
    // Routing off: every attached adapter applies again, as before.
    peft::set_row_adapters(&mut *m, None).unwrap();
    assert!(m.logits(&batch(&rows)).is_ok());
}
