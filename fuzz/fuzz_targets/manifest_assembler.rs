//! Hostile manifests through the assembler, under a small memory limit: never a panic, the
//! limit holds, and every clash verdict matches a simple reference model.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: flux_transfer::fuzzing::ManifestInput| {
    flux_transfer::fuzzing::manifest_assembler(input)
});
