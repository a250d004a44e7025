//! Pages a mapped journal in ahead of the merge and out behind it, on a thread of its own.
//!
//! A journal source is a read-only file mapping that the sequencer reads front to back. Left
//! to itself, the sequencer thread takes a page fault every few pages (the kernel maps up to
//! 16 pages per fault) and unmaps what it has read every few MiB, and on the real path that
//! was about a sixth of the merge's time. The pager does both on another thread, which runs
//! on whatever core the consumers leave idle: it keeps a window ahead of the read position
//! populated (`MADV_POPULATE_READ`) and drops the pages behind it (`MADV_DONTNEED`), so the
//! daemon's resident set stays bounded by the window, whatever the journal's size.
//!
//! Both are advice on a read-only file mapping, so nothing the sequencer reads can change: a
//! page dropped while the sequencer still reads it is faulted in again from the file, and a
//! page not yet populated is faulted in by the sequencer itself. The pager only ever changes
//! which thread pays for a page fault, never what is read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use memmap2::{Advice, Mmap, UncheckedAdvice};

/// How far ahead of the read position the mapping is kept populated.
pub const AHEAD: u64 = 8 << 20;
/// Populated in steps of this much (one `madvise` call each).
const STEP: u64 = 1 << 20;
/// The pager is woken when the read position comes within this much of the populated end.
const LOW_WATER: u64 = AHEAD / 2;
/// Pages behind the read position are dropped once this much has piled up.
pub const RELEASE_STEP: u64 = 4 << 20;
/// Advice boundaries are aligned to this (a multiple of any page size).
const ALIGN: u64 = 1 << 20;
/// The longest sleep: a bound for the case that a wake-up is lost (none should be).
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// The pager of one mapping (see the module docs). Dropping it stops and joins its thread.
pub struct Pager {
    shared: Arc<Shared>,
    /// The mapping's length: once populated to it, the pager is never woken again.
    len: u64,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// The reader's position (a byte offset into the mapping): everything below it is done
    /// with. Relaxed everywhere: it only steers advice, and any value is safe (module docs).
    read: AtomicU64,
    /// How far the pager has populated (written by the pager, read by `advance`). Relaxed:
    /// a stale value only makes `advance` wake the pager once too often or once too late.
    populated: AtomicU64,
    stop: AtomicBool,
}

/// Populates the first window of `map` in the calling thread, before the merge starts (at
/// most [`AHEAD`] bytes); returns where it ends, or `None` if the kernel refuses the advice
/// (before Linux 5.14): then a pager would only take the reader's faults in turns with it. A
/// pager started after it goes on from there and never races the merge over the first pages:
/// the merge of a short journal took more CPU with a pager that started at the same time
/// than with none.
pub fn prime(map: &Mmap) -> Option<u64> {
    let end = (map.len() as u64).min(AHEAD);
    map.advise_range(Advice::PopulateRead, 0, end as usize)
        .ok()
        .map(|()| end)
}

impl Pager {
    /// Starts paging `map` on a thread named `name`, from `populated` (what [`prime`] did).
    pub fn start(map: Arc<Mmap>, name: String, populated: u64) -> std::io::Result<Pager> {
        let shared = Arc::new(Shared {
            read: AtomicU64::new(0),
            populated: AtomicU64::new(populated),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let map_len = map.len() as u64;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&map, &s, populated))?;
        Ok(Pager {
            len: map_len,
            shared,
            thread: Some(thread),
        })
    }

    /// The reader has read everything below `pos` (an offset into the mapping) and holds no
    /// reference into it. Wakes the pager when the populated window runs low (never once it
    /// reached the end: the last window's pages go with the mapping).
    #[inline]
    pub fn advance(&self, pos: u64) {
        self.shared.read.store(pos, Ordering::Relaxed);
        let populated = self.shared.populated.load(Ordering::Relaxed);
        if pos + LOW_WATER > populated && populated < self.len {
            if let Some(t) = &self.thread {
                // Cheap when the pager is awake (an atomic swap): a system call only when it
                // sleeps, at most once per window.
                t.thread().unpark();
            }
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The pager's loop: populate ahead, drop behind, sleep until the reader comes near the end
/// of the window (or [`MAX_SLEEP`]).
fn run(map: &Mmap, s: &Shared, populated: u64) {
    let len = map.len() as u64;
    let (mut populated, mut released) = (populated, 0u64);
    while !s.stop.load(Ordering::Relaxed) {
        let read = s.read.load(Ordering::Relaxed).min(len);
        let behind = read & !(ALIGN - 1);
        if behind >= released + RELEASE_STEP {
            // SAFETY: a read-only file mapping: MADV_DONTNEED drops this process's page-table
            // entries only, and a later read of those bytes faults them in again from the
            // file (module docs); no byte of the mapping changes.
            let _ = unsafe {
                map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    released as usize,
                    (behind - released) as usize,
                )
            };
            released = behind;
        }
        populated = populated.max(behind);
        let want = (read + AHEAD).min(len);
        if populated < want {
            let to = ((populated + STEP) & !(STEP - 1)).min(len);
            // A step that fails is left to the reader's own faults; the window moves on
            // either way. (A journal truncated under the map fails here with EFAULT, where
            // the reader gets SIGBUS: the documented limit of a mapped file.)
            let _ = map.advise_range(
                Advice::PopulateRead,
                populated as usize,
                (to - populated) as usize,
            );
            populated = to;
            s.populated.store(populated, Ordering::Relaxed);
            continue;
        }
        // Woken by `advance` when the reader nears the end of the window, or by drop.
        std::thread::park_timeout(MAX_SLEEP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Resident pages of `map` (by `mincore`).
    fn resident(map: &Mmap) -> usize {
        let page = 4096usize;
        let pages = map.len().div_ceil(page);
        let mut v = vec![0u8; pages];
        // SAFETY: `map` is a live mapping of `map.len()` bytes, page-aligned; `v` holds one
        // byte per page.
        let r = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), v.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        v.iter().filter(|b| **b & 1 != 0).count()
    }

    /// Pages mapped into this process: `mincore` tells the page cache, not the page tables, so
    /// the test reads the process's own `smaps` entry for the mapping.
    fn mapped_kb(map: &Mmap) -> u64 {
        let start = format!("{:x}-", map.as_ptr() as usize);
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines.next().expect("the mapping is listed");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("an Rss line")
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting until {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn keeps_a_window_ahead_populated_and_drops_what_is_behind() {
        let dir = TempDir::new("window");
        let path = dir.0.join("j");
        let len = 64usize << 20;
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..len >> 20 {
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only map of a file this test wrote and nobody changes.
        let map = Arc::new(unsafe { Mmap::map(&file) }.unwrap());
        assert!(resident(&map) > 0, "the file is in the page cache");
        assert_eq!(mapped_kb(&map), 0, "nothing mapped before the pager starts");
        // The first window is populated without any read, before the pager starts.
        let primed = prime(&map).expect("MADV_POPULATE_READ (Linux 5.14)");
        assert_eq!(primed, AHEAD);
        assert!(
            mapped_kb(&map) >= AHEAD / 1024,
            "the first window is mapped"
        );
        let pager = Pager::start(map.clone(), "test-pager".into(), primed).unwrap();
        // Read half of it, tell the pager, and check that it moved the window: mapped now
        // reaches past the first window, and what is behind was dropped.
        let mut sum = 0u64;
        let mut pos = 0usize;
        while pos < 40 << 20 {
            sum = sum.wrapping_add(map[pos] as u64);
            pos += 4096;
            pager.advance(pos as u64);
        }
        wait_until("the window follows the read position", || {
            let s = pager.shared.populated.load(Ordering::Relaxed);
            s >= (40 << 20) + AHEAD
        });
        let kb = mapped_kb(&map);
        let bound = (AHEAD + RELEASE_STEP + 2 * STEP) / 1024;
        assert!(kb <= bound, "{kb} kB mapped, at most {bound} kB expected");
        // The bytes read are the file's, dropped pages or not.
        for (i, b) in map.iter().enumerate().step_by(1 << 16) {
            assert_eq!(*b, ((i % (1 << 20)) % 251) as u8);
        }
        std::hint::black_box(sum);
        drop(pager);
    }

    #[test]
    fn dropping_the_pager_stops_and_joins_its_thread() {
        let dir = TempDir::new("drop");
        let path = dir.0.join("j");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: as above.
        let map = Arc::new(unsafe { Mmap::map(&file) }.unwrap());
        let pager = Pager::start(map.clone(), "test-pager".into(), 0).unwrap();
        wait_until("the pager has populated the file", || {
            pager.shared.populated.load(Ordering::Relaxed) == 1 << 20
        });
        // The pager sleeps now (for up to MAX_SLEEP); drop wakes it and joins it.
        drop(pager);
        assert_eq!(
            Arc::strong_count(&map),
            1,
            "the thread let go of the mapping"
        );
    }

    /// A directory of its own, removed on drop (a failing test too).
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let d = std::env::temp_dir()
                .join(format!("aegis-pager-test-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
