//! Fuzz target `shadow_install`: see `appliance_fuzz::shadow_install` (fuzz/src/shadow_install.rs) for what the input
//! describes and which promises are checked. Any panic is a finding. Seeds:
//! fuzz/seeds/shadow_install.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    appliance_fuzz::shadow_install::run(data);
});
