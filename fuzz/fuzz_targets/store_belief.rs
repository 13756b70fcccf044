//! Fuzz target `store_belief`: see `appliance_fuzz::store_belief` (fuzz/src/store_belief.rs) for what the input
//! describes and which promises are checked. Any panic is a finding. Seeds:
//! fuzz/seeds/store_belief.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    appliance_fuzz::store_belief::run(data);
});
