//! The module-text reader against every module of the pinned kernel package
//! (`images/modules`, made by `guest-kernel/fetch`; tools/test runs it first). When the
//! tree is missing this test fails, telling how to get it: it must never pass by not
//! running. The check of a loaded copy against its twin is proven end to end (e2e
//! `recovery` and `hostile`); here every file of the package must be read without error,
//! with its relocation sites inside its text.

use std::path::{Path, PathBuf};

use redirect::module_text::KoText;

fn modules_dir() -> PathBuf {
    match std::env::var_os("EXTERIOR_REPO") {
        Some(repo) => PathBuf::from(repo).join("images/modules"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/modules"),
    }
}

fn kos(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}\nrun tools/setup (guest-kernel/fetch makes images/modules; \
             tools/test runs it first)",
            dir.display()
        )
    });
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            kos(&path, out);
        } else if path.extension().is_some_and(|e| e == "ko") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_of_the_pinned_package_is_read() {
    let mut files = Vec::new();
    kos(&modules_dir().join("kernel"), &mut files);
    assert!(files.len() > 1000, "only {} modules", files.len());
    let mut with_jump_labels = 0;
    for path in &files {
        let bytes = std::fs::read(path).expect("a module file");
        let ko = KoText::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(ko.text_size.is_multiple_of(0x1000), "{}", path.display());
        for site in &ko.sites {
            assert!(
                site.offset + site.kind.width() <= ko.text_size,
                "{}: {site:?}",
                path.display()
            );
        }
        with_jump_labels += usize::from(!ko.jump_labels.is_empty());
    }
    // The network drivers the SVM loads have static keys (virtio_net: 65 jump labels).
    assert!(
        with_jump_labels > 100,
        "{with_jump_labels} modules with jump labels"
    );
}
