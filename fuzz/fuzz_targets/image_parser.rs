//! Fuzz the sealed-image parser and verifier with arbitrary bytes.
//!
//! The input is verified as is against a fixed trusted key; if its first byte is odd,
//! the rest is also re-signed with that key and verified, so the fuzzer reaches the
//! manifest, layout and digest checks behind the signature. Any panic (including a
//! broken invariant of an accepted image, see `appliance::testing::check_invariants`)
//! is a finding. Seeds: fuzz/seeds/image_parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    appliance::testing::fuzz_one(data);
});
