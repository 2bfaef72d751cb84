//! All integration tests of this crate in one binary: one link instead of one per file keeps
//! `cargo test --release` within a small CI disk and cuts its link time. Run one file's tests
//! with a filter: `cargo test --release -p ferrotune-cli --test integration <file>::`.

mod bad_flags;
mod bad_input;
mod bad_model;
mod bnb_cli;
mod classify;
mod cli_success;
mod compare_cli;
mod distributed_cli;
mod embed;
mod examples_dry_run;
mod file_safety;
mod gguf_cli;
mod model_interface;
mod peft_families_cli;
mod plan_cli;
mod serve_cli;
mod support;
mod t5_cli;
mod task_fit;
mod train_cli;
mod train_families;
