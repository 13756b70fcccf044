//! Fuzzing harnesses for the redirect engine (`redirect`), shared by the targets in
//! `fuzz_targets/`: each module decodes fuzzer bytes into a case (see [`codec`]), runs the
//! functions under test on the hostile memory images it describes (see [`image`]) and
//! asserts the crate's promises; any panic is a finding. Each also lists small valid
//! cases, which are the seed corpora in `seeds/<target>/` (kept current by the tests
//! here: `cargo test` in this directory; `UPDATE_SEEDS=1` rewrites them).

pub mod codec;
pub mod image;
pub mod module_walk;
pub mod shadow_install;
pub mod store_belief;
pub mod view_builder;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use crate::codec::Codec;

    /// Checks (or, with UPDATE_SEEDS=1, writes) `seeds/<target>/<name>` for each case,
    /// after checking it round-trips through the codec.
    fn seeds_are_current<C: Codec + PartialEq + std::fmt::Debug>(
        target: &str,
        cases: &[(&str, C)],
    ) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target);
        let update = std::env::var_os("UPDATE_SEEDS").is_some();
        if update {
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
        }
        for (name, case) in cases {
            let bytes = case.encode();
            assert_eq!(
                &C::decode(&bytes),
                case,
                "{target}/{name} does not round-trip"
            );
            let path = dir.join(name);
            if update {
                fs::write(&path, &bytes).unwrap();
            }
            let have = fs::read(&path).unwrap_or_default();
            assert!(
                have == bytes,
                "{} is missing or stale (UPDATE_SEEDS=1 cargo test rewrites it)",
                path.display()
            );
        }
        let files = fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(files, cases.len(), "stray files in {}", dir.display());
    }

    #[test]
    fn view_builder_seeds_build_views() {
        use crate::view_builder::Outcome;
        use redirect::view::ViewError;

        let cases = crate::view_builder::seeds();
        for (name, case) in &cases {
            let out = crate::view_builder::check(case);
            match *name {
                // The pool runs out first: NoStubSlot is out of reach.
                "buffers-in-every-user-slot" => assert!(
                    matches!(out, Outcome::Built(Err(ViewError::PoolExhausted(_)))),
                    "{name}: {out:?}"
                ),
                "one-page-past-the-bounce-area" => assert!(
                    matches!(
                        out,
                        Outcome::Built(Err(ViewError::BounceOutOfRange { va, offset }))
                            if va == 0x1000 + redirect::bounce::BOUNCE_SIZE
                                && offset == redirect::bounce::BOUNCE_SIZE
                    ),
                    "{name}: {out:?}"
                ),
                "a-module-over-the-text" => assert!(
                    matches!(out, Outcome::Built(Err(ViewError::ModuleOutsideArea))),
                    "{name}: {out:?}"
                ),
                _ => {
                    let view = out
                        .view()
                        .unwrap_or_else(|| panic!("seed {name} builds no view: {out:?}"));
                    let (mappings, stub_slot) = match *name {
                        "no-buffers" => (0, 1),
                        "shared-straddling-and-top-buffers" => (15, 6),
                        _ => (2, 1),
                    };
                    assert_eq!(view.user_mappings, mappings, "{name}");
                    assert_eq!(view.stub_va, stub_slot << 39, "{name}");
                }
            }
        }
        seeds_are_current("view_builder", &cases);
        // Every input decodes to some case and runs.
        for data in [&[][..], &[0xff; 64], b"garbage"] {
            crate::view_builder::run(data);
        }
    }

    #[test]
    fn module_walk_seeds_find_modules() {
        let cases = crate::module_walk::seeds();
        for (name, case) in &cases {
            let out = crate::module_walk::check(case);
            match *name {
                "two-modules" => {
                    assert_eq!(out.module_at.as_deref(), Some("dummy"));
                    assert_eq!(
                        out.module_text,
                        Some((0xffff_ffff_c000_0000, 0xffff_ffff_c000_1800))
                    );
                    assert!(out.report.contains("(in module dummy)"), "{}", out.report);
                }
                "die-with-window-regs" => {
                    assert!(out.report.contains("invalid opcode"), "{}", out.report);
                    assert!(out.report.contains("(in module evil?)"), "{}", out.report);
                    assert_eq!(
                        out.module_text,
                        Some((0xffff_ffff_c001_0000, 0xffff_ffff_c001_0800))
                    );
                }
                // The address is in "dummy", before the list goes wrong.
                "points-nowhere" => assert_eq!(out.module_at.as_deref(), Some("dummy")),
                _ => assert_eq!(out.module_at, None, "{name}"),
            }
        }
        seeds_are_current("module_walk", &cases);
        crate::module_walk::run(&[0xff; 300]);
    }

    #[test]
    fn shadow_install_seeds_install() {
        let cases = crate::shadow_install::seeds();
        for (name, case) in &cases {
            let out = crate::shadow_install::check(case);
            let install = out.install.expect("the seed's block is accepted");
            match *name {
                "install" | "block-over-init-task" | "wild-layout" => {
                    assert_eq!(install, Ok(()), "{name}")
                }
                _ => assert!(install.is_err(), "{name}"),
            }
        }
        seeds_are_current("shadow_install", &cases);
        crate::shadow_install::run(&[0xff; 300]);
    }

    #[test]
    fn store_belief_seeds_believe_the_sites() {
        let cases = crate::store_belief::seeds();
        assert_eq!(crate::store_belief::check(&cases[0].1), 5);
        seeds_are_current("store_belief", &cases);
        crate::store_belief::run(&[0xff; 300]);
    }
}
