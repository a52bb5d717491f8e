//! An archive stored as a tree: one node per entry, as `restic backup
//! DIR` stores a directory, instead of one tar stream.
//!
//! A store that can (a restic repository) takes `archive.tar-gz`'s
//! entries one by one through a [`TreeOut`]. A file whose size, times and
//! inode match its node in the site's last good run is not read again:
//! its chunks are named once more, so a second run of a big tree reads
//! only what changed. Reading the output back gives the tar the walk
//! would have written, byte for byte: each entry's header comes from
//! [`tar_header`], the one function that makes them for both.
//!
//! Its evidence is the tree, not a hash of the tar: the manifest records
//! the root tree's id, which is the SHA-256 of the tree, which names each
//! file's chunks by their SHA-256 (a Merkle tree); a reader checks every
//! tree and chunk against its id, and the tar's length against the
//! manifest's.

use std::io::{self, Read};
use std::path::Path;

use tar::{EntryType, Header};

/// What the walk knows of an entry: its `lstat`, with a regular file's
/// size as its open file says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryMeta {
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_ns: u32,
    pub ctime: i64,
    pub ctime_ns: u32,
    pub ino: u64,
    pub dev: u64,
    pub rdev: u64,
    pub nlink: u64,
    pub size: u64,
}

impl EntryMeta {
    pub fn of(m: &cap_std::fs::Metadata) -> EntryMeta {
        use cap_std::fs::MetadataExt;
        EntryMeta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_ns: u32::try_from(m.mtime_nsec()).unwrap_or(0),
            ctime: m.ctime(),
            ctime_ns: u32::try_from(m.ctime_nsec()).unwrap_or(0),
            ino: m.ino(),
            dev: m.dev(),
            rdev: m.rdev(),
            nlink: m.nlink(),
            size: 0,
        }
    }

    /// The tar entry type its mode says; `None` for a socket (not
    /// archived).
    pub fn entry_type(&self) -> Option<EntryType> {
        Some(match self.mode & libc::S_IFMT {
            libc::S_IFDIR => EntryType::Directory,
            libc::S_IFLNK => EntryType::Symlink,
            libc::S_IFREG => EntryType::Regular,
            libc::S_IFIFO => EntryType::Fifo,
            libc::S_IFCHR => EntryType::Char,
            libc::S_IFBLK => EntryType::Block,
            _ => return None,
        })
    }
}

/// One entry's data, for a tree.
pub enum Entry<'a> {
    Dir,
    Symlink(&'a Path),
    /// A regular file: exactly `meta.size` bytes, read only if needed.
    File(&'a mut dyn Read),
    /// A FIFO or a device (its numbers in `meta.rdev`).
    Special,
}

/// An archive on its way into a store as a tree.
pub trait TreeOut: Send {
    /// Starts one source of the archive at `member` (its path in the
    /// tar): the entries that follow, until the next call, are it and
    /// what is beneath it, in the walk's order.
    fn member(&mut self, member: &Path) -> io::Result<()>;
    /// Adds one entry at `path` (beneath the current member, or it).
    fn add(&mut self, path: &Path, meta: &EntryMeta, entry: Entry<'_>) -> io::Result<()>;
    /// Every entry was added: stores the tree.
    fn finish(self: Box<Self>) -> io::Result<TreeDone>;
}

/// A stored tree: its root's id, its tar's length, its entries.
pub struct TreeDone {
    pub id: String,
    pub bytes: u64,
    pub entries: u64,
    /// Files not read: the same as in the last good run.
    pub unread: u64,
}

/// The bytes before an entry's data in the tar `archive.tar-gz` writes:
/// a GNU header (after a long-name entry where the path or link needs
/// one).
pub fn tar_header(path: &Path, meta: &EntryMeta, link: Option<&Path>) -> io::Result<Vec<u8>> {
    let kind = meta.entry_type().ok_or_else(|| io::Error::other("a socket has no tar entry"))?;
    let mut header = Header::new_gnu();
    header.set_mode(meta.mode & 0o7777);
    header.set_uid(meta.uid.into());
    header.set_gid(meta.gid.into());
    header.set_mtime(meta.mtime.max(0) as u64);
    header.set_size(0);
    header.set_entry_type(kind);
    let mut out = tar::Builder::new(Vec::with_capacity(512));
    match kind {
        EntryType::Symlink => {
            let target = link.ok_or_else(|| io::Error::other("a symbolic link without its target"))?;
            out.append_link(&mut header, path, target)?;
        }
        EntryType::Regular => {
            header.set_size(meta.size);
            // No data: only the header (and a long name's entry) is written.
            out.append_data(&mut header, path, io::empty())?;
        }
        EntryType::Char | EntryType::Block => {
            let (major, minor) = (rustix::fs::major(meta.rdev), rustix::fs::minor(meta.rdev));
            header.set_device_major(major)?;
            header.set_device_minor(minor)?;
            out.append_data(&mut header, path, io::empty())?;
        }
        _ => out.append_data(&mut header, path, io::empty())?,
    }
    // Only the entry: the end-of-archive blocks the builder writes when
    // dropped go into the empty vector left behind.
    Ok(std::mem::take(out.get_mut()))
}

/// Zeros after `size` bytes of data, to the next 512-byte block.
pub fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// The two zero blocks that end a tar.
pub const END: usize = 1024;
