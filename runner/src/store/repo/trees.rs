//! The directory trees of a run's snapshot, written by Offsite, and the
//! nodes of an archive stored as a tree (`tree_out.rs`).
//!
//! rustic_core archives each file on its own (see `outlet.rs`), and the
//! file's node in what it makes says size 0: the size of a stream is
//! known only at its end. restic's `restore` takes a node's size as the
//! file's, so the run's end writes the snapshot's trees itself: every
//! file's node as rustic made it (its content, the chunks), with the
//! size the run counted, in directories built from the files' paths.
//!
//! The trees go into one pack, and the pack into one index file, written
//! as `packer.rs` writes data packs: each blob encrypted (nonce,
//! AES-256-CTR, Poly1305-AES MAC, as `lock.rs` does it) and stored
//! uncompressed (a pack header entry of type 1).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use rustic_core::jiff::Timestamp;
use rustic_core::repofile::{MasterKey, Metadata, Node, NodeType, Tree};
use rustic_core::{Id, TreeId, WriteBackend};
use sha2::{Digest, Sha256};

use crate::store::tree::EntryMeta;

use super::lock::encrypt;
use super::packer::{Placed, write_index, write_pack};

/// A directory of the snapshot being built.
#[derive(Default)]
pub struct Dir {
    dirs: BTreeMap<OsString, Dir>,
    files: BTreeMap<OsString, Node>,
}

impl Dir {
    /// Places `node` at `path` (relative, already checked by the policy:
    /// no `..`, no absolute path). A path given twice is an error.
    pub fn insert(&mut self, path: &std::path::Path, node: Node) -> Result<(), String> {
        let mut parts: Vec<OsString> = path.iter().map(OsString::from).collect();
        let name = parts.pop().ok_or("an empty path")?;
        let mut here = self;
        for part in parts {
            if here.files.contains_key(&part) {
                return Err(format!("{} is both a file and a directory", path.display()));
            }
            here = here.dirs.entry(part).or_default();
        }
        if here.dirs.contains_key(&name) || here.files.insert(name, node).is_some() {
            return Err(format!("{} is in the run twice", path.display()));
        }
        Ok(())
    }
}

impl Dir {
    /// Serialises this directory's tree and every tree beneath it (the
    /// directories that only lead to a path, with `meta`), each through
    /// `save`, which stores it and returns its id.
    pub fn store(
        self,
        meta: &Metadata,
        save: &mut dyn FnMut(Vec<u8>) -> Result<TreeId, String>,
    ) -> Result<TreeId, String> {
        let mut tree = Tree::default();
        for (name, sub) in self.dirs {
            let id = sub.store(meta, save)?;
            let mut node = Node::new_node(&name, NodeType::Dir, meta.clone());
            node.meta.mode = Some(0o700);
            node.subtree = Some(id);
            tree.nodes.push(node);
        }
        tree.nodes.extend(self.files.into_values());
        serialise(tree, save)
    }
}

/// Sorts `tree`'s nodes by name (restic keeps them so) and stores it
/// through `save`.
pub fn serialise(mut tree: Tree, save: &mut dyn FnMut(Vec<u8>) -> Result<TreeId, String>) -> Result<TreeId, String> {
    tree.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let (bytes, _) = tree.serialize().map_err(|e| format!("cannot serialise a tree: {e:?}"))?;
    save(bytes)
}

// Go's os.FileMode bits, which restic's nodes keep as their mode.
const GO_DIR: u32 = 1 << 31;
const GO_SYMLINK: u32 = 1 << 27;
const GO_DEVICE: u32 = 1 << 26;
const GO_FIFO: u32 = 1 << 25;
const GO_SETUID: u32 = 1 << 23;
const GO_SETGID: u32 = 1 << 22;
const GO_CHARDEV: u32 = 1 << 21;
const GO_STICKY: u32 = 1 << 20;
const SPECIAL: [(u32, u32); 3] = [(GO_SETUID, 0o4000), (GO_SETGID, 0o2000), (GO_STICKY, 0o1000)];

/// `st_mode` as restic writes a node's mode.
pub fn go_mode(st_mode: u32) -> u32 {
    let mut go = st_mode & 0o777;
    for (bit, unix) in SPECIAL {
        if st_mode & unix != 0 {
            go |= bit;
        }
    }
    go | match st_mode & libc::S_IFMT {
        libc::S_IFDIR => GO_DIR,
        libc::S_IFLNK => GO_SYMLINK,
        libc::S_IFBLK => GO_DEVICE,
        libc::S_IFCHR => GO_DEVICE | GO_CHARDEV,
        libc::S_IFIFO => GO_FIFO,
        _ => 0,
    }
}

/// A node's permission bits (and set-id and sticky bits) as `st_mode`'s.
pub fn unix_mode(go: u32) -> u32 {
    let mut mode = go & 0o777;
    for (bit, unix) in SPECIAL {
        if go & bit != 0 {
            mode |= unix;
        }
    }
    mode
}

fn timestamp(seconds: i64, nanos: u32) -> Option<Timestamp> {
    Timestamp::new(seconds, i32::try_from(nanos).unwrap_or(0)).ok()
}

/// A node for an archive's entry `name`, as `restic backup` makes one.
pub fn node_of(name: &OsStr, meta: &EntryMeta, node_type: NodeType) -> Node {
    let file = node_type == NodeType::File;
    Node::new_node(
        name,
        node_type,
        Metadata {
            mode: Some(go_mode(meta.mode)),
            mtime: timestamp(meta.mtime, meta.mtime_ns),
            atime: None,
            ctime: timestamp(meta.ctime, meta.ctime_ns),
            uid: Some(meta.uid),
            gid: Some(meta.gid),
            user: None,
            group: None,
            inode: meta.ino,
            device_id: meta.dev,
            size: if file { meta.size } else { 0 },
            links: meta.nlink,
            extended_attributes: Vec::new(),
        },
    )
}

/// What a node says of its entry, for its tar header: the inverse of
/// [`node_of`] for what a header holds.
pub fn entry_of(node: &Node) -> Result<EntryMeta, String> {
    let kind = match &node.node_type {
        NodeType::File => libc::S_IFREG,
        NodeType::Dir => libc::S_IFDIR,
        NodeType::Symlink { .. } => libc::S_IFLNK,
        NodeType::Dev { .. } => libc::S_IFBLK,
        NodeType::Chardev { .. } => libc::S_IFCHR,
        NodeType::Fifo => libc::S_IFIFO,
        NodeType::Socket => return Err("a socket node has no tar entry".into()),
    };
    let rdev = match &node.node_type {
        NodeType::Dev { device } | NodeType::Chardev { device } => *device,
        _ => 0,
    };
    let m = &node.meta;
    Ok(EntryMeta {
        mode: kind | unix_mode(m.mode.unwrap_or(0o644)),
        uid: m.uid.unwrap_or(0),
        gid: m.gid.unwrap_or(0),
        mtime: m.mtime.map_or(0, |t| t.as_second()),
        rdev,
        size: if kind == libc::S_IFREG { m.size } else { 0 },
        ..EntryMeta::default()
    })
}

/// Tree blobs on their way into one pack.
pub struct TreePack {
    blobs: Vec<(Id, Vec<u8>)>,
}

impl TreePack {
    pub fn new() -> TreePack {
        TreePack { blobs: Vec::new() }
    }

    /// Serialises `dir` and everything beneath it; returns its tree's id.
    pub fn add_dir(&mut self, dir: Dir, meta: &Metadata) -> Result<TreeId, String> {
        dir.store(meta, &mut |bytes| {
            let id = Id::new(Sha256::digest(&bytes).into());
            if !self.blobs.iter().any(|(have, _)| *have == id) {
                self.blobs.push((id, bytes));
            }
            Ok(TreeId::from(id))
        })
    }

    /// Writes the pack, then its index file.
    pub fn save(self, be: &dyn WriteBackend, key: &MasterKey) -> std::io::Result<()> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let mut body = Vec::new();
        let mut blobs = Vec::new();
        for (id, plain) in &self.blobs {
            let sealed = encrypt(key, plain)?;
            let length = u32::try_from(sealed.len()).map_err(|_| std::io::Error::other("a tree is too large"))?;
            let mut raw = [0u8; 32];
            hex::decode_to_slice(id.to_hex().as_str(), &mut raw).expect("an id is 32 bytes of hex");
            blobs.push(Placed { id: raw, tree: true, offset: body.len(), length, plain: None });
            body.extend_from_slice(&sealed);
        }
        let pack_id = write_pack(be, key, body, &blobs)?;
        write_index(be, key, &[(pack_id, blobs)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every permission, set-id and sticky bit, for every type an
    /// archive holds, goes into a node's Go-style mode and back.
    #[test]
    fn modes_go_into_nodes_and_back() {
        let types = [libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK, libc::S_IFIFO, libc::S_IFCHR, libc::S_IFBLK];
        for kind in types {
            for perm in 0..=0o7777u32 {
                let meta = EntryMeta {
                    mode: kind | perm,
                    rdev: 0x0803,
                    size: 9,
                    mtime: 1_079_833_724,
                    ..EntryMeta::default()
                };
                let node_type = match kind {
                    libc::S_IFREG => NodeType::File,
                    libc::S_IFDIR => NodeType::Dir,
                    libc::S_IFLNK => NodeType::from_link(std::path::Path::new("t")),
                    libc::S_IFIFO => NodeType::Fifo,
                    libc::S_IFCHR => NodeType::Chardev { device: meta.rdev },
                    _ => NodeType::Dev { device: meta.rdev },
                };
                let node = node_of(OsStr::new("n"), &meta, node_type);
                let back = entry_of(&node).unwrap();
                assert_eq!(back.mode, meta.mode, "{:o}", meta.mode);
                assert_eq!(back.mtime, meta.mtime);
                assert_eq!(back.size, if kind == libc::S_IFREG { 9 } else { 0 });
                let device = matches!(kind, libc::S_IFCHR | libc::S_IFBLK);
                assert_eq!(back.rdev, if device { 0x0803 } else { 0 });
            }
        }
        // Go's bits, as restic writes them.
        assert_eq!(go_mode(libc::S_IFDIR | 0o755), (1 << 31) | 0o755);
        assert_eq!(go_mode(libc::S_IFREG | 0o4711), (1 << 23) | 0o711);
        assert_eq!(go_mode(libc::S_IFLNK | 0o777), (1 << 27) | 0o777);
    }
}
