//! The runtime directory: where instances publish their control sockets, hold their name
//! locks and keep console logs. Owner-only (0700), checked on every use.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Failures around the runtime directory and the instances in it.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The instance name cannot be used in file names (the name given).
    #[error("instance name {0:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.' or '-'")]
    BadName(String),
    /// A file in the runtime directory (or the directory) could not be used.
    #[error("runtime directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The directory is not owned by this user with mode 0700 (the directory).
    #[error("runtime directory {0} is not private: it must be owned by this user with mode 0700")]
    NotPrivate(PathBuf),
    /// Another live process holds the instance's lock.
    #[error("an instance named {name} is already running (pid {pid})")]
    AlreadyRunning {
        /// The instance name.
        name: String,
        /// The pid recorded in its lock file, as read.
        pid: String,
    },
    /// No live instance has this name.
    #[error("no running instance named {0} (see `exterior-vmm list`)")]
    NotRunning(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks an instance name: it becomes part of file names.
pub fn validate_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::BadName(name.to_string()))
    }
}

/// An opened runtime directory, checked to be private; names its per-instance files.
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// `$EXTERIOR_RUNTIME_DIR`, else `/run/exterior-vmm` for root, else
    /// `$XDG_RUNTIME_DIR/exterior-vmm`, else `/tmp/exterior-vmm-UID`.
    pub fn default_path() -> PathBuf {
        if let Some(dir) = std::env::var_os("EXTERIOR_RUNTIME_DIR") {
            return PathBuf::from(dir);
        }
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid == 0 {
            return PathBuf::from("/run/exterior-vmm");
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) => PathBuf::from(dir).join("exterior-vmm"),
            None => PathBuf::from(format!("/tmp/exterior-vmm-{uid}")),
        }
    }

    /// Opens (creating if needed) the directory and checks it is private.
    pub fn open(path: PathBuf) -> Result<Self, RuntimeError> {
        match fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&path)
        {
            Ok(()) => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
            return Err(RuntimeError::NotPrivate(path));
        }
        Ok(Self { path })
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// An instance's control socket.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.sock"))
    }

    pub(crate) fn lock_path(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.lock"))
    }

    /// Console or VMM log of an instance: `kind` is "gvm", "svm" or "vmm".
    pub fn log(&self, name: &str, kind: &str) -> PathBuf {
        self.path.join(format!("{name}.{kind}.log"))
    }

    /// Binds the instance's control socket (owner-only), replacing a dead one's.
    pub(crate) fn bind(&self, name: &str) -> Result<UnixListener, RuntimeError> {
        let path = self.socket(name);
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
        Ok(listener)
    }

    /// The pid recorded in an instance's lock file.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let mut text = String::new();
        File::open(self.lock_path(name))
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        text.trim().parse().ok()
    }

    /// Whether an instance holds its lock (is alive).
    pub fn is_live(&self, name: &str) -> bool {
        let Ok(file) = File::open(self.lock_path(name)) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; LOCK_NB never blocks.
        let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        !free
    }

    /// Names of instances with files here; removes the leftovers of dead ones.
    pub fn instances(&self) -> Result<Vec<String>, RuntimeError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            let Some(name) = file.strip_suffix(".lock") else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            if self.is_live(name) {
                names.push(name.to_string());
            } else {
                self.remove_leftovers(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes the socket and lock of a dead instance (its logs stay for post-mortems and
    /// are truncated by the next instance of that name).
    pub fn remove_leftovers(&self, name: &str) {
        let _ = fs::remove_file(self.socket(name));
        let _ = fs::remove_file(self.lock_path(name));
    }
}

/// Held for an instance's lifetime: an exclusive flock on `NAME.lock`, which holds the pid.
/// The kernel drops the lock when the process dies, however it dies, so a SIGKILLed
/// instance's name is free again at once.
pub(crate) struct InstanceLock {
    file: File,
    socket: PathBuf,
    lock: PathBuf,
}

impl InstanceLock {
    pub fn acquire(dir: &RuntimeDir, name: &str) -> Result<Self, RuntimeError> {
        validate_name(name)?;
        let lock = dir.lock_path(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock)
            .map_err(io_err(&lock))?;
        // SAFETY: flock on a descriptor we own; LOCK_NB never blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = dir
                .pid(name)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into());
            return Err(RuntimeError::AlreadyRunning {
                name: name.to_string(),
                pid,
            });
        }
        file.set_len(0).map_err(io_err(&lock))?;
        write!(file, "{}", std::process::id()).map_err(io_err(&lock))?;
        Ok(Self {
            file,
            socket: dir.socket(name),
            lock,
        })
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.lock);
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_runtime(tag: &str) -> RuntimeDir {
        let path = std::env::temp_dir().join(format!("exterior-rt-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        RuntimeDir::open(path).unwrap()
    }

    #[test]
    fn names_are_checked() {
        for good in ["gvm", "web-1", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "with space", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_directory_must_be_private() {
        let rt = temp_runtime("private");
        fs::set_permissions(rt.path(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            RuntimeDir::open(rt.path().to_path_buf()),
            Err(RuntimeError::NotPrivate(_))
        ));
    }

    #[test]
    fn a_name_is_locked_once_and_freed_on_drop() {
        let rt = temp_runtime("lock");
        let lock = InstanceLock::acquire(&rt, "one").unwrap();
        assert!(rt.is_live("one"));
        assert_eq!(rt.pid("one"), Some(std::process::id() as i32));
        assert!(matches!(
            InstanceLock::acquire(&rt, "one"),
            Err(RuntimeError::AlreadyRunning { .. })
        ));
        assert_eq!(rt.instances().unwrap(), vec!["one".to_string()]);
        drop(lock);
        assert!(!rt.is_live("one"));
        assert!(rt.instances().unwrap().is_empty());
    }

    #[test]
    fn dead_leftovers_are_cleaned() {
        let rt = temp_runtime("dead");
        fs::write(rt.lock_path("ghost"), "12345").unwrap();
        fs::write(rt.socket("ghost"), "").unwrap();
        assert!(rt.instances().unwrap().is_empty());
        assert!(!rt.lock_path("ghost").exists());
        assert!(!rt.socket("ghost").exists());
    }
}
