//! The directory trees of a run's snapshot, written by Offsite.
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
use std::ffi::OsString;

use rustic_core::repofile::{MasterKey, Metadata, Node, NodeType, Tree};
use rustic_core::{Id, TreeId, WriteBackend};

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
        let mut tree = Tree::default();
        for (name, sub) in dir.dirs {
            let id = self.add_dir(sub, meta)?;
            let mut node = Node::new_node(&name, NodeType::Dir, meta.clone());
            node.meta.mode = Some(0o700);
            node.subtree = Some(id);
            tree.nodes.push(node);
        }
        tree.nodes.extend(dir.files.into_values());
        // restic keeps a tree's nodes sorted by name.
        tree.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let (bytes, id) = tree.serialize().map_err(|e| format!("cannot serialise a tree: {e:?}"))?;
        if !self.blobs.iter().any(|(have, _)| *have == *id) {
            self.blobs.push((*id, bytes));
        }
        Ok(id)
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
