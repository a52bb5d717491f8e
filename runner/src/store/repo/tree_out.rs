//! An archive into a repository as a tree: one node per entry, as
//! `restic backup DIR` stores a directory (see `store/tree.rs`).
//!
//! The walk gives the entries depth first, each directory before what it
//! holds. A directory's tree is stored as soon as the walk has left it,
//! so memory holds the directories on the way down, not the whole tree.
//! A regular file is chunked and packed through the archive's one
//! packing session, unless the site's last good run has a node for it
//! at the same path with the same size, modification time, change time
//! and inode, whose chunks the repository still has: then those chunks
//! are named again and the file is not read (restic's rule for a parent
//! snapshot).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustic_core::repofile::{Metadata, Node, NodeType, Tree};
use rustic_core::{IndexedFullStatus, Repository, TreeId};

use super::outlet::{Archived, Target};
use super::packer::Session;
use super::render::read_tree;
use super::trees::{self, node_of};
use crate::store::tree::{self as tar_tree, Entry, EntryMeta, TreeDone, TreeOut};

/// At most this many of the parent's directories are kept read.
const PARENT_CACHE: usize = 1024;
/// At most this many threads compress and seal an archive's chunks.
const MAX_WORKERS: usize = 4;

/// A directory the walk is in: its node, and what is in it so far.
struct Open {
    path: PathBuf,
    node: Node,
    children: Vec<Node>,
}

/// The archive's output in the repository.
pub struct RepoTree {
    session: Option<Session>,
    target: Target,
    archived: Arc<Archived>,
    /// Its path in the snapshot.
    path: String,
    parent: Option<Parent>,
    /// Each member's node, once its walk is done.
    members: Vec<(PathBuf, Node)>,
    open: Vec<Open>,
    bytes: u64,
    entries: u64,
    reused: u64,
}

impl RepoTree {
    pub fn start(target: &Target, archived: Arc<Archived>, path: String, parent: Option<TreeId>) -> io::Result<Self> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
        let session = Session::new(Arc::clone(&target.known), &target.sink, workers)?;
        let parent = parent.map(|root| Parent { repo: Arc::clone(&target.known.repo), root, dirs: HashMap::new() });
        Ok(RepoTree {
            session: Some(session),
            target: target.clone(),
            archived,
            path,
            parent,
            members: Vec::new(),
            open: Vec::new(),
            bytes: 0,
            entries: 0,
            reused: 0,
        })
    }

    fn session(&mut self) -> io::Result<&mut Session> {
        self.session.as_mut().ok_or_else(|| io::Error::other("the archive's packing session has ended"))
    }

    /// Puts `node` (at `path`) into the directory it is in, or records it
    /// as a member's own node.
    fn place(&mut self, path: &Path, node: Node) {
        match self.open.last_mut() {
            Some(dir) => dir.children.push(node),
            None => self.members.push((path.to_path_buf(), node)),
        }
    }

    /// Stores the innermost open directory's tree.
    fn close(&mut self) -> io::Result<()> {
        let Some(Open { path, mut node, children }) = self.open.pop() else { return Ok(()) };
        let tree = Tree { nodes: children };
        let session = self.session()?;
        let id = trees::serialise(tree, &mut |bytes| session.tree(bytes).map(TreeId::from).map_err(|e| e.to_string()))
            .map_err(io::Error::other)?;
        node.subtree = Some(id);
        self.place(&path, node);
        Ok(())
    }

    /// The chunks of the parent's node for `path`, when that node is
    /// the same file and the repository has all of them.
    fn unchanged(&mut self, path: &Path, meta: &EntryMeta) -> Option<Vec<rustic_core::DataId>> {
        let old = self.parent.as_mut()?.node(path)?;
        let same = old.node_type == NodeType::File
            && old.meta.size == meta.size
            && old.meta.inode == meta.ino
            && old.meta.mtime.map(|t| (t.as_second(), t.subsec_nanosecond()))
                == Some((meta.mtime, meta.mtime_ns as i32))
            && old.meta.ctime.map(|t| (t.as_second(), t.subsec_nanosecond()))
                == Some((meta.ctime, meta.ctime_ns as i32));
        let content = old.content?;
        let session = self.session.as_ref()?;
        (same && content.iter().all(|id| session.has(id))).then_some(content)
    }
}

impl TreeOut for RepoTree {
    fn member(&mut self, _member: &Path) -> io::Result<()> {
        while !self.open.is_empty() {
            self.close()?;
        }
        Ok(())
    }

    fn add(&mut self, path: &Path, meta: &EntryMeta, entry: Entry<'_>) -> io::Result<()> {
        // Leave the directories this entry is not in: they are complete.
        while self.open.last().is_some_and(|dir| path == dir.path || !path.starts_with(&dir.path)) {
            self.close()?;
        }
        let link = match &entry {
            Entry::Symlink(target) => Some(*target),
            _ => None,
        };
        let header = tar_tree::tar_header(path, meta, link)?.len() as u64;
        let name: &OsStr = path.file_name().unwrap_or(path.as_os_str());
        self.entries += 1;
        let node = match entry {
            Entry::Dir => {
                self.bytes += header;
                let node = node_of(name, meta, NodeType::Dir);
                self.open.push(Open { path: path.to_path_buf(), node, children: Vec::new() });
                return Ok(());
            }
            Entry::Symlink(target) => node_of(name, meta, NodeType::from_link(target)),
            Entry::Special => {
                let device = meta.rdev;
                let kind = match meta.mode & libc::S_IFMT {
                    libc::S_IFCHR => NodeType::Chardev { device },
                    libc::S_IFBLK => NodeType::Dev { device },
                    _ => NodeType::Fifo,
                };
                node_of(name, meta, kind)
            }
            Entry::File(reader) => {
                let content = match self.unchanged(path, meta) {
                    Some(content) => {
                        self.reused += 1;
                        content
                    }
                    None => {
                        let (content, read) = self.session()?.file_sized(reader, meta.size)?;
                        if read != meta.size {
                            return Err(io::Error::other(format!(
                                "{} bytes were read, but the file has {}",
                                read, meta.size
                            )));
                        }
                        content
                    }
                };
                let mut node = node_of(name, meta, NodeType::File);
                node.content = Some(content);
                self.bytes += meta.size + tar_tree::padding(meta.size) as u64;
                node
            }
        };
        self.bytes += header;
        self.place(path, node);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> io::Result<TreeDone> {
        while !self.open.is_empty() {
            self.close()?;
        }
        // The members at their paths, beneath directories that only lead
        // to them.
        let mut root = trees::Dir::default();
        for (path, node) in std::mem::take(&mut self.members) {
            root.insert(&path, node).map_err(io::Error::other)?;
        }
        let meta =
            Metadata { mode: Some(0o700), mtime: Some(rustic_core::jiff::Timestamp::now()), ..Metadata::default() };
        let mut session = self.session.take().ok_or_else(|| io::Error::other("the archive was finished twice"))?;
        let id = root
            .store(&meta, &mut |bytes| session.tree(bytes).map(TreeId::from).map_err(|e| e.to_string()))
            .map_err(io::Error::other)?;
        // Its packs and their index are written before anything names
        // them; then later outputs of the run may name its blobs too.
        let new = session.finish()?;
        self.target.known.add(new);
        self.archived.trees.lock().unwrap_or_else(|e| e.into_inner()).push((self.path.clone(), id));
        log::debug!(
            target: "offsite::store",
            "{}: {} entries, {} files unchanged since the last good run (not read)",
            crate::text::escape(&self.path),
            self.entries,
            self.reused
        );
        Ok(TreeDone {
            id: id.to_hex().as_str().to_string(),
            bytes: self.bytes + tar_tree::END as u64,
            entries: self.entries,
            unread: self.reused,
        })
    }
}

/// A directory of the parent, by name.
type Listing = HashMap<OsString, Node>;

/// The same archive in the site's last good run, read as needed.
struct Parent {
    repo: Arc<Repository<IndexedFullStatus>>,
    root: TreeId,
    /// Its directories read so far, by path (`None`: not there).
    dirs: HashMap<PathBuf, Option<Arc<Listing>>>,
}

impl Parent {
    /// The directory at `path` (empty: the archive's root).
    fn dir(&mut self, path: &Path) -> Option<Arc<Listing>> {
        if let Some(known) = self.dirs.get(path) {
            return known.clone();
        }
        let tree = match path.parent() {
            None => read_tree(&self.repo, &self.root).ok(),
            Some(up) => {
                let up = self.dir(up)?;
                let node = up.get(path.file_name()?).filter(|n| n.is_dir())?;
                read_tree(&self.repo, node.subtree.as_ref()?).ok()
            }
        };
        let listing =
            tree.map(|t| Arc::new(t.nodes.into_iter().map(|n| (n.name().into_owned(), n)).collect::<Listing>()));
        if self.dirs.len() >= PARENT_CACHE {
            self.dirs.clear();
        }
        self.dirs.insert(path.to_path_buf(), listing.clone());
        listing
    }

    /// The node at `path`, if the parent has one.
    fn node(&mut self, path: &Path) -> Option<Node> {
        let dir = self.dir(path.parent().unwrap_or(Path::new("")))?;
        dir.get(path.file_name()?).cloned()
    }
}
