//! Damaged and hostile resume sidecars through the reader: never a panic, only indices inside
//! the file, and what parses re-encodes to the same records.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: flux_transfer::fuzzing::SidecarInput| {
    flux_transfer::fuzzing::sidecar_reader(input)
});
