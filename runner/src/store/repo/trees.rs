//! The directory trees of a run's snapshot, written by Offsite.
//!
//! rustic_core archives each file on its own (see `outlet.rs`), and the
//! file's node in what it makes says size 0: the size of a stream is
//! known only at its end. restic's `restore` takes a node's size as the
//! file's, so the run's end writes the snapshot's trees itself: every
//! file's node as rustic made it (its content, the chunks), with the
//! size the run counted, in directories built from the files' paths.
//!
//! The trees go into one pack, and the pack into one index file, in
//! restic's format: each blob encrypted (nonce, AES-256-CTR, Poly1305-AES
//! MAC, as `lock.rs` does it) and stored uncompressed (a pack header
//! entry of type 1), the header encrypted and followed by its length.

use std::collections::BTreeMap;
use std::ffi::OsString;

use rustic_core::repofile::{MasterKey, Metadata, Node, NodeType, Tree};
use rustic_core::{FileType, Id, TreeId, WriteBackend};
use sha2::{Digest, Sha256};

use super::lock::encrypt;

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
        let mut pack = Vec::new();
        let mut header = Vec::new();
        let mut index_blobs = Vec::new();
        for (id, plain) in &self.blobs {
            let sealed = encrypt(key, plain)?;
            let length = u32::try_from(sealed.len()).map_err(|_| std::io::Error::other("a tree is too large"))?;
            index_blobs.push(serde_json::json!({
                "id": id.to_hex().as_str(),
                "type": "tree",
                "offset": pack.len(),
                "length": length,
            }));
            header.push(1u8); // a tree blob, uncompressed
            header.extend_from_slice(&length.to_le_bytes());
            header.extend_from_slice(&hex::decode(id.to_hex().as_str()).expect("an id is hex"));
            pack.extend_from_slice(&sealed);
        }
        let sealed_header = encrypt(key, &header)?;
        pack.extend_from_slice(&sealed_header);
        pack.extend_from_slice(&(sealed_header.len() as u32).to_le_bytes());
        let pack_id = id_of(&pack)?;
        be.write_bytes(FileType::Pack, &pack_id, false, pack.into())
            .map_err(|e| std::io::Error::other(super::rustic_text(&e)))?;
        let index = serde_json::json!({
            "packs": [{ "id": pack_id.to_hex().as_str(), "blobs": index_blobs }],
        });
        let sealed_index = encrypt(key, &serde_json::to_vec(&index).expect("an index serialises"))?;
        let index_id = id_of(&sealed_index)?;
        be.write_bytes(FileType::Index, &index_id, true, sealed_index.into())
            .map_err(|e| std::io::Error::other(super::rustic_text(&e)))
    }
}

fn id_of(bytes: &[u8]) -> std::io::Result<Id> {
    hex::encode(Sha256::digest(bytes)).parse::<Id>().map_err(|e| std::io::Error::other(e.to_string()))
}
