//! Fuzz target `view_builder`: see `appliance_fuzz::view_builder` (fuzz/src/view_builder.rs) for what the input
//! describes and which promises are checked. Any panic is a finding. Seeds:
//! fuzz/seeds/view_builder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    appliance_fuzz::view_builder::run(data);
});
