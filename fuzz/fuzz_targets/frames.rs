#![no_main]
//! libFuzzer target: see `canal_consumer::canal::fuzz::frames`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| canal_consumer::canal::fuzz::frames(data));
