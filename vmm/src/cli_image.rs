//! `exterior-vmm keygen | seal | inspect`, and the verification step of
//! `run --image`: CLI glue for sealed appliance images (appliance/FORMAT.md,
//! DESIGN.md section 7).

use std::path::{Path, PathBuf};

use appliance::{ImageError, KeyError, Manifest, SealError, VerifiedImage, VmConfig};
use argh::FromArgs;

/// Errors of the image subcommands; the caller prints them to stderr and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ImageCliError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("cannot inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("image {path}: signature NOT verified: {source}")]
    NotVerified {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("refusing image {path}: {source}")]
    Refused {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
}

/// Generate an ed25519 key pair for signing sealed images.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "keygen")]
pub struct KeygenCmd {
    /// secret key file to create (mode 0600); the public key goes to the same path
    /// plus ".pub". Existing files are never overwritten.
    #[argh(option, short = 'o')]
    pub output: PathBuf,
}

impl KeygenCmd {
    pub fn run(self) -> Result<(), ImageCliError> {
        let g = appliance::keygen(&self.output)?;
        println!("secret key:  {} (mode 0600)", g.secret_path.display());
        println!("public key:  {}", g.public_path.display());
        println!("fingerprint: {}", appliance::fingerprint(&g.public));
        Ok(())
    }
}

/// Seal a kernel, an initrd and a VM configuration into one signed image.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "seal")]
pub struct SealCmd {
    /// kernel image (vmlinux or bzImage)
    #[argh(option)]
    pub kernel: PathBuf,
    /// initrd (e.g. a cpio archive)
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// extra kernel command line, appended to the VMM's base command line
    #[argh(option, default = "String::new()")]
    pub append: String,
    /// guest memory in MiB (default 512)
    #[argh(option, default = "512")]
    pub mem: u64,
    /// number of vCPUs (default 1)
    #[argh(option, default = "1")]
    pub cpus: u8,
    /// also boot the SVM when the image is run
    #[argh(switch)]
    pub svm: bool,
    /// secret key file to sign with (from `exterior-vmm keygen`)
    #[argh(option)]
    pub key: PathBuf,
    /// image file to write (replaced atomically; nothing is written on error)
    #[argh(option, short = 'o')]
    pub output: PathBuf,
}

impl SealCmd {
    pub fn run(self) -> Result<(), ImageCliError> {
        let config = VmConfig {
            mem_mib: self.mem,
            cpus: self.cpus,
            cmdline: self.append,
            svm: self.svm,
        };
        let r = appliance::seal(
            &self.kernel,
            self.initrd.as_deref(),
            config,
            &self.key,
            &self.output,
        )?;
        println!("sealed {} ({} bytes)", r.path.display(), r.size);
        print_manifest(&r.manifest);
        println!(
            "signature: valid (key {})",
            appliance::fingerprint(&r.signer)
        );
        Ok(())
    }
}

/// Print an image's manifest and check its signature against trusted keys.
/// Exits non-zero unless the signature and every digest verify.
#[derive(FromArgs, Debug, PartialEq)]
#[argh(subcommand, name = "inspect")]
pub struct InspectCmd {
    /// the sealed image
    #[argh(positional)]
    pub image: PathBuf,
    /// trusted public key file (KEY.pub); may be repeated
    #[argh(option)]
    pub trust: Vec<PathBuf>,
}

impl InspectCmd {
    pub fn run(self) -> Result<(), ImageCliError> {
        let path = self.image;
        let i =
            appliance::inspect(&path, &self.trust).map_err(|source| ImageCliError::Inspect {
                path: path.clone(),
                source,
            })?;
        println!("image: {} ({} bytes)", path.display(), i.file_len);
        match &i.manifest {
            Ok(m) => {
                if i.verdict.is_err() {
                    println!("manifest: UNVERIFIED, shown as found in the file");
                }
                print_manifest(m);
            }
            Err(e) => println!("manifest: unreadable: {e}"),
        }
        match i.verdict {
            Ok(key) => {
                println!("signature: valid (key {})", appliance::fingerprint(&key));
                Ok(())
            }
            Err(source) => {
                println!("signature: NOT verified: {source}");
                Err(ImageCliError::NotVerified { path, source })
            }
        }
    }
}

/// Print a manifest readably. Strings are escaped: an unverified manifest is hostile.
pub fn print_manifest(m: &Manifest) {
    let c = &m.config;
    println!("format version: {}", m.format_version);
    println!(
        "created: {} (unix {})",
        appliance::format_unix_utc(m.created_unix),
        m.created_unix
    );
    println!(
        "signer (named by manifest): {}",
        m.signer_fingerprint()
            .unwrap_or_else(|| "(not a valid key)".into())
    );
    println!("memory: {} MiB", c.mem_mib);
    println!("cpus: {}", c.cpus);
    println!("svm: {}", if c.svm { "yes" } else { "no" });
    println!("cmdline: {:?}", c.cmdline);
    for p in &m.parts {
        println!(
            "part {}: offset {}, size {}, sha256 {}",
            p.name,
            p.offset,
            p.size,
            p.sha256_hex()
        );
    }
}

/// The verification step of `run --image IMG --trust PUB…`: reads the image once and
/// verifies signature, manifest and every digest. Call it before creating the VM; boot
/// exactly `kernel` / `initrd` of the result with `config()` (and the SVM if
/// `config().svm`). Reports success on stderr so stdout stays the guest console.
pub fn open_image_for_run(image: &Path, trust: &[PathBuf]) -> Result<VerifiedImage, ImageCliError> {
    let v = appliance::open_verified(image, trust).map_err(|source| ImageCliError::Refused {
        path: image.to_path_buf(),
        source,
    })?;
    eprintln!(
        "image {}: signature valid (key {}), {} part digest(s) verified",
        image.display(),
        v.signer_fingerprint(),
        v.manifest.parts.len()
    );
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A top-level command as `main` has it, to parse through argh.
    #[derive(FromArgs, Debug, PartialEq)]
    /// test
    struct Top {
        #[argh(subcommand)]
        cmd: Sub,
    }

    #[derive(FromArgs, Debug, PartialEq)]
    #[argh(subcommand)]
    enum Sub {
        Keygen(KeygenCmd),
        Seal(SealCmd),
        Inspect(InspectCmd),
    }

    fn parse(args: &[&str]) -> Sub {
        Top::from_args(&["exterior-vmm"], args).unwrap().cmd
    }

    #[test]
    fn seal_defaults() {
        let Sub::Seal(s) = parse(&["seal", "--kernel", "k", "--key", "key", "-o", "out"]) else {
            panic!("not seal");
        };
        assert_eq!(
            (s.mem, s.cpus, s.append.as_str(), s.svm),
            (512, 1, "", false)
        );
        assert_eq!(s.initrd, None);
    }

    #[test]
    fn inspect_takes_several_trusted_keys() {
        let Sub::Inspect(i) = parse(&["inspect", "img", "--trust", "a.pub", "--trust", "b.pub"])
        else {
            panic!("not inspect");
        };
        assert_eq!(i.trust, [PathBuf::from("a.pub"), PathBuf::from("b.pub")]);
    }

    #[test]
    fn keygen_seal_inspect_run() {
        let dir = std::env::temp_dir().join(format!("cli-image-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n);
        std::fs::write(p("vmlinux"), b"kernel bytes").unwrap();
        std::fs::write(p("gvm.cpio"), b"initrd bytes").unwrap();
        KeygenCmd { output: p("key") }.run().unwrap();
        KeygenCmd { output: p("other") }.run().unwrap();
        assert!(KeygenCmd { output: p("key") }.run().is_err());
        let Sub::Seal(s) = parse(&[
            "seal",
            "--kernel",
            p("vmlinux").to_str().unwrap(),
            "--initrd",
            p("gvm.cpio").to_str().unwrap(),
            "--append",
            "exterior_run=\"echo sealed-hello\"",
            "--svm",
            "--key",
            p("key").to_str().unwrap(),
            "-o",
            p("app.img").to_str().unwrap(),
        ]) else {
            panic!("not seal");
        };
        s.run().unwrap();
        let inspect = |trust: Vec<PathBuf>| {
            InspectCmd {
                image: p("app.img"),
                trust,
            }
            .run()
        };
        inspect(vec![p("key.pub")]).unwrap();
        assert!(matches!(
            inspect(vec![]),
            Err(ImageCliError::NotVerified { .. })
        ));
        assert!(matches!(
            inspect(vec![p("other.pub")]),
            Err(ImageCliError::NotVerified {
                source: ImageError::UnknownKey { .. },
                ..
            })
        ));
        let v = open_image_for_run(&p("app.img"), &[p("other.pub"), p("key.pub")]).unwrap();
        assert_eq!(v.kernel, b"kernel bytes");
        assert_eq!(v.initrd.as_deref(), Some(&b"initrd bytes"[..]));
        assert!(v.config().svm);
        assert_eq!(v.config().cmdline, "exterior_run=\"echo sealed-hello\"");
        let e = open_image_for_run(&p("app.img"), &[p("other.pub")]).unwrap_err();
        assert!(e.to_string().contains("not among the 1 trusted key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
