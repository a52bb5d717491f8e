//! An archive stored as a tree, read back as the tar the walk would
//! have written (see `store/tree.rs`), with its evidence checked as it
//! goes: the root tree is the one the manifest names, every tree and
//! every chunk hashes to its id, every file's chunks add up to its
//! size, and the tar is as long as the manifest says. A lie anywhere is
//! an error of the read, never bytes passed on as the backup's.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rustic_core::repofile::{BlobType, Node, NodeType, Tree};
use rustic_core::{BlobId, DataId, Id, IndexedFullStatus, Repository, TreeId};
use sha2::{Digest, Sha256};

use super::rustic_text;
use super::trees::entry_of;
use crate::store::tree::{END, padding, tar_header};

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A blob, checked against its id.
fn blob(repo: &Repository<IndexedFullStatus>, id: &Id, kind: BlobType) -> io::Result<Bytes> {
    let bytes = repo
        .get_blob_cached(&BlobId::from(*id), kind)
        .map_err(|e| corrupt(format!("cannot read blob {}: {}", id.to_hex().as_str(), rustic_text(&e))))?;
    if Id::new(Sha256::digest(&bytes).into()) != *id {
        return Err(corrupt(format!("blob {} does not hash to its id", id.to_hex().as_str())));
    }
    Ok(bytes)
}

/// A tree, checked against its id.
pub fn read_tree(repo: &Repository<IndexedFullStatus>, id: &TreeId) -> io::Result<Tree> {
    let bytes = blob(repo, id, BlobType::Tree)?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("tree {} is not a tree: {e}", id.to_hex().as_str())))
}

/// What is still to be read, last first.
enum Item {
    Node(PathBuf, Box<Node>),
    Chunk(DataId),
    /// The end of a file of this size: its chunks must have held it.
    FileEnd(u64),
    End,
}

/// The tar of an archive stored as a tree.
pub struct TreeTar {
    repo: Arc<Repository<IndexedFullStatus>>,
    todo: Vec<Item>,
    piece: Bytes,
    /// Bytes of the current file so far.
    file: u64,
    /// Bytes given out, and the manifest's length.
    given: u64,
    expected: u64,
    /// A read failed: every later read fails the same way.
    failed: Option<String>,
}

impl TreeTar {
    /// The tar of the tree `root` (the manifest's), its `members` (the
    /// archive's sources, in order) `expected` bytes long.
    pub fn new(
        repo: Arc<Repository<IndexedFullStatus>>,
        root: TreeId,
        members: &[String],
        expected: u64,
    ) -> io::Result<TreeTar> {
        let mut todo = vec![Item::End];
        for member in members.iter().rev() {
            let node = find(&repo, root, Path::new(member))?;
            todo.push(Item::Node(PathBuf::from(member), Box::new(node)));
        }
        Ok(TreeTar { repo, todo, piece: Bytes::new(), file: 0, given: 0, expected, failed: None })
    }

    /// The next piece of the tar; empty at its end.
    fn next(&mut self) -> io::Result<Bytes> {
        let Some(item) = self.todo.pop() else { return Ok(Bytes::new()) };
        Ok(match item {
            Item::Node(path, node) => {
                let meta = entry_of(&node).map_err(corrupt)?;
                let link = match &node.node_type {
                    NodeType::Symlink { .. } => Some(node.node_type.to_link().to_path_buf()),
                    _ => None,
                };
                let header = tar_header(&path, &meta, link.as_deref())?;
                match node.node_type {
                    NodeType::Dir => {
                        let id = node
                            .subtree
                            .ok_or_else(|| corrupt(format!("{}: a directory without a tree", path.display())))?;
                        let mut children = read_tree(&self.repo, &id)?.nodes;
                        // The walk's order: by name, byte for byte.
                        children.sort_by_cached_key(|n| n.name().into_owned());
                        for child in children.into_iter().rev() {
                            self.todo.push(Item::Node(path.join(child.name()), Box::new(child)));
                        }
                    }
                    NodeType::File => {
                        self.file = 0;
                        self.todo.push(Item::FileEnd(meta.size));
                        for id in node.content.unwrap_or_default().into_iter().rev() {
                            self.todo.push(Item::Chunk(id));
                        }
                    }
                    _ => {}
                }
                Bytes::from(header)
            }
            Item::Chunk(id) => {
                let data = blob(&self.repo, &id, BlobType::Data)?;
                self.file += data.len() as u64;
                data
            }
            Item::FileEnd(size) => {
                if self.file != size {
                    return Err(corrupt(format!("a file's chunks hold {} bytes, its node says {size}", self.file)));
                }
                Bytes::from_static(&[0; 512]).slice(..padding(size))
            }
            Item::End => Bytes::from_static(&[0; END]),
        })
    }
}

impl Read for TreeTar {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(corrupt(why.clone()));
        }
        self.fill(out).inspect_err(|e| self.failed = Some(e.to_string()))
    }
}

impl TreeTar {
    fn fill(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.piece.is_empty() {
            self.piece = self.next()?;
            if self.piece.is_empty() && self.todo.is_empty() {
                if self.given != self.expected {
                    return Err(corrupt(format!(
                        "the tree gives {} bytes, the manifest says {}",
                        self.given, self.expected
                    )));
                }
                return Ok(0);
            }
            if self.given + self.piece.len() as u64 > self.expected {
                return Err(corrupt(format!("the tree gives more than the {} bytes the manifest says", self.expected)));
            }
        }
        let n = out.len().min(self.piece.len());
        out[..n].copy_from_slice(&self.piece[..n]);
        self.piece = self.piece.slice(n..);
        self.given += n as u64;
        Ok(n)
    }
}

/// The node at `path` beneath tree `root`, every tree on the way checked.
fn find(repo: &Repository<IndexedFullStatus>, root: TreeId, path: &Path) -> io::Result<Node> {
    let mut tree = root;
    let mut parts = path.iter().peekable();
    while let Some(name) = parts.next() {
        let nodes = read_tree(repo, &tree)?.nodes;
        let node = nodes
            .into_iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| corrupt(format!("{} is not in its tree", path.display())))?;
        if parts.peek().is_none() {
            return Ok(node);
        }
        tree = node
            .subtree
            .filter(|_| node.node_type == NodeType::Dir)
            .ok_or_else(|| corrupt(format!("{} is not in its tree", path.display())))?;
    }
    Err(corrupt("an empty member path".into()))
}
