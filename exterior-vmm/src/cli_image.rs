//! `exterior-vmm keygen | seal | inspect`, and the verification step of
//! `run --image`: CLI glue for sealed appliance images (appliance/FORMAT.md,
//! DESIGN.md section 7).

use std::path::{Path, PathBuf};

use appliance::{ImageError, KeyError, Manifest, SealError, VerifiedImage, VmConfig};
use argh::FromArgs;

use vmm::config::{self, ConfigError, ConsoleTarget};

/// Errors of the image subcommands; the caller prints them to stderr and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum ImageCliError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Input {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// guest memory: MiB, or with a unit (512M, 1G); default 512M
    #[argh(option, default = "String::from(\"512M\")")]
    pub mem: String,
    /// number of vCPUs (default 1)
    #[argh(option, default = "1")]
    pub cpus: u32,
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
        // The same checks `run` applies, so a sealed image is one `run --image` accepts.
        let mem_mib = config::check_mem_mib(config::parse_mem_mib(&self.mem)?)?;
        let cpus = config::check_cpus(self.cpus)?;
        if let Some(initrd) = &self.initrd {
            let size = std::fs::metadata(initrd)
                .map_err(|source| ImageCliError::Input {
                    path: initrd.clone(),
                    source,
                })?
                .len();
            config::check_initrd_size(initrd, size, mem_mib)?;
        }
        let config = VmConfig {
            mem_mib,
            cpus,
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

/// `run --image IMG --trust PUB…` in one call: verify the image (nothing is read
/// from it again) and build the VM configuration that boots exactly the verified
/// kernel and initrd, with the image's memory, vCPUs and command line (appended to
/// [`config::DEFAULT_CMDLINE`] as `--append` is). The bool is the image's `svm` flag.
pub fn run_config_from_image(
    image: &Path,
    trust: &[PathBuf],
    console: ConsoleTarget,
) -> Result<(config::VmConfig, bool), ImageCliError> {
    let v = open_image_for_run(image, trust)?;
    let c = v.manifest.config;
    let mem_mib = config::check_mem_mib(c.mem_mib)?;
    let cpus = config::check_cpus(u32::from(c.cpus))?;
    let kernel_size = v.kernel.len() as u64;
    if kernel_size > config::MAX_KERNEL_BYTES {
        return Err(ConfigError::KernelTooLarge {
            path: image.to_path_buf(),
            size: kernel_size,
        }
        .into());
    }
    if let Some(initrd) = &v.initrd {
        config::check_initrd_size(image, initrd.len() as u64, mem_mib)?;
    }
    let vm = config::VmConfig {
        mem_mib,
        cpus,
        cmdline: config::build_cmdline(Some(&c.cmdline)),
        kernel: v.kernel,
        kernel_path: image.to_path_buf(),
        initrd: v.initrd,
        console,
        disks: Vec::new(),
        nets: Vec::new(),
    };
    Ok((vm, c.svm))
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
            (s.mem.as_str(), s.cpus, s.append.as_str(), s.svm),
            ("512M", 1, "", false)
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
        let (vm, svm) =
            run_config_from_image(&p("app.img"), &[p("key.pub")], ConsoleTarget::Stdout).unwrap();
        assert!(svm);
        assert_eq!((vm.mem_mib, vm.cpus), (512, 1));
        assert_eq!(vm.kernel, b"kernel bytes");
        assert_eq!(
            vm.cmdline,
            format!(
                "{} exterior_run=\"echo sealed-hello\"",
                config::DEFAULT_CMDLINE
            )
        );
        // A flipped byte in the kernel part: refused, naming the digest mismatch.
        let mut bytes = std::fs::read(p("app.img")).unwrap();
        let last = bytes.len() - b"initrd bytes".len() - 1;
        bytes[last] ^= 1;
        std::fs::write(p("bad.img"), &bytes).unwrap();
        let e = run_config_from_image(&p("bad.img"), &[p("key.pub")], ConsoleTarget::Stdout)
            .unwrap_err()
            .to_string();
        assert!(e.contains("digest mismatch in kernel part"), "{e}");
        // seal applies run's own limits.
        let seal_with = |mem: &str, cpus: u32| SealCmd {
            kernel: p("vmlinux"),
            initrd: Some(p("gvm.cpio")),
            append: String::new(),
            mem: mem.into(),
            cpus,
            svm: false,
            key: p("key"),
            output: p("refused.img"),
        };
        for (mem, cpus) in [
            ("32M", 1),
            ("1T", 1),
            ("12X", 1),
            ("512M", 0),
            ("512M", 300),
        ] {
            assert!(matches!(
                seal_with(mem, cpus).run(),
                Err(ImageCliError::Config(_))
            ));
        }
        assert!(!p("refused.img").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
