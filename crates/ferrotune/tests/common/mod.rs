//! Helpers shared by the integration tests: the tiny HF fixture models and random examples.
#![allow(dead_code)] // each test binary uses its own subset
use candle_core::{Device, Tensor};
use ferrotune::data::{Example, Loc, Source, IGNORE};
use ferrotune::model::{self, LoadOptions, SafetensorsSource};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A tiny fixture model from `tests/fixtures/models/<name>` (f32, as stored).
pub fn tiny(name: &str) -> model::Llama {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    let cfg = model::config_from_hf_dir(&dir).unwrap();
    let src = SafetensorsSource::open(&dir, &LoadOptions::default(), &Device::Cpu).unwrap();
    model::Llama::load(&src, &cfg).unwrap()
}

/// Examples of the given lengths with random ids below `vocab`; the first half of each is
/// prompt (ignored), the rest trained.
pub fn examples(lens: &[usize], vocab: u32, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    lens.iter()
        .enumerate()
        .map(|(e, &n)| {
            let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
            Example {
                labels: ids
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| if k >= n / 2 { id as i64 } else { IGNORE })
                    .collect(),
                input_ids: ids,
                source: Source {
                    file: Arc::from(Path::new("t.jsonl")),
                    loc: Loc::Line(e + 1),
                },
            }
        })
        .collect()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}
