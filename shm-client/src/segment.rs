//! Shared-memory segments: the `#[repr(C)]` header every segment starts with, and the memory
//! seam ([`Region`]) that lets the same ring code run on `/dev/shm` or on a heap buffer.
//!
//! Layout of every segment (offsets in bytes):
//!
//! ```text
//! 0                 128                           data_offset            data_offset + capacity
//! | SegmentHeader   | control block (cursors...)  | ring data ...        |
//! ```
//!
//! The creator writes the header and the control block, then stores `init = INIT_READY` with
//! Release. An opener loads `init` with Acquire before it trusts anything else, so a segment that
//! is still being built is reported as [`OpenError::NotInitialized`], never read as garbage.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::sync::{AtomicU32, Ordering};

/// `b"AEGISSEG"` read as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"AEGISSEG");
/// Bumped on every incompatible change of a header, a control block or the frame format.
pub const LAYOUT_VERSION: u32 = 5;
/// Size reserved for [`SegmentHeader`] at the start of every segment.
pub const HEADER_LEN: usize = 128;
/// Value of [`SegmentHeader::init`] once the creator has finished.
pub const INIT_READY: u32 = 0x5EAD_7001;
/// The directory that holds Aegis segments.
pub const SHM_DIR: &str = "/dev/shm";

/// What a segment holds. Stored in the header so that a bus can never be opened as a ring.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SegmentKind {
    /// An SPSC source ring (`aegis-<sid>-src-<name>`).
    SourceRing = 1,
    /// The broadcast bus (`aegis-<sid>-bus`).
    Bus = 2,
    /// The session control segment (`aegis-<sid>-ctl`).
    Control = 3,
}

/// The header at offset 0 of every segment.
///
/// Invariants, once `init == INIT_READY`: `magic == SEGMENT_MAGIC`, `version == LAYOUT_VERSION`,
/// `data_offset + capacity == total_len`, and no field but `init` changes again.
#[repr(C)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: u64,
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// A [`SegmentKind`] as u32.
    pub kind: u32,
    /// The epoch of the session that owns the segment; openers must present the same one.
    pub epoch: u64,
    /// Bytes of ring data (a power of two for rings).
    pub capacity: u64,
    /// Offset of the ring data from the start of the segment.
    pub data_offset: u64,
    /// Total length of the segment in bytes.
    pub total_len: u64,
    /// Pid of the process that created the segment.
    pub creator_pid: u32,
    /// 0 while the creator builds the segment; [`INIT_READY`] afterwards (stored last, Release).
    pub init: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() <= HEADER_LEN);

/// Why a segment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The segment already exists (created with `O_EXCL`).
    #[error("segment {0} already exists")]
    AlreadyExists(PathBuf),
    /// The requested capacity is not usable.
    #[error("invalid capacity {capacity}: {reason}")]
    BadCapacity {
        /// The capacity asked for.
        capacity: usize,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Any other I/O error.
    #[error("cannot create segment {path}: {source}")]
    Io {
        /// The segment's path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Why a segment could not be opened. Every variant is a clear refusal: nothing is mapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// No such segment.
    #[error("segment {0} does not exist")]
    NotFound(PathBuf),
    /// The file is smaller than its header says, or than a header at all.
    #[error("segment is too small: {len} bytes, need {need}")]
    TooSmall {
        /// Bytes found.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic number is wrong: this is not an Aegis segment.
    #[error("bad magic {found:#018x}: not an Aegis segment")]
    BadMagic {
        /// The magic found.
        found: u64,
    },
    /// The segment was written by another layout version.
    #[error("layout version mismatch: segment has {found}, this build speaks {expected}")]
    VersionMismatch {
        /// Version in the segment.
        found: u32,
        /// Version of this build.
        expected: u32,
    },
    /// The segment holds another kind of object.
    #[error("wrong segment kind: found {found}, expected {expected}")]
    WrongKind {
        /// Kind found.
        found: u32,
        /// Kind expected.
        expected: u32,
    },
    /// The segment belongs to another session (or an earlier incarnation of this one).
    #[error("epoch mismatch: segment belongs to epoch {found:#x}, expected {expected:#x}")]
    EpochMismatch {
        /// Epoch found.
        found: u64,
        /// Epoch expected.
        expected: u64,
    },
    /// The creator has not finished building the segment.
    #[error("segment is not initialised yet")]
    NotInitialized,
    /// The header's geometry is inconsistent.
    #[error("corrupt header: {0}")]
    Corrupt(&'static str),
    /// Any other I/O error.
    #[error("cannot open segment: {0}")]
    Io(String),
}

/// Memory that holds one segment: a header, a control block and ring data.
///
/// # Safety
/// Implementors guarantee that `as_ptr()` is valid for reads and writes of `len()` bytes for as
/// long as the value lives, that it is aligned to at least 128 bytes, and that the memory is
/// never moved.
pub unsafe trait Region: Send + Sync {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Length of the memory in bytes.
    fn len(&self) -> usize;
    /// Whether the region is empty (never, for a valid segment).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A process-local region on the heap: the seam that lets unit tests, loom models and
/// in-process benches run the ring code without `/dev/shm`.
pub struct HeapRegion {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the region is plain bytes; all synchronisation goes through the atomics stored in it.
unsafe impl Send for HeapRegion {}
// SAFETY: as above.
unsafe impl Sync for HeapRegion {}

impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to 4096.
    pub fn new(len: usize) -> HeapRegion {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        HeapRegion { ptr, layout }
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

// SAFETY: the allocation is `layout.size()` bytes, 4096-aligned, and freed only on drop.
unsafe impl Region for HeapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

/// A segment mapped from a file in `/dev/shm`. The creator removes the file when dropped.
pub struct ShmRegion {
    map: memmap2::MmapRaw,
    path: PathBuf,
    owner: bool,
}

// SAFETY: the mapping is `map.len()` bytes, page-aligned, and unmapped only on drop.
unsafe impl Region for ShmRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

impl ShmRegion {
    /// Creates `path` with `O_CREAT | O_EXCL` and mode 0600, sized to `len` zero bytes.
    pub fn create(path: &Path, len: usize) -> Result<ShmRegion, CreateError> {
        let io_err = |source| CreateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    CreateError::AlreadyExists(path.to_path_buf())
                } else {
                    io_err(e)
                }
            })?;
        // From here on the file is ours: remove it again if anything fails.
        let cleanup = |e| {
            let _ = std::fs::remove_file(path);
            io_err(e)
        };
        file.set_len(len as u64).map_err(cleanup)?;
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(cleanup)?;
        Ok(ShmRegion {
            map,
            path: path.to_path_buf(),
            owner: true,
        })
    }

    /// Maps an existing segment read-write. Checks nothing but the file itself.
    pub fn open(path: &Path) -> Result<ShmRegion, OpenError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => OpenError::NotFound(path.to_path_buf()),
                _ => OpenError::Io(format!("{}: {e}", path.display())),
            })?;
        let len = file
            .metadata()
            .map_err(|e| OpenError::Io(e.to_string()))?
            .len() as usize;
        if len < HEADER_LEN {
            return Err(OpenError::TooSmall {
                len,
                need: HEADER_LEN,
            });
        }
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| OpenError::Io(e.to_string()))?;
        Ok(ShmRegion {
            map,
            path: path.to_path_buf(),
            owner: false,
        })
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether dropping this handle removes the file.
    pub fn is_owner(&self) -> bool {
        self.owner
    }

    /// Keep the file when this handle is dropped (hand ownership to someone else).
    pub fn disown(&mut self) {
        self.owner = false;
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Geometry of a segment: where the control block and the data sit.
#[derive(Copy, Clone, Debug)]
pub struct Geometry {
    /// Offset of the data area.
    pub data_offset: usize,
    /// Bytes of data.
    pub capacity: usize,
}

impl Geometry {
    /// The geometry for a control block of `ctrl_len` bytes and `capacity` data bytes.
    pub const fn new(ctrl_len: usize, capacity: usize) -> Geometry {
        let data_offset = (HEADER_LEN + ctrl_len).next_multiple_of(128);
        Geometry {
            data_offset,
            capacity,
        }
    }

    /// Total bytes of the segment.
    ///
    /// # Panics
    /// If it overflows a `usize` (a capacity read from shared memory goes through
    /// [`Geometry::checked_total_len`] instead).
    pub const fn total_len(&self) -> usize {
        self.data_offset + self.capacity
    }

    /// Total bytes of the segment, `None` if that overflows a `usize`.
    pub const fn checked_total_len(&self) -> Option<usize> {
        self.data_offset.checked_add(self.capacity)
    }
}

/// Writes the header of a fresh segment, leaving `init` at 0.
///
/// # Safety
/// `region` must be at least `geo.total_len()` bytes, and no other process may be reading it
/// as initialised (it is fresh: `init` is 0).
pub(crate) unsafe fn write_header(
    region: &dyn Region,
    kind: SegmentKind,
    epoch: u64,
    geo: Geometry,
) {
    let hdr = region.as_ptr() as *mut SegmentHeader;
    // SAFETY: the caller guarantees the region is large enough and not shared yet; the
    // region is 128-byte aligned, which satisfies SegmentHeader's alignment.
    unsafe {
        hdr.write(SegmentHeader {
            magic: SEGMENT_MAGIC,
            version: LAYOUT_VERSION,
            kind: kind as u32,
            epoch,
            capacity: geo.capacity as u64,
            data_offset: geo.data_offset as u64,
            total_len: geo.total_len() as u64,
            creator_pid: std::process::id(),
            init: AtomicU32::new(0),
        });
    }
}

/// Marks a segment initialised. Everything written before this call is visible to an opener
/// that observes the flag.
pub(crate) fn mark_initialized(region: &dyn Region) {
    // SAFETY: the header was written by `write_header`, so the reference is to a valid value.
    let hdr = unsafe { &*(region.as_ptr() as *const SegmentHeader) };
    // Release: pairs with the Acquire load in `validate_header`; the header and the control
    // block are visible before the flag.
    hdr.init.store(INIT_READY, Ordering::Release);
}

/// Checks the header of a mapped segment and returns its geometry.
pub(crate) fn validate_header(
    region: &dyn Region,
    kind: SegmentKind,
    epoch: Option<u64>,
    ctrl_len: usize,
) -> Result<Geometry, OpenError> {
    if region.len() < HEADER_LEN {
        return Err(OpenError::TooSmall {
            len: region.len(),
            need: HEADER_LEN,
        });
    }
    // SAFETY: the region holds at least HEADER_LEN bytes, 128-aligned; every bit pattern is a
    // valid SegmentHeader (integers and an atomic integer).
    let hdr = unsafe { &*(region.as_ptr() as *const SegmentHeader) };
    // Acquire: pairs with the Release store in `mark_initialized`; if we see INIT_READY we see
    // the whole header and control block.
    let init = hdr.init.load(Ordering::Acquire);
    if hdr.magic != SEGMENT_MAGIC {
        if hdr.magic == 0 && init == 0 {
            return Err(OpenError::NotInitialized);
        }
        return Err(OpenError::BadMagic { found: hdr.magic });
    }
    if hdr.version != LAYOUT_VERSION {
        return Err(OpenError::VersionMismatch {
            found: hdr.version,
            expected: LAYOUT_VERSION,
        });
    }
    if hdr.kind != kind as u32 {
        return Err(OpenError::WrongKind {
            found: hdr.kind,
            expected: kind as u32,
        });
    }
    if init != INIT_READY {
        return Err(OpenError::NotInitialized);
    }
    if let Some(expected) = epoch {
        if hdr.epoch != expected {
            return Err(OpenError::EpochMismatch {
                found: hdr.epoch,
                expected,
            });
        }
    }
    let geo = Geometry::new(ctrl_len, hdr.capacity as usize);
    let Some(total_len) = geo.checked_total_len() else {
        return Err(OpenError::Corrupt("capacity overflows the address space"));
    };
    if hdr.data_offset as usize != geo.data_offset {
        return Err(OpenError::Corrupt(
            "data offset does not match the control block",
        ));
    }
    if hdr.total_len as usize != total_len {
        return Err(OpenError::Corrupt(
            "total length does not match the capacity",
        ));
    }
    if region.len() < total_len {
        return Err(OpenError::TooSmall {
            len: region.len(),
            need: total_len,
        });
    }
    Ok(geo)
}

/// The path of segment `suffix` of session `sid`: `/dev/shm/aegis-<sid>-<suffix>`.
pub fn segment_path(sid: &str, suffix: &str) -> PathBuf {
    Path::new(SHM_DIR).join(format!("aegis-{sid}-{suffix}"))
}

/// The identity fields of a segment header, read with plain file I/O (no mapping): what
/// `aegis-shmctl gc` needs to judge a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    /// [`SegmentHeader::magic`]: [`SEGMENT_MAGIC`] for an Aegis segment.
    pub magic: u64,
    /// [`SegmentHeader::version`].
    pub version: u32,
    /// [`SegmentHeader::kind`].
    pub kind: u32,
    /// [`SegmentHeader::epoch`].
    pub epoch: u64,
    /// [`SegmentHeader::creator_pid`].
    pub creator_pid: u32,
}

/// Reads the header of the segment file at `path`, at the offsets of [`SegmentHeader`].
/// Returns the fields as found, without checking them (compare `magic` with
/// [`SEGMENT_MAGIC`]); fails with `UnexpectedEof` if the file is shorter than a header.
/// Costs one `open` and one small read.
pub fn read_header_of(path: &Path) -> io::Result<HeaderInfo> {
    use std::io::Read;
    use std::mem::{offset_of, size_of};
    let mut b = [0u8; size_of::<SegmentHeader>()];
    std::fs::File::open(path)?.read_exact(&mut b)?;
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    Ok(HeaderInfo {
        magic: u64_at(offset_of!(SegmentHeader, magic)),
        version: u32_at(offset_of!(SegmentHeader, version)),
        kind: u32_at(offset_of!(SegmentHeader, kind)),
        epoch: u64_at(offset_of!(SegmentHeader, epoch)),
        creator_pid: u32_at(offset_of!(SegmentHeader, creator_pid)),
    })
}
