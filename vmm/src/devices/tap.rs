//! A Linux tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`): Ethernet
//! frames in and out, each behind a 12-byte virtio-net header (the virtio 1.x layout), so
//! frames pass between the tap and a virtio-net queue unchanged. Non-blocking.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::ioctl_iow_nr;

/// The virtio-net header in front of every frame (virtio 1.x: with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const TUNTAP: u32 = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);

/// Why a tap could not be opened.
#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap {0:?}: a name of 1 to 15 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("tap {name}: cannot open /dev/net/tun: {source} (is the tun module loaded?)")]
    OpenTun {
        name: String,
        source: std::io::Error,
    },
    #[error("tap {name}: cannot attach: {source} (it needs CAP_NET_ADMIN, or a tap owned by this user that no other process holds)")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("tap {name}: cannot set the virtio-net header size: {source}")]
    VnetHdr {
        name: String,
        source: std::io::Error,
    },
}

/// An attached tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Tap {
    /// Attaches to the tap `name`, creating it (not persistent) if it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        // SAFETY: `ifreq` is plain data; all-zero is a valid empty request.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is, and the fd is the
        // tun control device opened above; the name is NUL-terminated (15 bytes at most in
        // a 16-byte zeroed array).
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `hdr_len` is.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if rc < 0 {
            return Err(TapError::VnetHdr {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Where a virtio-net device's frames go and come from (a tap; a fake in tests). Frames
/// carry the virtio-net header.
pub trait FramePort: Send {
    /// One frame into `buf`; `WouldBlock` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

impl FramePort for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // A tap takes a frame whole or not at all.
        self.file.write(frame).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked_before_anything_is_opened() {
        for bad in ["", "sixteen-chars-xx", "a b", "tap/0", "tap\n"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(valid_name("extap0") && valid_name("br-1.2_x"));
    }
}
