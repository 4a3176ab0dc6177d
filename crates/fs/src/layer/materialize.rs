//! Whole-file copies for FUSE passthrough: which local file already holds a file's
//! exact content, and assembling one from cached chunks when several make up the file.

use std::path::PathBuf;

use estargz::NodeId;
use tracing::{error, warn};

use super::Layer;
use crate::cache::Key;

impl Layer {
    /// A local file that already holds exactly the content of regular file `id`, for
    /// FUSE passthrough: the cached chunk itself when one chunk is the whole file (most
    /// files, and no copy at all), else a whole-file copy made by [`Layer::materialize`].
    pub fn backing_file(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        if let [only] = node.chunks.as_slice() {
            if only.file_offset == 0 && only.size == node.size {
                return self.cache.chunk_file(&self.key_of((id, 0)));
            }
        }
        let path = self.cache.file_path(&node.digest?)?;
        std::fs::metadata(&path)
            .is_ok_and(|m| m.len() == node.size)
            .then_some(path)
    }

    /// Whether [`Layer::materialize`] would build a whole-file copy of `id` without the
    /// network: a disk cache, several chunks (one chunk is its own backing file), all of
    /// them cached. Cheap checks first: this runs on the FUSE open path.
    pub fn materializable(&self, id: NodeId) -> bool {
        self.cache.dir().is_some()
            && self.regular(id).is_ok_and(|node| {
                node.chunks.len() > 1
                    && (0..node.chunks.len()).all(|i| self.cache.contains(&self.key_of((id, i))))
            })
    }

    /// A local file holding exactly the content of regular file `id`, assembled from
    /// the cache if every chunk is there; for FUSE passthrough.
    pub fn materialize(&self, id: NodeId) -> Option<PathBuf> {
        let node = self.regular(id).ok()?;
        let digest = node.digest?;
        let path = self.cache.file_path(&digest)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == node.size) {
            return Some(path);
        }
        let keys: Vec<Key> = (0..node.chunks.len())
            .map(|i| self.key_of((id, i)))
            .collect();
        if !keys.iter().all(|k| self.cache.contains(k)) {
            return None;
        }
        // Chunks stream from the cache into the file; memory stays at one chunk.
        let pieces = keys.iter().map(|k| self.cache.get(k, self.verify));
        match self.cache.put_file(&digest, pieces) {
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
