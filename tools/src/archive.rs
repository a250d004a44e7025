//! Binance archives as they are downloaded: `SYMBOL-TYPE-DATE.zip` holding exactly one CSV of
//! the same name (`SYMBOL-TYPE-DATE.csv`), with `SYMBOL-TYPE-DATE.zip.CHECKSUM` beside it
//! (`<sha256-hex>  <file name>`, as `sha256sum` prints it).
//!
//! The lifecycle, in the order `aegis-replay` follows so that nothing is sent to a session
//! before a bad archive is known:
//!
//! 1. [`verify_checksum`]: when the CHECKSUM file exists, the archive's SHA-256 must match it
//!    (one pass over the file, 1 MiB at a time). A malformed CHECKSUM file, or one that names
//!    another file, is an error too.
//! 2. [`CsvArchive::open`] (or [`CsvArchive::from_file`] on the file just hashed): reads the
//!    central directory and checks, without inflating anything, that the archive holds exactly
//!    one entry, named after the archive, stored or deflated, not encrypted, whose declared
//!    size is at most [`MAX_RATIO`] times its compressed size (a zip bomb otherwise), and whose
//!    local header is where the directory says.
//! 3. [`CsvArchive::events`]: streams the CSV out of the archive, never unpacking it to disk,
//!    in bounded memory (two 256 KiB buffers, the inflater's window and one CSV line). Declared
//!    sizes can lie, so the stream fails as soon as it inflates past the declared size (which
//!    step 2 bounded to [`MAX_RATIO`] times the compressed bytes), or ends short of it, or
//!    fails its CRC-32.
//!
//! Errors name the archive; CSV errors inside it name `ARCHIVE.zip/ENTRY.csv` and the line
//! ([`CsvArchive::label`]).

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zip::read::ZipFile;
use zip::result::ZipError;
use zip::{CompressionMethod, ZipArchive};

use crate::csv::{CsvReader, ParseError};
use crate::names::FileInfo;
use crate::sort::CsvEvents;

/// The largest accepted ratio of an entry's (declared or actual) size to its compressed size.
/// Binance's CSVs deflate about 3 to 10 times; a few hundred is already a crafted archive.
pub const MAX_RATIO: u64 = 200;
/// Appended to an archive's path to find its CHECKSUM file.
pub const CHECKSUM_SUFFIX: &str = ".CHECKSUM";
/// The read buffer of the CSV text streamed out of an archive (as for a plain CSV file).
const TEXT_BUF: usize = 256 * 1024;
/// The read buffer of the compressed bytes.
const RAW_BUF: usize = 256 * 1024;
/// The read buffer of the checksum pass.
const HASH_BUF: usize = 1 << 20;
/// At most this many entry names are listed in an error.
const LISTED: usize = 5;

/// Why an archive or its CHECKSUM file was refused.
#[derive(Debug)]
pub enum ArchiveError {
    /// A system call failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        error: io::Error,
    },
    /// Not a zip archive, or a truncated or damaged one (no readable central directory).
    NotZip {
        /// The archive.
        path: PathBuf,
        /// What the zip reader said.
        error: ZipError,
    },
    /// The archive does not hold exactly one entry.
    Entries {
        /// The archive.
        path: PathBuf,
        /// How many entries it holds.
        count: usize,
        /// The first few entry names.
        names: Vec<String>,
        /// The one entry expected.
        expected: String,
    },
    /// The one entry is not named after the archive.
    EntryName {
        /// The archive.
        path: PathBuf,
        /// The entry's name.
        found: String,
        /// The name expected (`<archive stem>.csv`).
        expected: String,
    },
    /// The archive's own name gives no entry name (not `NAME.zip`, or not UTF-8).
    ArchiveName {
        /// The archive.
        path: PathBuf,
    },
    /// The entry cannot be read: a directory, encrypted, or compressed with a method other
    /// than store or deflate, or its local header is damaged.
    Unsupported {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// The entry declares a size more than [`MAX_RATIO`] times its compressed size.
    Bomb {
        /// The archive.
        path: PathBuf,
        /// The entry.
        entry: String,
        /// Its declared (uncompressed) size.
        size: u64,
        /// Its compressed size.
        compressed: u64,
    },
    /// `--verify` was asked for, and there is no CHECKSUM file.
    NoChecksum {
        /// The archive.
        path: PathBuf,
        /// The CHECKSUM file looked for.
        checksum: PathBuf,
    },
    /// The CHECKSUM file is not `<64 hex digits>  <file name>` on one line.
    ChecksumFormat {
        /// The CHECKSUM file.
        checksum: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CHECKSUM file is for another file.
    ChecksumName {
        /// The CHECKSUM file.
        checksum: PathBuf,
        /// The file it names.
        names: String,
        /// The archive's file name.
        expected: String,
    },
    /// The CSV reader refused its setup (a [`FileInfo`] whose public fields were changed
    /// after it was validated).
    Csv {
        /// `ARCHIVE.zip/ENTRY.csv`.
        label: PathBuf,
        /// The cause.
        error: ParseError,
    },
    /// The archive's SHA-256 is not the one published.
    Mismatch {
        /// The archive.
        path: PathBuf,
        /// The SHA-256 in the CHECKSUM file.
        expected: [u8; 32],
        /// The archive's SHA-256.
        actual: [u8; 32],
        /// The archive's size in bytes.
        size: u64,
    },
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveError::Io { path, op, error } => {
                write!(f, "{}: cannot {op}: {error}", path.display())
            }
            ArchiveError::NotZip { path, error } => write!(
                f,
                "{}: not a readable zip archive (truncated or damaged?): {error}",
                path.display()
            ),
            ArchiveError::Entries {
                path,
                count,
                names,
                expected,
            } => {
                write!(f, "{}: the archive holds {count} entries", path.display())?;
                if !names.is_empty() {
                    let more = if *count > names.len() { ", ..." } else { "" };
                    write!(f, " ({}{more})", names.join(", "))?;
                }
                write!(f, "; expected exactly one CSV, {expected}")
            }
            ArchiveError::EntryName {
                path,
                found,
                expected,
            } => write!(
                f,
                "{}: the archive's entry is {found:?}, expected {expected:?} (a Binance \
                 archive holds one CSV named after it)",
                path.display()
            ),
            ArchiveError::ArchiveName { path } => write!(
                f,
                "{}: an archive must be named NAME.zip (UTF-8) and hold NAME.csv",
                path.display()
            ),
            ArchiveError::Unsupported {
                path,
                entry,
                reason,
            } => write!(f, "{}: entry {entry:?}: {reason}", path.display()),
            ArchiveError::Bomb {
                path,
                entry,
                size,
                compressed,
            } => write!(
                f,
                "{}: entry {entry:?} declares {size} bytes from {compressed} compressed, more \
                 than {MAX_RATIO} times as large: refused as a zip bomb",
                path.display()
            ),
            ArchiveError::NoChecksum { path, checksum } => write!(
                f,
                "{}: nothing to verify against: no {}",
                path.display(),
                checksum.display()
            ),
            ArchiveError::ChecksumFormat { checksum, reason } => write!(
                f,
                "{}: malformed CHECKSUM file: {reason}; expected one line \
                 `<64 hex digits>  <file name>`",
                checksum.display()
            ),
            ArchiveError::ChecksumName {
                checksum,
                names,
                expected,
            } => write!(
                f,
                "{}: the CHECKSUM is for {names:?}, not {expected:?}",
                checksum.display()
            ),
            ArchiveError::Csv { label, error } => write!(f, "{}: {error}", label.display()),
            ArchiveError::Mismatch {
                path,
                expected,
                actual,
                size,
            } => write!(
                f,
                "{}: checksum mismatch: the CHECKSUM file says SHA-256 {}, the archive \
                 ({size} bytes) has {}; download it again (or pass --no-verify)",
                path.display(),
                hex(expected),
                hex(actual)
            ),
        }
    }
}

impl std::error::Error for ArchiveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ArchiveError::Io { error, .. } => Some(error),
            ArchiveError::NotZip { error, .. } => Some(error),
            ArchiveError::Csv { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |error| ArchiveError::Io {
        path: path.to_path_buf(),
        op,
        error,
    }
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `path` names a zip archive (by its extension, `.zip` in any case).
pub fn is_archive(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// Where the CHECKSUM file of `path` is: `path` + [`CHECKSUM_SUFFIX`].
pub fn checksum_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(CHECKSUM_SUFFIX);
    PathBuf::from(p)
}

/// The entry an archive must hold: its file name with `.zip` replaced by `.csv`.
fn expected_entry(path: &Path) -> Result<String, ArchiveError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty() && is_archive(path))
        .map(|s| format!("{s}.csv"))
        .ok_or_else(|| ArchiveError::ArchiveName {
            path: path.to_path_buf(),
        })
}

/// A CHECKSUM file: the SHA-256 published for a file, and that file's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    /// The digest.
    pub sha256: [u8; 32],
    /// The file it is for (the name only, as written).
    pub file_name: String,
}

impl Checksum {
    /// Parses `<64 hex digits><space>[<space>|*]<file name>`, one line (a final line end is
    /// fine). The error says what is wrong.
    pub fn parse(text: &str) -> Result<Checksum, String> {
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.contains('\n') {
            return Err("more than one line".into());
        }
        let line = line.trim_start_matches('\u{feff}');
        let Some((digest, rest)) = line.split_once(' ') else {
            return Err(if line.trim().is_empty() {
                "empty".into()
            } else {
                format!("no file name after the digest in {line:?}")
            });
        };
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{digest:?} is not a SHA-256 (64 hex digits)"));
        }
        // `sha256sum` writes two spaces (text mode) or a space and `*` (binary mode).
        let name = rest
            .strip_prefix(' ')
            .or_else(|| rest.strip_prefix('*'))
            .unwrap_or(rest)
            .trim_end();
        if name.is_empty() {
            return Err("no file name after the digest".into());
        }
        let mut sha256 = [0u8; 32];
        for (i, b) in sha256.iter_mut().enumerate() {
            *b = u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Checksum {
            sha256,
            file_name: name.to_string(),
        })
    }

    /// Reads and parses the CHECKSUM file at `checksum`; `None` if there is none.
    pub fn read(checksum: &Path) -> Result<Option<Checksum>, ArchiveError> {
        let bytes = match std::fs::read(checksum) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(checksum, "read the CHECKSUM file")(e)),
        };
        let malformed = |reason: String| ArchiveError::ChecksumFormat {
            checksum: checksum.to_path_buf(),
            reason,
        };
        // A real one is about 100 bytes; refuse to parse a file put there by mistake.
        if bytes.len() > 4096 {
            return Err(malformed(format!("{} bytes long", bytes.len())));
        }
        let text = String::from_utf8(bytes).map_err(|_| malformed("not UTF-8".into()))?;
        Checksum::parse(&text).map(Some).map_err(malformed)
    }
}

/// The SHA-256 of `file` from its start, read [`HASH_BUF`] bytes at a time;
/// `progress(bytes_hashed)` is called after each read. Leaves the file at its end.
pub fn sha256_of(
    file: &mut File,
    path: &Path,
    mut progress: impl FnMut(u64),
) -> Result<[u8; 32], ArchiveError> {
    file.seek(SeekFrom::Start(0))
        .map_err(io_err(path, "seek"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut done = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, "read")(e)),
        };
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hasher.finalize().into())
}

/// Checks `file` (opened from `path`) against `path`'s CHECKSUM file: `Ok(Some(sha256))` when
/// it matches, `Ok(None)` when there is no CHECKSUM file; a mismatch, a malformed CHECKSUM
/// file or one naming another file is an error. Costs one read of the whole file (and
/// `progress(bytes_hashed)` calls); the CHECKSUM file is read and checked first, so a bad
/// one fails before the file is read.
pub fn verify_checksum(
    path: &Path,
    file: &mut File,
    progress: impl FnMut(u64),
) -> Result<Option<[u8; 32]>, ArchiveError> {
    let checksum = checksum_path(path);
    let Some(want) = Checksum::read(&checksum)? else {
        return Ok(None);
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if want.file_name != name {
        return Err(ArchiveError::ChecksumName {
            checksum,
            names: want.file_name,
            expected: name,
        });
    }
    let actual = sha256_of(file, path, progress)?;
    if actual != want.sha256 {
        let size = file.stream_position().map_err(io_err(path, "seek"))?;
        return Err(ArchiveError::Mismatch {
            path: path.to_path_buf(),
            expected: want.sha256,
            actual,
            size,
        });
    }
    Ok(Some(actual))
}

/// A zip archive that passed every check [`CsvArchive::open`] can make without inflating it:
/// one CSV entry named after the archive, of a sane declared size. Its CSV is read with
/// [`CsvArchive::events`].
pub struct CsvArchive {
    path: PathBuf,
    zip: ZipArchive<BufReader<File>>,
    entry: String,
    /// Declared uncompressed size; at most [`MAX_RATIO`] × `compressed`.
    size: u64,
    compressed: u64,
}

impl fmt::Debug for CsvArchive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsvArchive")
            .field("path", &self.path)
            .field("entry", &self.entry)
            .field("size", &self.size)
            .field("compressed", &self.compressed)
            .finish()
    }
}

impl CsvArchive {
    /// Opens `path` and checks it (see the module docs, step 2).
    pub fn open(path: &Path) -> Result<CsvArchive, ArchiveError> {
        let file = File::open(path).map_err(io_err(path, "open the archive"))?;
        CsvArchive::from_file(path, file)
    }

    /// [`CsvArchive::open`] on a file already open (the one [`verify_checksum`] hashed, so
    /// that what is replayed is what was verified). Reads the central directory and the
    /// entry's local header; inflates nothing.
    pub fn from_file(path: &Path, file: File) -> Result<CsvArchive, ArchiveError> {
        let expected = expected_entry(path)?;
        let not_zip = |error| ArchiveError::NotZip {
            path: path.to_path_buf(),
            error,
        };
        let mut zip = ZipArchive::new(BufReader::with_capacity(RAW_BUF, file)).map_err(not_zip)?;
        if zip.len() != 1 {
            return Err(ArchiveError::Entries {
                path: path.to_path_buf(),
                count: zip.len(),
                names: zip.file_names().take(LISTED).map(str::to_string).collect(),
                expected,
            });
        }
        // The raw entry: its metadata, and its local header checked, with nothing inflated.
        let first = zip.name_for_index(0).unwrap_or("?").to_string();
        let raw = zip.by_index_raw(0).map_err(|e| match e {
            ZipError::Io(error) => ArchiveError::Io {
                path: path.to_path_buf(),
                op: "read the entry's header",
                error,
            },
            e => ArchiveError::Unsupported {
                path: path.to_path_buf(),
                entry: first,
                reason: format!("damaged local header: {e}"),
            },
        })?;
        let entry = raw.name().to_string();
        if entry != expected {
            return Err(ArchiveError::EntryName {
                path: path.to_path_buf(),
                found: entry,
                expected,
            });
        }
        let unsupported = |reason: String| ArchiveError::Unsupported {
            path: path.to_path_buf(),
            entry: entry.clone(),
            reason,
        };
        if raw.is_dir() {
            return Err(unsupported("a directory, not a CSV file".into()));
        }
        if raw.encrypted() {
            return Err(unsupported("encrypted".into()));
        }
        let method = raw.compression();
        if !matches!(
            method,
            CompressionMethod::Stored | CompressionMethod::Deflated
        ) {
            return Err(unsupported(format!(
                "compressed with {method}; only stored and deflated entries are read"
            )));
        }
        let (size, compressed) = (raw.size(), raw.compressed_size());
        drop(raw);
        if size > compressed.saturating_mul(MAX_RATIO) {
            return Err(ArchiveError::Bomb {
                path: path.to_path_buf(),
                entry,
                size,
                compressed,
            });
        }
        Ok(CsvArchive {
            path: path.to_path_buf(),
            zip,
            entry,
            size,
            compressed,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The CSV entry's name (`<archive stem>.csv`).
    pub fn entry_name(&self) -> &str {
        &self.entry
    }

    /// The entry's declared size, in bytes of CSV text (checked against its compressed size;
    /// enforced while streaming).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The entry's compressed size in bytes.
    pub fn compressed_size(&self) -> u64 {
        self.compressed
    }

    /// How errors name the CSV inside: `ARCHIVE.zip/ENTRY.csv`.
    pub fn label(&self) -> PathBuf {
        self.path.join(&self.entry)
    }

    /// The entry's raw text, inflated as it is read, with the size limits enforced.
    pub fn entry(&mut self) -> Result<Entry<'_>, ArchiveError> {
        let (path, entry, declared) = (&self.path, &self.entry, self.size);
        let inner = self.zip.by_index(0).map_err(|e| match e {
            ZipError::Io(error) => ArchiveError::Io {
                path: path.clone(),
                op: "read the entry",
                error,
            },
            e => ArchiveError::Unsupported {
                path: path.clone(),
                entry: entry.clone(),
                reason: e.to_string(),
            },
        })?;
        Ok(Entry {
            inner,
            declared,
            read: 0,
        })
    }

    /// The entry's events, in file order, streamed (one CSV line in memory at a time).
    /// Errors while reading (damage, a size that lies) come as read errors of the line being
    /// read.
    pub fn events(
        &mut self,
        info: &FileInfo,
    ) -> Result<CsvEvents<BufReader<Entry<'_>>>, ArchiveError> {
        let label = self.label();
        let entry = self.entry()?;
        let reader = CsvReader::new(
            BufReader::with_capacity(TEXT_BUF, entry),
            info.kind,
            &info.symbol,
            info.interval.as_deref(),
        )
        .map_err(|error| ArchiveError::Csv { label, error })?;
        Ok(CsvEvents::InFileOrder(reader))
    }
}

/// The text of an archive's entry, inflated as it is read. Fails, rather than go on, when
/// the text grows past the declared size (a zip bomb whose header lies: the declared size was
/// bounded by [`MAX_RATIO`] when the archive was opened), when it ends short of it, or when
/// the entry is damaged (its CRC-32, or a bad deflate stream).
pub struct Entry<'a> {
    inner: ZipFile<'a, BufReader<File>>,
    declared: u64,
    /// Bytes of text given out so far.
    read: u64,
}

impl Read for Entry<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the archive's entry is damaged (cannot inflate it): {e}"),
            )
        })?;
        self.read += n as u64;
        if self.read > self.declared {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the archive's entry inflates past its declared {} bytes (a zip bomb, or \
                     a damaged archive); stopped",
                    self.declared
                ),
            ));
        }
        if n == 0 && !buf.is_empty() && self.read < self.declared {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive's entry ends after {} of its declared {} bytes (a damaged \
                     archive)",
                    self.read, self.declared
                ),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{self, FileKind};
    use crate::test_util::{data, TempPath};
    use aegis_shm_client::event::AnyEvent;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    const KLINES: &str = "BTCUSDT-1m-2024-09-21";

    /// A test directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = TempPath::new(tag);
            std::fs::create_dir(p.path()).unwrap();
            Dir(p.0.clone())
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Writes a zip at `path` with `entries` (name, bytes), deflated.
    fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let mut w = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, bytes) in entries {
            w.start_file(*name, opts).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap();
    }

    fn klines_csv() -> Vec<u8> {
        std::fs::read(data(&format!("{KLINES}.csv"))).unwrap()
    }

    fn write_checksum(zip: &Path, name: &str) {
        let digest: [u8; 32] = Sha256::digest(std::fs::read(zip).unwrap()).into();
        std::fs::write(checksum_path(zip), format!("{}  {name}\n", hex(&digest))).unwrap();
    }

    fn all_events(a: &mut CsvArchive, info: &FileInfo) -> Vec<(u64, AnyEvent)> {
        a.events(info)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// Little-endian u32 at `at`.
    fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
        bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Offsets of the local header (PK\3\4) and central header (PK\1\2) of a one-entry zip.
    fn headers(bytes: &[u8]) -> (usize, usize) {
        let local = bytes.windows(4).position(|w| w == b"PK\x03\x04").unwrap();
        let central = bytes.windows(4).rposition(|w| w == b"PK\x01\x02").unwrap();
        (local, central)
    }

    #[test]
    fn streams_the_same_events_as_the_plain_csv() {
        let dir = Dir::new("zip-same");
        let zip = dir.0.join(format!("{KLINES}.zip"));
        write_zip(&zip, &[(&format!("{KLINES}.csv"), &klines_csv())]);
        let info = names::infer(&zip).unwrap();
        assert_eq!(info, names::infer(&data(&format!("{KLINES}.csv"))).unwrap());
        let mut a = CsvArchive::open(&zip).unwrap();
        assert_eq!(a.entry_name(), format!("{KLINES}.csv"));
        assert_eq!(a.size(), klines_csv().len() as u64);
        assert!(a.compressed_size() < a.size());
        let want: Vec<_> = CsvReader::open(&data(&format!("{KLINES}.csv")), &info)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(want.len(), 1440);
        assert_eq!(all_events(&mut a, &info), want);
        // Stored (not deflated) entries are read too.
        let stored = dir.0.join(format!("{KLINES}.ZIP"));
        let mut w = zip::ZipWriter::new(File::create(&stored).unwrap());
        w.start_file(
            format!("{KLINES}.csv"),
            SimpleFileOptions::default().compression_method(CompressionMethod::Stored),
        )
        .unwrap();
        w.write_all(&klines_csv()).unwrap();
        w.finish().unwrap();
        assert!(is_archive(&stored));
        assert_eq!(
            all_events(&mut CsvArchive::open(&stored).unwrap(), &info),
            want
        );
    }

    #[test]
    fn checksums_verify_and_mismatch_names_both_hashes() {
        let dir = Dir::new("zip-sum");
        let name = format!("{KLINES}.zip");
        let zip = dir.0.join(&name);
        write_zip(&zip, &[(&format!("{KLINES}.csv"), &klines_csv())]);
        let open = || File::open(&zip).unwrap();
        // No CHECKSUM file: nothing to check.
        assert_eq!(verify_checksum(&zip, &mut open(), |_| {}).unwrap(), None);
        write_checksum(&zip, &name);
        let mut seen = 0;
        let got = verify_checksum(&zip, &mut open(), |b| seen = b).unwrap();
        let want: [u8; 32] = Sha256::digest(std::fs::read(&zip).unwrap()).into();
        assert_eq!(got, Some(want));
        assert_eq!(seen, std::fs::metadata(&zip).unwrap().len());

        // One byte changed in the middle.
        let mut bytes = std::fs::read(&zip).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&zip, &bytes).unwrap();
        let actual: [u8; 32] = Sha256::digest(&bytes).into();
        let e = verify_checksum(&zip, &mut open(), |_| {}).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArchiveError::Mismatch { .. }), "{msg}");
        assert!(msg.contains(&hex(&want)), "{msg}");
        assert!(msg.contains(&hex(&actual)), "{msg}");
        assert!(msg.contains(&name), "{msg}");

        // A CHECKSUM for another file.
        std::fs::write(
            checksum_path(&zip),
            format!("{}  ETHUSDT-1m-2024-09-21.zip\n", hex(&actual)),
        )
        .unwrap();
        let e = verify_checksum(&zip, &mut open(), |_| {}).unwrap_err();
        assert!(matches!(e, ArchiveError::ChecksumName { .. }), "{e}");

        // Malformed CHECKSUM files.
        for bad in [
            "",
            "\n",
            "deadbeef  x.zip\n",
            &format!("{}\n", hex(&actual)),
            &format!("{} \n", hex(&actual)),
            &format!("{}  {name}\n{}  {name}\n", hex(&actual), hex(&actual)),
            &format!("{}  {name}\n", "g".repeat(64)),
        ] {
            std::fs::write(checksum_path(&zip), bad).unwrap();
            let e = verify_checksum(&zip, &mut open(), |_| {}).unwrap_err();
            assert!(
                matches!(e, ArchiveError::ChecksumFormat { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("malformed CHECKSUM"), "{e}");
        }
    }

    #[test]
    fn checksum_lines_parse_as_sha256sum_writes_them() {
        let h = "ab".repeat(32);
        for (text, name) in [
            (format!("{h}  x.zip\n"), "x.zip"),
            (format!("{h} *x.zip"), "x.zip"),
            (format!("{}  x.zip\r\n", h.to_uppercase()), "x.zip"),
            (format!("{h}  a b.zip\n"), "a b.zip"),
        ] {
            let c = Checksum::parse(&text).unwrap();
            assert_eq!(c.file_name, name, "{text:?}");
            assert_eq!(c.sha256, [0xab; 32]);
        }
    }

    #[test]
    fn structure_errors_are_specific() {
        let dir = Dir::new("zip-bad");
        let csv = klines_csv();
        let entry = format!("{KLINES}.csv");
        let zip = dir.0.join(format!("{KLINES}.zip"));

        // Two entries.
        write_zip(&zip, &[(&entry, &csv), ("README.txt", b"hello")]);
        let e = CsvArchive::open(&zip).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArchiveError::Entries { count: 2, .. }), "{msg}");
        assert!(msg.contains("README.txt") && msg.contains(&entry), "{msg}");

        // None.
        write_zip(&zip, &[]);
        let e = CsvArchive::open(&zip).unwrap_err();
        assert!(matches!(e, ArchiveError::Entries { count: 0, .. }), "{e}");

        // Another name.
        write_zip(&zip, &[("BTCUSDT-1m-2024-09-22.csv", &csv)]);
        let e = CsvArchive::open(&zip).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArchiveError::EntryName { .. }), "{msg}");
        assert!(msg.contains("BTCUSDT-1m-2024-09-22.csv"), "{msg}");

        // Truncated, at several points (the central directory is at the end).
        write_zip(&zip, &[(&entry, &csv)]);
        let whole = std::fs::read(&zip).unwrap();
        for keep in [0, 10, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&zip, &whole[..keep]).unwrap();
            let e = CsvArchive::open(&zip).unwrap_err();
            assert!(matches!(e, ArchiveError::NotZip { .. }), "{keep}: {e}");
            assert!(e.to_string().contains("truncated or damaged"), "{e}");
        }

        // Not a zip at all.
        std::fs::write(&zip, &csv).unwrap();
        assert!(matches!(
            CsvArchive::open(&zip).unwrap_err(),
            ArchiveError::NotZip { .. }
        ));

        // An archive name that gives no entry name.
        let odd = dir.0.join("archive.bin");
        write_zip(&odd, &[(&entry, &csv)]);
        assert!(matches!(
            CsvArchive::open(&odd).unwrap_err(),
            ArchiveError::ArchiveName { .. }
        ));
    }

    #[test]
    fn a_declared_size_past_the_ratio_is_a_bomb() {
        let dir = Dir::new("zip-bomb");
        let zip = dir.0.join(format!("{KLINES}.zip"));
        // 8 MiB of blank lines deflate about 1000 times.
        write_zip(&zip, &[(&format!("{KLINES}.csv"), &vec![b'\n'; 8 << 20])]);
        let e = CsvArchive::open(&zip).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArchiveError::Bomb { .. }), "{msg}");
        assert!(msg.contains("zip bomb") && msg.contains("200"), "{msg}");
    }

    /// The same bomb, with its declared sizes (local and central headers) rewritten to pass
    /// the ratio check: the stream stops when the text grows past the declared size.
    #[test]
    fn a_size_that_lies_is_caught_while_streaming() {
        let dir = Dir::new("zip-lie");
        let zip = dir.0.join(format!("{KLINES}.zip"));
        let line = b"1726876800000,1,1,1,1,1,1726876859999,1,1,1,1,0\n";
        let text: Vec<u8> = line.iter().copied().cycle().take(4 << 20).collect();
        write_zip(&zip, &[(&format!("{KLINES}.csv"), &text)]);
        let mut bytes = std::fs::read(&zip).unwrap();
        let (local, central) = headers(&bytes);
        let compressed = u32::from_le_bytes(bytes[central + 20..central + 24].try_into().unwrap());
        let lie = compressed * 10;
        put_u32(&mut bytes, local + 22, lie);
        put_u32(&mut bytes, central + 24, lie);
        std::fs::write(&zip, &bytes).unwrap();
        let info = names::infer(&zip).unwrap();
        let mut a = CsvArchive::open(&zip).unwrap();
        assert_eq!(a.size(), u64::from(lie));
        let e = a.events(&info).unwrap().find_map(Result::err).unwrap();
        let msg = e.to_string();
        assert!(msg.contains("inflates past its declared"), "{msg}");
        assert!(msg.contains(&lie.to_string()), "{msg}");

        // A declared size larger than the text: the stream ends short, an error too.
        let mut csv = klines_csv();
        csv.truncate(csv.len() / 2);
        csv.truncate(csv.iter().rposition(|&b| b == b'\n').unwrap() + 1);
        write_zip(&zip, &[(&format!("{KLINES}.csv"), &csv)]);
        let mut bytes = std::fs::read(&zip).unwrap();
        let (local, central) = headers(&bytes);
        let more = csv.len() as u32 + 100;
        put_u32(&mut bytes, local + 22, more);
        put_u32(&mut bytes, central + 24, more);
        std::fs::write(&zip, &bytes).unwrap();
        let mut a = CsvArchive::open(&zip).unwrap();
        let e = a.events(&info).unwrap().find_map(Result::err).unwrap();
        assert!(e.to_string().contains("ends after"), "{e}");
    }

    /// A stored entry with one digit changed: every line still parses, and the CRC-32 check
    /// at the end of the entry fails.
    #[test]
    fn damage_inside_the_entry_is_a_read_error() {
        let dir = Dir::new("zip-crc");
        let zip = dir.0.join(format!("{KLINES}.zip"));
        let mut w = zip::ZipWriter::new(File::create(&zip).unwrap());
        w.start_file(
            format!("{KLINES}.csv"),
            SimpleFileOptions::default().compression_method(CompressionMethod::Stored),
        )
        .unwrap();
        w.write_all(&klines_csv()).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&zip).unwrap();
        let (local, _) = headers(&bytes);
        let name_len = u16::from_le_bytes([bytes[local + 26], bytes[local + 27]]) as usize;
        let extra_len = u16::from_le_bytes([bytes[local + 28], bytes[local + 29]]) as usize;
        let data = local + 30 + name_len + extra_len;
        // The first line's trade count (column 9): 2464 -> 2465.
        let line_end = data + bytes[data..].iter().position(|&b| b == b'\n').unwrap();
        let at = data
            + bytes[data..line_end]
                .windows(5)
                .position(|w| w == b",2464")
                .unwrap()
            + 4;
        bytes[at] = b'5';
        std::fs::write(&zip, &bytes).unwrap();
        let info = names::infer(&zip).unwrap();
        let mut a = CsvArchive::open(&zip).unwrap();
        let mut events = a.events(&info).unwrap();
        let mut n = 0;
        let e = loop {
            match events.next().unwrap() {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 1440, "every line parses");
        let msg = e.to_string();
        assert!(msg.contains("entry is damaged"), "{msg}");
        assert!(events.next().is_none());
    }

    #[test]
    fn kinds_come_from_the_archive_name() {
        for (name, kind) in [
            ("BTCUSDT-trades-2024-09-21.zip", FileKind::Trade),
            ("BTCUSDT-aggTrades-2024-09.zip", FileKind::AggTrade),
            ("BTCUSDT-bookTicker-2024-09-21.zip", FileKind::BookTicker),
            ("BTCUSDT-1h-2024-08.zip", FileKind::Kline),
        ] {
            assert_eq!(names::infer(Path::new(name)).unwrap().kind, kind);
            let stem = name.strip_suffix(".zip").unwrap();
            assert_eq!(
                expected_entry(Path::new(name)).unwrap(),
                format!("{stem}.csv")
            );
            assert_eq!(names::default_source_name(Path::new(name)).unwrap(), stem);
        }
    }
}
