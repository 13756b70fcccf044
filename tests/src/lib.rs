//! End-to-end test suite for exterior-vmm. The tests live in `tests/e2e/`; they need a real
//! KVM and are run by `tools/test` through `tools/kvm-run`.
