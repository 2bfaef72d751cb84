#![no_main]
//! `ferrotune::fuzzing::data_rows`: see its documentation and docs/fuzzing.md.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferrotune::fuzzing::data_rows(data);
});
