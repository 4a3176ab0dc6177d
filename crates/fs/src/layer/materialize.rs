//! Whole-file copies for FUSE passthrough: which local file already holds a file's
//! exact content, assembling one from cached chunks when several make up the file, and
//! where a chunk's bytes sit in such a copy (which replaces the chunk files).

use std::path::PathBuf;

use estargz::NodeId;
use tracing::{error, warn};

use super::ChunkRef;
use super::Layer;
use crate::cache::{InFile, Key};

impl Layer {
    /// A local file that already holds exactly the content of regular file `id`, for
    /// FUSE passthrough: the cached chunk itself when one chunk is the whole file (most
    /// files, and no copy at all), else a whole-file copy made by [`Layer::materialize`].
    pub fn backing_file(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        if let Some(key) = self.sole_chunk(id, node) {
            return self.cache.verified_chunk_file(&key);
        }
        self.cache.verified_file(&node.digest?, node.size)
    }

    /// Where chunk `r` would sit in the whole-file copy of its file: `None` for a file
    /// that is its one chunk (it never gets a copy) or has no digest to name one by.
    pub(super) fn in_file(&self, r: ChunkRef) -> Option<InFile> {
        let node = self.index.node(r.0);
        if self.sole_chunk(r.0, node).is_some() {
            return None;
        }
        let c = node.chunks.get(r.1)?;
        Some(InFile {
            file: node.digest?,
            file_size: node.size,
            offset: c.file_offset,
            len: c.size,
        })
    }

    /// The key of the one chunk that is the whole of `node`, if there is such a chunk.
    fn sole_chunk(&self, id: NodeId, node: &estargz::Node) -> Option<Key> {
        match node.chunks.as_slice() {
            [only] if only.file_offset == 0 && only.size == node.size => Some(self.key_of((id, 0))),
            _ => None,
        }
    }

    /// Whether [`Layer::materialize`] could give `id` a backing file without the
    /// network: a disk cache, and either a copy on disk it has not checked yet or every
    /// chunk cached. Cheap checks first: this runs on the FUSE open path.
    pub fn materializable(&self, id: NodeId) -> bool {
        if self.cache.dir().is_none() {
            return false;
        }
        let Ok(node) = self.regular(id) else {
            return false;
        };
        if let Some(key) = self.sole_chunk(id, node) {
            return self.cache.chunk_file(&key).is_some();
        }
        node.digest
            .and_then(|d| self.cache.file_path(&d))
            .is_some_and(|p| p.exists())
            || (0..node.chunks.len()).all(|i| self.cache.contains(&self.key_of((id, i)), None))
    }

    /// A local file holding exactly the content of regular file `id`, for FUSE
    /// passthrough: a copy this process wrote or has just hashed (a damaged one left by
    /// an earlier process is removed), or one assembled from the cached chunks.
    pub fn materialize(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        if let Some(key) = self.sole_chunk(id, node) {
            let check = self.verify && node.chunks[0].digest.is_some();
            return self
                .cache
                .verify_chunk_file(&key, check)
                .then(|| self.cache.verified_chunk_file(&key))
                .flatten();
        }
        let digest = node.digest?;
        let keys: Vec<Key> = (0..node.chunks.len())
            .map(|i| self.key_of((id, i)))
            .collect();
        if let Some(p) = self.cache.verify_file(&digest, node.size) {
            // Chunk files an interrupted run left beside the copy hold nothing it lacks.
            self.cache.drop_chunk_files(&keys);
            return Some(p);
        }
        if !keys.iter().all(|k| self.cache.contains(k, None)) {
            return None;
        }
        // Chunks stream from the cache into the file; memory stays at one chunk.
        let pieces = keys.iter().enumerate().map(|(i, k)| {
            let check = self.verify && node.chunks[i].digest.is_some();
            self.cache.get(k, check, None)
        });
        match self.cache.put_file(&digest, &keys, pieces) {
            Ok(Some(p)) => Some(p),
            Ok(None) => {
                error!(layer = %self.desc.digest, file = %node.path,
                    "could not assemble the file from its cached chunks");
                None
            }
            Err(e) => {
                warn!(error = %e, "could not store a whole file");
                None
            }
        }
    }
}
