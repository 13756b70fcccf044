//! virtio-blk on a raw image file or a host block device (virtio 1.2, section 5.2): reads,
//! writes, flush, GET_ID.
//!
//! Requests are served on a thread of their own (`blk-io`, behind its own seccomp filter),
//! woken by an ioeventfd on the queue's notify register, so a vCPU never waits for the
//! disk: it writes the register and KVM signals the eventfd without leaving the kernel.
//! Data moves between the file and guest memory in one `preadv`/`pwritev` per request, on
//! iovecs that point into guest memory (no bounce buffer; a 1 MiB request was 256 calls
//! of 4 KiB, each through the seccomp filter, when it went segment by segment). Writes go
//! to the host page cache, so what the guest wrote survives the VMM being killed; a FLUSH
//! is `fdatasync`, so what the guest flushed survives the host too. With `--disk
//! PATH,direct` (as QEMU's `cache=none`, Cloud Hypervisor's `direct=on`) requests whose
//! buffers and offset are aligned as the disk needs (its logical block size, or what the
//! file system says; a sector at least) bypass the host page cache (`O_DIRECT`); the
//! others, rare (Linux aligns its I/O to its blocks), go through it, and the kernel keeps
//! the two coherent.
//!
//! Every descriptor is hostile: lengths are summed with overflow checks, sector ranges are
//! checked against the image before any I/O, addresses reach memory only through checked
//! accessors, and a chain the device cannot answer is returned with nothing written.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{give_up, Interrupt, VirtioDevice};
use crate::sync::lock;
use crate::vstate::dma_gate::DmaGate;

pub const SECTOR: u64 = 512;
/// Entries in the one request queue. Linux sizes its requests to the queue: with
/// [`SEG_MAX`] data segments plus header and status, a request fits one chain.
pub const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const HEADER_LEN: u64 = 16;
/// Chains served before the worker lets go of the queue (so a reset is never starved by a
/// driver that keeps the ring full); it then wakes itself for the rest.
const BATCH: usize = QUEUE_SIZE as usize;

/// Why a `--disk` image cannot be used.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path}: not a regular file or a block device (raw images only)")]
    NotAFile { path: PathBuf },
    #[error("disk {path}: empty image")]
    Empty { path: PathBuf },
    #[error(
        "disk {path}: {size} bytes is not a whole number of {SECTOR}-byte sectors (raw images are)"
    )]
    PartialSector { path: PathBuf, size: u64 },
    #[error("disk {path}: in use by another process (it holds the image's lock); a disk may be written by one VM only")]
    Locked { path: PathBuf },
    #[error("disk {path}: cannot lock the image: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {path}: direct I/O (,direct) is not possible here: {source}")]
    Direct {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A raw disk image, opened and locked (exclusively when writable, shared when read-only).
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    /// The same file opened `O_DIRECT` (`--disk PATH,direct`), for aligned requests.
    direct: Option<Direct>,
    sectors: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

impl DiskImage {
    /// Opens `path` for the guest's disk number `index` (which names it in GET_ID), with
    /// an `O_DIRECT` descriptor beside the buffered one when `direct`.
    pub fn open(
        path: &Path,
        read_only: bool,
        direct: bool,
        index: usize,
    ) -> Result<Self, DiskError> {
        let path_buf = || path.to_path_buf();
        // O_NONBLOCK: a FIFO given as a disk must not block the open (it is refused below
        // as not a regular file); on a regular file or a block device it changes nothing.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path_buf(),
            source,
        })?;
        let size = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            // A block device's inode has no length; its end does.
            (&file)
                .seek(SeekFrom::End(0))
                .map_err(|source| DiskError::Open {
                    path: path_buf(),
                    source,
                })?
        } else {
            return Err(DiskError::NotAFile { path: path_buf() });
        };
        if size == 0 {
            return Err(DiskError::Empty { path: path_buf() });
        }
        if !size.is_multiple_of(SECTOR) {
            return Err(DiskError::PartialSector {
                path: path_buf(),
                size,
            });
        }
        let locked = if read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DiskError::Locked { path: path_buf() })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(DiskError::Lock {
                    path: path_buf(),
                    source,
                })
            }
        }
        // Opened after the lock, which the buffered descriptor holds for both, through
        // that descriptor (not the path, which may name another file by now).
        let direct = if direct {
            let opened = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_NONBLOCK | libc::O_DIRECT)
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(|source| DiskError::Direct {
                    path: path_buf(),
                    source,
                })?;
            let align = direct_alignment(&opened, !meta.is_file());
            Some(Direct {
                file: opened,
                align,
                served: 0,
            })
        } else {
            None
        };
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = format!("exterior-disk{index}");
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Self {
            file,
            direct,
            sectors: size / SECTOR,
            read_only,
            id,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// A guest buffer: one descriptor's address and length.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// The buffers of one request, split the way virtio-blk lays them out: device-readable
/// (header, then data for a write) before device-writable (data for a read, then the
/// status byte, which is the chain's last writable byte).
struct Request {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    status: GuestAddress,
}

/// Why a chain is malformed beyond answering (there is nowhere safe to put a status).
#[derive(Debug, PartialEq, Eq)]
enum Malformed {
    WritableBeforeReadable,
    NoStatusByte,
    /// A buffer that runs past the end of the address space.
    AddressOverflow,
    /// More descriptors than any request needs ([`MAX_CHAIN`]); an indirect table may
    /// hold 65535, and a chain is walked before it is served.
    TooLong,
}

/// The most descriptors a request can use: [`SEG_MAX`] data segments, header and status.
const MAX_CHAIN: usize = SEG_MAX as usize + 2;

impl Request {
    fn parse(descriptors: impl Iterator<Item = Descriptor>) -> Result<Self, Malformed> {
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        for (n, d) in descriptors.enumerate() {
            if n >= MAX_CHAIN {
                return Err(Malformed::TooLong);
            }
            let seg = Segment {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            // Checked once here, so `addr + k` for any `k <= len` cannot overflow later.
            if seg.addr.0.checked_add(seg.len).is_none() {
                return Err(Malformed::AddressOverflow);
            }
            if d.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                return Err(Malformed::WritableBeforeReadable);
            }
        }
        let Some(last) = writable.last_mut().filter(|l| l.len > 0) else {
            return Err(Malformed::NoStatusByte);
        };
        last.len -= 1;
        let status = last.addr.unchecked_add(last.len);
        if last.len == 0 {
            writable.pop();
        }
        Ok(Request {
            readable,
            writable,
            status,
        })
    }
}

/// Takes `n` bytes off the front of `segs` (fewer if they hold fewer).
fn take_front(segs: &mut Vec<Segment>, mut n: u64) -> Vec<Segment> {
    let mut taken = Vec::new();
    let mut whole = 0;
    for seg in segs.iter_mut() {
        if n == 0 {
            break;
        }
        let k = seg.len.min(n);
        taken.push(Segment {
            addr: seg.addr,
            len: k,
        });
        // `parse` checked that `addr + len` does not overflow, and `k <= len`.
        seg.addr = seg.addr.unchecked_add(k);
        seg.len -= k;
        n -= k;
        if seg.len == 0 {
            whole += 1;
        }
    }
    segs.drain(..whole);
    taken
}

fn total_len(segs: &[Segment]) -> Option<u64> {
    segs.iter().try_fold(0u64, |sum, s| sum.checked_add(s.len))
}

impl DiskImage {
    /// The byte offset of `sector` if `len` bytes from there lie inside the image.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(len)?;
        (end <= self.sectors * SECTOR).then_some(offset)
    }

    /// Serves one request; returns the bytes written into the chain's writable buffers
    /// (the used length), or `None` for a chain with nowhere to put a status.
    fn execute<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        descriptors: impl Iterator<Item = Descriptor>,
    ) -> Option<u32> {
        let mut request = match Request::parse(descriptors) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("virtio-blk: malformed chain: {e:?}");
                return None;
            }
        };
        let (status, written) = self.serve(mem, &mut request);
        // A status the guest cannot receive (a bad address) is its own loss.
        let _ = mem.write_obj(status as u8, request.status);
        Some(u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX))
    }

    /// Does the work of one request: (virtio status, data bytes written to the guest).
    fn serve<M: GuestMemoryBackend>(&mut self, mem: &M, request: &mut Request) -> (u32, u64) {
        let header = take_front(&mut request.readable, HEADER_LEN);
        let mut bytes = [0u8; HEADER_LEN as usize];
        let mut at = 0usize;
        for seg in &header {
            let len = seg.len as usize; // at most HEADER_LEN
            if mem.read_slice(&mut bytes[at..at + len], seg.addr).is_err() {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            at += len;
        }
        if at != HEADER_LEN as usize {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let sector = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
        match kind {
            VIRTIO_BLK_T_IN => {
                let Some(len) = total_len(&request.writable) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(offset) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.transfer(mem, offset, &request.writable, Direction::Read) {
                    Ok(()) => (VIRTIO_BLK_S_OK, len),
                    Err(e) => {
                        log::debug!("virtio-blk: read at sector {sector}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(len) = total_len(&request.readable) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let Some(offset) = self.range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.transfer(mem, offset, &request.readable, Direction::Write) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        log::debug!("virtio-blk: write at sector {sector}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut written = 0u64;
                let mut rest: &[u8] = &self.id;
                for seg in take_front(&mut request.writable, self.id.len() as u64) {
                    let len = seg.len as usize; // at most the id's 20 bytes
                    if mem.write_slice(&rest[..len], seg.addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    rest = &rest[len..];
                    written += seg.len;
                }
                (VIRTIO_BLK_S_OK, written)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Moves `segs` between guest memory and the image at `offset`: whole, or an error.
    /// The descriptor is the `O_DIRECT` one when there is one and every buffer and the
    /// offset are aligned as it needs (or it refuses them, `EINVAL`: then the buffered
    /// one goes on from where it stopped).
    fn transfer<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        offset: u64,
        segs: &[Segment],
        direction: Direction,
    ) -> std::io::Result<()> {
        let mut iovecs = guest_iovecs(mem, segs)?;
        let mut done = 0usize;
        let mut at = offset;
        if let Some(direct) = self.direct.as_mut() {
            let aligned = offset.is_multiple_of(direct.align)
                && iovecs.iter().all(|iov| aligned_to(iov, direct.align));
            if aligned {
                match positioned_io(&direct.file, &mut iovecs, &mut done, &mut at, direction) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        log::debug!("virtio-blk: direct I/O refused at {at}: {e}; buffered");
                    }
                    other => {
                        direct.served = direct.served.saturating_add(1);
                        return other;
                    }
                }
            }
        }
        positioned_io(&self.file, &mut iovecs, &mut done, &mut at, direction)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the image into guest memory.
    Read,
    /// From guest memory to the image.
    Write,
}

/// The guest memory of `segs`, in order, as iovecs (a segment that crosses from one
/// memory region into the next is two). Fails if any byte is not guest memory.
fn guest_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
) -> std::io::Result<Vec<libc::iovec>> {
    let mut iovecs = Vec::with_capacity(segs.len());
    for seg in segs {
        let len = usize::try_from(seg.len).map_err(std::io::Error::other)?;
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
            let slice = slice.map_err(std::io::Error::other)?;
            // The guard is only a bitmap/xen hook: with vm-memory's `xen` feature off
            // (it is), the pointer stays valid as long as the mapping, i.e. `mem`.
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(iovecs)
}

fn aligned_to(iovec: &libc::iovec, align: u64) -> bool {
    let align = usize::try_from(align).unwrap_or(usize::MAX);
    (iovec.iov_base as usize).is_multiple_of(align) && iovec.iov_len.is_multiple_of(align)
}

/// An `O_DIRECT` descriptor and the alignment it needs of buffers, lengths and offsets.
#[derive(Debug)]
struct Direct {
    file: File,
    align: u64,
    /// Requests it served (the unit tests read it).
    served: u64,
}

/// The alignment `O_DIRECT` needs on `file`: a block device's logical block size, or what
/// `statx` reports for a file's file system; a sector where neither says (a request the
/// kernel refuses then goes buffered). Never below a sector, never above a page.
fn direct_alignment(file: &File, block_device: bool) -> u64 {
    let said = if block_device {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points at `size`.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
        (r == 0).then(|| u64::try_from(size).unwrap_or(0))
    } else {
        // SAFETY: `statx` fills the struct the pointer points at, sized for it, and reads
        // the empty, NUL-terminated path; zeroes are a valid `statx`.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the descriptor is ours and AT_EMPTY_PATH names it.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut st,
            )
        };
        (r == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0)
            .then(|| u64::from(st.stx_dio_mem_align.max(st.stx_dio_offset_align)))
    };
    said.filter(|a| a.is_power_of_two())
        .unwrap_or(SECTOR)
        .clamp(SECTOR, 4096)
}

/// `preadv`/`pwritev` of `iovecs[*done..]` at `*at` until all is moved; `*done` and `*at`
/// say how far it got (the first iovec not yet whole is trimmed to its rest). A transfer
/// that moves nothing is an error: `range` keeps requests inside the image, so it is a
/// file that shrank under us.
fn positioned_io(
    file: &File,
    iovecs: &mut [libc::iovec],
    done: &mut usize,
    at: &mut u64,
    direction: Direction,
) -> std::io::Result<()> {
    // IOV_MAX on Linux.
    const MOST_IOVECS: usize = 1024;
    loop {
        while *done < iovecs.len() && iovecs[*done].iov_len == 0 {
            *done += 1;
        }
        if *done == iovecs.len() {
            return Ok(());
        }
        let batch = &iovecs[*done..iovecs.len().min(*done + MOST_IOVECS)];
        let count = libc::c_int::try_from(batch.len()).map_err(std::io::Error::other)?;
        let offset = libc::off_t::try_from(*at).map_err(std::io::Error::other)?;
        let moved = match direction {
            // SAFETY: every iovec points into guest memory that `mem` (borrowed by the
            // caller for the whole transfer) maps, within one region, for its length
            // (`guest_iovecs` built them from vm-memory's checked slices); the kernel reads
            // or writes only those bytes. Guest memory may change under a read by the
            // guest's own hand, which is the guest's affair, as for any DMA.
            Direction::Read => unsafe {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, offset)
            },
            // SAFETY: as above; the kernel only reads the iovecs' bytes.
            Direction::Write => unsafe {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, offset)
            },
        };
        let moved = match usize::try_from(moved) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image ended inside a request",
                ))
            }
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        *at = at.saturating_add(moved as u64);
        let mut left = moved;
        while left > 0 && *done < iovecs.len() {
            let iov = &mut iovecs[*done];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                *done += 1;
            } else {
                // SAFETY: `left < iov_len`, so the new base stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left) }.cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
    }
}

/// The queue and memory while the driver has the device running.
struct Active {
    mem: GuestMemoryMmap<()>,
    queue: Queue,
    /// The driver broke the ring (an avail index more than a ring ahead, a used ring that
    /// cannot be written): nothing more is served until a reset. Logged once.
    broken: bool,
}

/// What the worker thread and the transport share.
struct Shared {
    disk: DiskImage,
    active: Option<Active>,
}

/// What one round of the worker did.
#[derive(Debug, PartialEq, Eq)]
struct Round {
    /// The driver wants an interrupt.
    notify: bool,
    /// Chains are left: serve again without waiting for a kick.
    more: bool,
}

/// Serves up to [`BATCH`] chains, or fewer if `stop` is raised (a reset is waiting). Each
/// chain, from reading the ring to returning it, is served inside the VM's DMA gate, so a
/// hold of the VM never sees guest memory change under it.
fn serve_queue(shared: &mut Shared, gate: &DmaGate, stop: &AtomicBool) -> Round {
    let Shared { disk, active } = shared;
    let Some(Active { mem, queue, broken }) = active.as_mut() else {
        return Round {
            notify: false,
            more: false,
        };
    };
    let mut used = false;
    let mut more = false;
    for served in 0..=BATCH {
        let _pass = gate.enter();
        if *broken {
            break;
        }
        // virtio-queue reports a bad avail index on every pop; one check, one log line.
        if let Err(e) = queue.iter(&*mem) {
            log::warn!(
                "virtio-blk: the driver broke its queue ({e:?}); serving nothing until a reset"
            );
            *broken = true;
            break;
        }
        if served == BATCH || stop.load(Ordering::Relaxed) {
            more = true;
            break;
        }
        let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
            break;
        };
        let head = chain.head_index();
        let len = disk.execute(&*mem, chain).unwrap_or(0);
        if let Err(e) = queue.add_used(&*mem, head, len) {
            log::warn!("virtio-blk: cannot return a request to the driver ({e:?}); serving nothing until a reset");
            *broken = true;
            break;
        }
        used = true;
    }
    let _pass = gate.enter();
    Round {
        notify: used && queue.needs_notification(&*mem).unwrap_or(true),
        more,
    }
}

/// The virtio-blk device.
pub struct Block {
    shared: Arc<Mutex<Shared>>,
    /// Raised by a reset so that the worker ends its batch after the request in flight.
    stop: Arc<AtomicBool>,
    features: u64,
    sectors: u64,
    queue_evt: EventFd,
    queue_sizes: [u16; 1],
}

impl Block {
    /// The device and its I/O thread, which waits on `queue_evt` (the queue's ioeventfd),
    /// passes `gate` around every request and raises `interrupt`. `confine` runs first on
    /// that thread (the seccomp filter); its failure fails this call. Should the thread
    /// ever be unable to wait for the guest, it reports through `fatal` (which stops the
    /// VM) instead of leaving a disk that never answers.
    pub fn new(
        disk: DiskImage,
        queue_evt: &EventFd,
        interrupt: Arc<Interrupt>,
        gate: Arc<DmaGate>,
        confine: impl FnOnce() -> Result<(), String> + Send + 'static,
        fatal: impl Fn(String) + Send + 'static,
    ) -> std::io::Result<Self> {
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if disk.read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let sectors = disk.sectors;
        let shared = Arc::new(Mutex::new(Shared { disk, active: None }));
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, own_evt) = (queue_evt.try_clone()?, queue_evt.try_clone()?);
        let worker = Worker {
            shared: shared.clone(),
            stop: stop.clone(),
            wake,
            interrupt,
            gate,
        };
        super::spawn_io_thread("blk-io", confine, move || worker.run(&fatal))?;
        Ok(Self {
            shared,
            stop,
            features,
            sectors,
            queue_evt: own_evt,
            queue_sizes: [QUEUE_SIZE],
        })
    }
}

/// The I/O thread's side of the device.
struct Worker {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    interrupt: Arc<Interrupt>,
    gate: Arc<DmaGate>,
}

impl Worker {
    /// Never returns: the thread ends with the process (returning would close descriptors,
    /// which its seccomp filter does not allow).
    fn run(self, fatal: &dyn Fn(String)) -> ! {
        loop {
            match self.wake.read() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => give_up(
                    fatal,
                    format!("virtio-blk I/O thread: waiting for the guest: {e}"),
                ),
            }
            let mut shared = lock(&self.shared);
            let round = serve_queue(&mut shared, &self.gate, &self.stop);
            // Raised under the lock: a reset that follows clears it, none is left behind.
            if round.notify {
                self.interrupt.signal_used_queue();
            }
            drop(shared);
            if round.more {
                let _ = self.wake.write(1);
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64) at 0, size_max at 8, seg_max at 12.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        mut queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), String> {
        let queue = queues.pop().ok_or("virtio-blk: no request queue")?;
        lock(&self.shared).active = Some(Active {
            mem,
            queue,
            broken: false,
        });
        // Serve anything the driver queued before DRIVER_OK.
        self.queue_evt
            .write(1)
            .map_err(|e| format!("virtio-blk: waking the I/O thread: {e}"))
    }

    fn reset(&mut self) {
        // The worker ends its batch after the request in flight; after this it touches no
        // guest memory.
        self.stop.store(true, Ordering::Relaxed);
        lock(&self.shared).active = None;
        self.stop.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const DATA: u64 = 0x10_0000;
    const HDR: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A disk image of `sectors` sectors, each filled with its own number's low byte.
    fn image(sectors: u64, read_only: bool) -> (DiskImage, PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("exterior-blk-{}-{n}.img", std::process::id()));
        let mut f = File::create(&path).unwrap();
        for s in 0..sectors {
            f.write_all(&[s as u8; SECTOR as usize]).unwrap();
        }
        (DiskImage::open(&path, read_only, false, 3).unwrap(), path)
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Puts one chain on a fresh queue and serves it: (used length, status byte).
    fn serve(
        disk: DiskImage,
        mem: &GuestMemoryMmap<()>,
        descs: &[RawDescriptor],
    ) -> (Option<u32>, u8, DiskImage) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        let mut shared = Shared {
            disk,
            active: Some(Active {
                mem: mem.clone(),
                queue: vq.create_queue::<Queue>().unwrap(),
                broken: false,
            }),
        };
        // Chain the descriptors (the mock links consecutive ones given NEXT).
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let next = i + 1 < descs.len();
                let flags = d.flags()
                    | if next {
                        virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                    } else {
                        0
                    };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, (i + 1) as u16))
            })
            .collect();
        vq.add_desc_chains(&linked, 0).unwrap();
        let Round { notify, more } =
            serve_queue(&mut shared, &DmaGate::default(), &AtomicBool::new(false));
        assert!(!more);
        let active = shared.active.as_ref().unwrap();
        let used = (active.queue.next_used() == 1).then(|| {
            let elem: [u32; 2] = mem.read_obj(vq.used_addr().unchecked_add(4)).unwrap();
            elem[1]
        });
        assert_eq!(notify, used.is_some());
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used, status, shared.disk)
    }

    fn file_bytes(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(path).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn a_write_lands_in_the_image_and_reads_back() {
        let mem = memory();
        let (disk, path) = image(8, false);
        mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        let out = [
            desc(HDR, 16, false),
            desc(DATA, 1024, false),
            desc(STATUS, 1, true),
        ];
        let (used, status, disk) = serve(disk, &mem, &out);
        assert_eq!((used, u32::from(status)), (Some(1), VIRTIO_BLK_S_OK));
        let bytes = file_bytes(&path);
        assert!(bytes[1024..2048].iter().all(|&b| b == 0xab));
        assert!(bytes[..1024].iter().all(|&b| b < 2) && bytes[2048..2560].iter().all(|&b| b == 4));

        // Read sectors 1..4 back into two buffers, the second one across a boundary.
        header(&mem, VIRTIO_BLK_T_IN, 1);
        let into = [
            desc(HDR, 16, false),
            desc(DATA + 0x1000, 512, true),
            desc(DATA + 0x2000, 1024, true),
            desc(STATUS, 1, true),
        ];
        let (used, status, _) = serve(disk, &mem, &into);
        assert_eq!((used, u32::from(status)), (Some(1536 + 1), VIRTIO_BLK_S_OK));
        let mut got = [0u8; 1536];
        mem.read_slice(&mut got[..512], GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x2000))
            .unwrap();
        assert!(got[..512].iter().all(|&b| b == 1));
        assert!(got[512..].iter().all(|&b| b == 0xab));
        std::fs::remove_file(path).unwrap();
    }

    /// A direct disk (`,direct`): a request of page-aligned buffers goes through the
    /// `O_DIRECT` descriptor, one with a buffer at an odd address through the buffered
    /// one; both land, and read back. The first request has eight segments.
    #[test]
    fn a_direct_disk_serves_aligned_and_unaligned_requests_alike() {
        let mem = memory();
        let (plain, path) = image(64, false);
        drop(plain);
        let disk = DiskImage::open(&path, false, true, 3)
            .expect("O_DIRECT on the test's temporary directory (ext4 here)");
        let align = disk.direct.as_ref().map(|d| d.align);
        assert!(
            align.is_some_and(|a| (SECTOR..=4096).contains(&a)),
            "{align:?}"
        );
        // Aligned: eight 4 KiB buffers at page addresses, the whole 64-sector image.
        let mut out = vec![desc(HDR, 16, false)];
        for i in 0..8u64 {
            let addr = DATA + i * 0x2000;
            mem.write_slice(&[0x40 + i as u8; 4096], GuestAddress(addr))
                .unwrap();
            out.push(desc(addr, 4096, false));
        }
        out.push(desc(STATUS, 1, true));
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (used, status, disk) = serve(disk, &mem, &out);
        assert_eq!((used, u32::from(status)), (Some(1), VIRTIO_BLK_S_OK));
        let bytes = file_bytes(&path);
        for i in 0..8usize {
            assert!(bytes[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == 0x40 + i as u8));
        }
        // Unaligned: 1024 bytes from an odd address, to sector 3.
        mem.write_slice(&[0x99; 1024], GuestAddress(DATA + 0x3_0001))
            .unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 3);
        let odd = [
            desc(HDR, 16, false),
            desc(DATA + 0x3_0001, 1024, false),
            desc(STATUS, 1, true),
        ];
        let (used, status, disk) = serve(disk, &mem, &odd);
        assert_eq!((used, u32::from(status)), (Some(1), VIRTIO_BLK_S_OK));
        // Read sectors 0..16 back through the direct descriptor (page-aligned buffers).
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let into = [
            desc(HDR, 16, false),
            desc(DATA + 0x4_0000, 4096, true),
            desc(DATA + 0x5_0000, 4096, true),
            desc(STATUS, 1, true),
        ];
        let (used, status, disk) = serve(disk, &mem, &into);
        assert_eq!((used, u32::from(status)), (Some(8192 + 1), VIRTIO_BLK_S_OK));
        let mut got = [0u8; 8192];
        mem.read_slice(&mut got[..4096], GuestAddress(DATA + 0x4_0000))
            .unwrap();
        mem.read_slice(&mut got[4096..], GuestAddress(DATA + 0x5_0000))
            .unwrap();
        // Sectors 0..3 and 5..8 from the first write, 3 and 4 from the second, then the
        // second buffer of the first write.
        assert!(got[..1536].iter().all(|&b| b == 0x40));
        assert!(got[1536..2560].iter().all(|&b| b == 0x99));
        assert!(got[2560..4096].iter().all(|&b| b == 0x40));
        assert!(got[4096..].iter().all(|&b| b == 0x41));
        // The aligned write and the read went direct; the odd-address write did not.
        assert_eq!(disk.direct.as_ref().map(|d| d.served), Some(2));
        std::fs::remove_file(path).unwrap();
    }

    /// More iovecs than one call takes (IOV_MAX), some empty: written and read back in
    /// batches, each batch starting where the last one stopped.
    #[test]
    fn positioned_io_moves_more_iovecs_than_one_call_takes() {
        let (disk, path) = image(16, false);
        let mut data: Vec<u8> = (0..1500u32 * 3).map(|i| (i % 251) as u8).collect();
        let mut iovecs: Vec<libc::iovec> = data
            .chunks_mut(3)
            .enumerate()
            .map(|(i, c)| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: if i % 100 == 7 { 0 } else { c.len() },
            })
            .collect();
        let expected: Vec<u8> = data
            .chunks(3)
            .enumerate()
            .filter(|(i, _)| i % 100 != 7)
            .flat_map(|(_, c)| c.to_vec())
            .collect();
        let (mut done, mut at) = (0, 100);
        positioned_io(
            &disk.file,
            &mut iovecs,
            &mut done,
            &mut at,
            Direction::Write,
        )
        .unwrap();
        assert_eq!((done, at), (iovecs.len(), 100 + expected.len() as u64));
        let bytes = file_bytes(&path);
        assert_eq!(&bytes[100..100 + expected.len()], &expected[..]);
        assert!(bytes[..100].iter().all(|&b| b == 0));

        let mut back = vec![0u8; expected.len()];
        let mut iovecs: Vec<libc::iovec> = back
            .chunks_mut(2)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: c.len(),
            })
            .collect();
        let (mut done, mut at) = (0, 100);
        positioned_io(&disk.file, &mut iovecs, &mut done, &mut at, Direction::Read).unwrap();
        assert_eq!(back, expected);
        // Past the image's end: an error, not a loop.
        let mut over = [0u8; 8];
        let mut iovecs = [libc::iovec {
            iov_base: over.as_mut_ptr().cast(),
            iov_len: over.len(),
        }];
        let (mut done, mut at) = (0, 16 * SECTOR);
        assert!(
            positioned_io(&disk.file, &mut iovecs, &mut done, &mut at, Direction::Read).is_err()
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_keeps_its_bytes() {
        let mem = memory();
        let (disk, path) = image(4, true);
        let before = file_bytes(&path);
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let out = [
            desc(HDR, 16, false),
            desc(DATA, 512, false),
            desc(STATUS, 1, true),
        ];
        let (used, status, disk) = serve(disk, &mem, &out);
        assert_eq!((used, u32::from(status)), (Some(1), VIRTIO_BLK_S_IOERR));
        assert_eq!(file_bytes(&path), before);
        // Reads and flushes still work.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let (_, status, _) = serve(disk, &mem, &[desc(HDR, 16, false), desc(STATUS, 1, true)]);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn requests_outside_the_image_fail_without_io() {
        let mem = memory();
        let (mut disk, path) = image(4, false);
        let before = file_bytes(&path);
        for (kind, sector, len) in [
            (VIRTIO_BLK_T_OUT, 3, 1024u32), // runs one sector past the end
            (VIRTIO_BLK_T_OUT, 4, 512),
            (VIRTIO_BLK_T_IN, 4, 512),
            (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, 512), // sector * 512 overflows
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
        ] {
            header(&mem, kind, sector);
            let writable = kind == VIRTIO_BLK_T_IN;
            let chain = [
                desc(HDR, 16, false),
                desc(DATA, len, writable),
                desc(STATUS, 1, true),
            ];
            let (used, status, d) = serve(disk, &mem, &chain);
            disk = d;
            assert_eq!(
                (used, u32::from(status)),
                (Some(1), VIRTIO_BLK_S_IOERR),
                "{kind} {sector}"
            );
        }
        assert_eq!(file_bytes(&path), before);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn buffers_outside_guest_ram_fail_cleanly() {
        let mem = memory();
        let (disk, path) = image(4, false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Data buffer straddling the end of RAM: the read fails, nothing panics.
        let chain = [
            desc(HDR, 16, false),
            desc((4 << 20) - 256, 512, true),
            desc(STATUS, 1, true),
        ];
        let (used, status, disk) = serve(disk, &mem, &chain);
        assert_eq!((used, u32::from(status)), (Some(1), VIRTIO_BLK_S_IOERR));
        // A header that is not in RAM.
        let chain = [desc(1 << 40, 16, false), desc(STATUS, 1, true)];
        let (_, status, _) = serve(disk, &mem, &chain);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn short_headers_unknown_types_and_get_id() {
        let mem = memory();
        let (disk, path) = image(4, false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let (_, status, disk) = serve(disk, &mem, &[desc(HDR, 8, false), desc(STATUS, 1, true)]);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_IOERR, "an 8-byte header");
        header(&mem, 99, 0);
        let (_, status, disk) = serve(disk, &mem, &[desc(HDR, 16, false), desc(STATUS, 1, true)]);
        assert_eq!(u32::from(status), VIRTIO_BLK_S_UNSUPP);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let chain = [
            desc(HDR, 16, false),
            desc(DATA, 64, true),
            desc(STATUS, 1, true),
        ];
        let (used, status, _) = serve(disk, &mem, &chain);
        assert_eq!((used, u32::from(status)), (Some(21), VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..14], b"exterior-disk3");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn chains_without_a_status_byte_are_returned_untouched() {
        let mem = memory();
        let (disk, path) = image(4, false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        // No writable descriptor at all.
        let (used, status, disk) = serve(disk, &mem, &[desc(HDR, 16, false)]);
        assert_eq!((used, status), (Some(0), 0xff));
        // Readable after writable.
        let chain = [
            desc(HDR, 16, false),
            desc(STATUS, 1, true),
            desc(DATA, 16, false),
        ];
        let (used, status, disk) = serve(disk, &mem, &chain);
        assert_eq!((used, status), (Some(0), 0xff));
        // A zero-length status descriptor.
        let (used, status, _) = serve(disk, &mem, &[desc(HDR, 16, false), desc(STATUS, 0, true)]);
        assert_eq!((used, status), (Some(0), 0xff));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_chain_longer_than_any_request_is_refused_before_it_is_served() {
        // Linux never needs more than SEG_MAX data segments plus header and status; an
        // indirect table could hold 65535 (the mock queue holds 16, so this parses).
        let many = (0..=MAX_CHAIN).map(|i| Descriptor::new(DATA + i as u64, 1, 0, 0));
        assert!(matches!(Request::parse(many), Err(Malformed::TooLong)));
        let mut ok: Vec<Descriptor> = (0..MAX_CHAIN - 1)
            .map(|i| Descriptor::new(DATA + i as u64, 1, 0, 0))
            .collect();
        ok.push(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0));
        assert!(Request::parse(ok.into_iter()).is_ok());
    }

    #[test]
    fn a_driver_that_breaks_its_ring_gets_nothing_more_served() {
        let mem = memory();
        let (disk, path) = image(4, false);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut shared = Shared {
            disk,
            active: Some(Active {
                mem: mem.clone(),
                queue: vq.create_queue::<Queue>().unwrap(),
                broken: false,
            }),
        };
        // The avail index 17 entries ahead of a 16-entry ring.
        mem.write_obj(17u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        let stop = AtomicBool::new(false);
        let round = serve_queue(&mut shared, &DmaGate::default(), &stop);
        assert_eq!(
            round,
            Round {
                notify: false,
                more: false
            }
        );
        assert!(shared.active.as_ref().unwrap().broken);
        // Even a repaired index is not served until a reset.
        mem.write_obj(1u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        serve_queue(&mut shared, &DmaGate::default(), &stop);
        assert_eq!(shared.active.as_ref().unwrap().queue.next_avail(), 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_buffer_wrapping_the_address_space_is_malformed() {
        let parsed = Request::parse(
            [Descriptor::new(
                u64::MAX - 4,
                16,
                VRING_DESC_F_WRITE as u16,
                0,
            )]
            .into_iter(),
        );
        assert_eq!(parsed.err(), Some(Malformed::AddressOverflow));
    }

    #[test]
    fn config_space_reports_capacity_and_seg_max() {
        let (disk, path) = image(6, true);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let block = Block::new(disk, &evt, irq, Arc::default(), || Ok(()), |_| {}).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 6);
        let mut seg = [0u8; 4];
        block.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        block.read_config(1 << 40, &mut seg);
        assert_eq!(seg, [0; 4]);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        std::fs::remove_file(path).unwrap();
    }
}
