//! Arbitrary bytes through the frame decoder: never a panic; what decodes re-encodes to itself.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_wire::fuzzing::decode_stream(data));
