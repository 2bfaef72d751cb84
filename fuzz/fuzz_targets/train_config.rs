#![no_main]
//! `ferrotune::fuzzing::train_config`: see its documentation and docs/fuzzing.md.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferrotune::fuzzing::train_config(data);
});
