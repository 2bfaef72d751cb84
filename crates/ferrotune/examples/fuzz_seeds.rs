//! Write the seed corpus of every fuzz target for cargo-fuzz: the seeds `ferrotune::fuzzing`
//! builds from the repository's fixtures, plus the regression inputs of
//! `tests/fuzz/regressions/<target>/` (not the `pending/` ones: they still crash, and libFuzzer
//! stops at the first crash of its corpus).
//!
//! ```sh
//! cargo run --release -p ferrotune --example fuzz_seeds -- fuzz/corpus
//! ```
use std::path::{Path, PathBuf};

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz/regressions");
    for t in ferrotune::fuzzing::TARGETS {
        let dir = out.join(t.name);
        std::fs::create_dir_all(&dir)?;
        let seeds = (t.seeds)();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s)?;
        }
        let mut copied = 0;
        if let Ok(entries) = std::fs::read_dir(regressions.join(t.name)) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    std::fs::copy(
                        e.path(),
                        dir.join(format!("regression-{}", e.file_name().to_string_lossy())),
                    )?;
                    copied += 1;
                }
            }
        }
        println!(
            "{}: {} seeds, {copied} regression inputs -> {}",
            t.name,
            seeds.len(),
            dir.display()
        );
    }
    Ok(())
}
