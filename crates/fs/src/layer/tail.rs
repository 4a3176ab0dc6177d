//! How many bytes a layer's first read takes from the end of its blob (footer and, when
//! the guess is right, the whole TOC): from the descriptor's hint, a size remembered
//! from earlier layers of the same repository, or [`TAIL_READ`]; always bounded.

use std::collections::HashMap;
use std::sync::Mutex;

/// First read at the end of a blob when nothing better is known: big enough that most
/// TOCs come with the footer.
pub const TAIL_READ: u64 = 512 << 10;

/// Largest first read: a hint comes from a descriptor or from another layer, and a wrong
/// one must not turn into a huge fetch (a bigger TOC costs one more read instead).
pub const MAX_TAIL_READ: u64 = 16 << 20;

/// Fewest bytes of a first read: the largest footer, so that any footer is in it.
pub const MIN_TAIL_READ: u64 = estargz::MAX_FOOTER_SIZE as u64;

/// Most repositories [`TailSizes`] remembers a size for.
pub const MAX_REMEMBERED_REPOSITORIES: usize = 4096;

/// Bytes of the first read of a `blob_size`-byte blob given `hint` (bytes at its end
/// holding TOC and footer; `None`: unknown), within
/// [`MIN_TAIL_READ`]..=min(`blob_size`, [`MAX_TAIL_READ`]). A hint too small still
/// opens the layer: the reader then fetches the TOC in a second read.
pub fn tail_read(hint: Option<u64>, blob_size: u64) -> u64 {
    hint.unwrap_or(TAIL_READ)
        .max(MIN_TAIL_READ)
        .min(blob_size.min(MAX_TAIL_READ))
}

/// Largest first read guessed from another layer of the repository: a repository with
/// one huge TOC must not make every small layer of it read megabytes (2 MiB is ~170 ms
/// at 100 Mbit/s; a layer whose TOC is bigger reads the rest in a second request).
pub const MAX_REMEMBERED_GUESS: u64 = 2 << 20;

/// The largest TOC-and-footer tail seen for a layer of each repository in this process,
/// for layers whose descriptor tells nothing: layers of one repository tend to share
/// their shape, so the biggest one seen sizes the next first read.
#[derive(Debug, Default)]
pub struct TailSizes {
    seen: Mutex<HashMap<String, u64>>,
}

impl TailSizes {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tail to ask for a layer of `repository`: the descriptor's `hint` when there
    /// is one, else the largest tail seen in `repository` plus a quarter and 16 KiB (its
    /// layers are not all alike) up to [`MAX_REMEMBERED_GUESS`], else `None` (the
    /// default read). Unbounded: the open bounds it with [`tail_read`].
    pub fn hint(&self, repository: &str, hint: Option<u64>) -> Option<u64> {
        hint.or_else(|| {
            let seen = *self.locked().get(repository)?;
            Some(
                seen.saturating_add(seen / 4)
                    .saturating_add(16 << 10)
                    .min(MAX_REMEMBERED_GUESS),
            )
        })
    }

    /// Notes that a layer of `repository` kept its TOC and footer in its last `tail`
    /// bytes (see [`crate::Layer::toc_tail`]).
    pub fn learn(&self, repository: &str, tail: u64) {
        let tail = tail.min(MAX_TAIL_READ);
        let mut seen = self.locked();
        if let Some(t) = seen.get_mut(repository) {
            *t = (*t).max(tail);
            return;
        }
        if seen.len() >= MAX_REMEMBERED_REPOSITORIES {
            // Forget any one: a lost size costs one more read, never a wrong one.
            if let Some(k) = seen.keys().next().cloned() {
                seen.remove(&k);
            }
        }
        seen.insert(repository.to_string(), tail);
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_read_is_bounded() {
        let mib = 1 << 20;
        assert_eq!(tail_read(None, 100 * mib), TAIL_READ);
        assert_eq!(tail_read(None, 1000), 1000);
        assert_eq!(tail_read(Some(700_000), 100 * mib), 700_000);
        assert_eq!(tail_read(Some(0), 100 * mib), MIN_TAIL_READ);
        assert_eq!(tail_read(Some(3), 100 * mib), MIN_TAIL_READ);
        assert_eq!(tail_read(Some(u64::MAX), 100 * mib), MAX_TAIL_READ);
        assert_eq!(tail_read(Some(u64::MAX), 3 * mib), 3 * mib);
        assert_eq!(tail_read(Some(5000), 4000), 4000);
        // A blob smaller than any footer: the reader refuses it, nothing past it is read.
        assert_eq!(tail_read(Some(5000), 20), 20);
    }

    #[test]
    fn a_repository_remembers_its_largest_tail() {
        let t = TailSizes::new();
        assert_eq!(t.hint("r", None), None);
        assert_eq!(t.hint("r", Some(10)), Some(10));
        t.learn("r", 800_000);
        t.learn("r", 100_000);
        let guess = t.hint("r", None).unwrap();
        assert!(guess > 800_000 && guess < 1_100_000, "{guess}");
        // The descriptor's hint wins over the remembered size.
        assert_eq!(t.hint("r", Some(10)), Some(10));
        assert_eq!(t.hint("other", None), None);
        // A huge TOC in the repository sizes the next guess at most MAX_REMEMBERED_GUESS.
        t.learn("r", u64::MAX);
        assert_eq!(t.hint("r", None), Some(MAX_REMEMBERED_GUESS));
        assert_eq!(tail_read(t.hint("r", None), u64::MAX), MAX_REMEMBERED_GUESS);
    }

    #[test]
    fn the_memory_is_bounded() {
        let t = TailSizes::new();
        for i in 0..MAX_REMEMBERED_REPOSITORIES + 100 {
            t.learn(&format!("repo{i}"), 1000);
        }
        assert_eq!(t.locked().len(), MAX_REMEMBERED_REPOSITORIES);
        let last = format!("repo{}", MAX_REMEMBERED_REPOSITORIES + 99);
        assert!(t.hint(&last, None).is_some());
    }
}
