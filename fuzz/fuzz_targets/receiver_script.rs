//! A hostile sender's message sequence against the receiver state machine.
#![no_main]
libfuzzer_sys::fuzz_target!(|steps: Vec<flux_transfer::fuzzing::Step>| {
    flux_transfer::fuzzing::receiver_script(steps)
});
