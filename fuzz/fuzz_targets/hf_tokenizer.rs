#![no_main]
//! `ferrotune::fuzzing::hf_tokenizer`: see its documentation and docs/fuzzing.md.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferrotune::fuzzing::hf_tokenizer(data);
});
