//! All integration tests of this crate in one binary: one link instead of one per file keeps
//! `cargo test --release` within a small CI disk and cuts its link time. Run one file's tests
//! with a filter: `cargo test --release -p ferrotune --test integration <file>::`.

mod backprop;
mod bench_lm_eval;
mod bench_tasks;
mod bert;
mod bottleneck;
mod checkpointing;
mod common;
#[cfg(feature = "mpi")]
mod dist_mpi;
mod engine;
mod fidelity;
mod fused_vs_reference;
mod gradients;
mod hf_folders;
mod mixed_batch;
mod model_dropout;
mod optimizers;
mod packing;
mod peft_combine;
mod peft_families;
mod peft_init;
mod peft_lora;
mod peft_prompts;
mod peft_variants;
mod repo_hygiene;
mod smollm2;
mod train_eval;
mod train_full;
mod train_recipe;
mod train_safety;
mod train_tasks;
