//! Fuzz target `module_walk`: see `appliance_fuzz::module_walk` (fuzz/src/module_walk.rs) for what the input
//! describes and which promises are checked. Any panic is a finding. Seeds:
//! fuzz/seeds/module_walk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    appliance_fuzz::module_walk::run(data);
});
