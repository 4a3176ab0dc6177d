//! Sequential read-ahead in blob order: spots a reader walking a layer in the order its
//! files are stored (a `tar`, `cp -r` or checksum pass over an image built by a
//! name-sorted walk) and asks for the blob bytes ahead of it, so one reader keeps the
//! link busy instead of paying a round trip for every file.
//!
//! The kernel already reads ahead inside a file; what it cannot see is that the next
//! file in a directory walk is the next member of the blob.

use std::ops::Range;
use std::sync::Mutex;

use estargz::NodeId;

/// First read-ahead window; each further one doubles up to the configured maximum.
pub const MIN_WINDOW: u64 = 1 << 20;
/// Default largest window (compressed bytes), the `sequential_readahead_kib` default.
pub const DEFAULT_MAX_WINDOW: u64 = 8 << 20;
/// An access starting at most this far past the end of the previous one still
/// continues the stream: directories, symlinks and empty files sit between file
/// contents as small members of their own.
const GAP: u64 = 256 << 10;
/// Forward steps the stream must take before anything is read ahead, so that two
/// neighbouring files read by chance cost nothing extra.
const CONFIRM: u32 = 2;
/// Unread files an access may jump over and still continue the stream.
pub const MAX_SKIPPED_FILES: usize = 1;

/// The read-ahead state of one layer.
pub struct Stream {
    max_window: u64,
    state: Mutex<State>,
}

#[derive(Default, Debug)]
struct State {
    /// Start of the furthest access of the stream.
    last_start: u64,
    /// End of the furthest access of the stream (0: no stream yet).
    end: u64,
    hits: u32,
    window: u64,
    /// End of what was already asked for.
    scheduled_end: u64,
    /// The directory of the stream's first access, where its files end in the blob
    /// (looked up once, when a window first needs it), and whether a later access was
    /// in another directory.
    dir: NodeId,
    dir_end: Option<u64>,
    crossed: bool,
}

impl Stream {
    /// `max_window` 0 turns read-ahead off.
    pub fn new(max_window: u64) -> Stream {
        Stream {
            max_window,
            state: Mutex::new(State::default()),
        }
    }

    /// Records an access to blob bytes `range` and returns the blob ranges to fetch
    /// ahead of it, each at most one window long so they travel side by side (never
    /// past `limit`, the end of the file data). Empty when nothing is due.
    ///
    /// `cached` tells whether the access found everything local already. Such accesses
    /// count only inside what read-ahead fetched: a process reading prefetched or
    /// background-fetched files in storage order needs nothing from the network, and
    /// reading ahead of it would only spend the link on files it may never open.
    ///
    /// Two windows are kept in flight: while the reader decodes and reads one, the next
    /// is on the link, so the link never idles between requests.
    ///
    /// While every access of a stream is in one directory (`dir`), windows end where
    /// that directory's files end (`dir_end()`): a reader that takes the files of one
    /// directory in order (the Go tool reading the head of every source file of a
    /// package, then another package elsewhere) would otherwise have megabytes past
    /// them fetched. Once the reader walks on into another directory, windows are not
    /// bounded so.
    ///
    /// An access that jumps over more than [`MAX_SKIPPED_FILES`] files whose data the
    /// reader never read and that are not local (`unread_files(gap)` counts them)
    /// starts a new stream: a walk reads every file in turn (two readers sharing it
    /// skip one another's), while a program picking some files of a directory in name
    /// order (PAM's configuration and modules, a server's data directory) reads a few
    /// KiB here and there, and windows grown on it fetched megabytes nobody read.
    pub fn access(
        &self,
        range: Range<u64>,
        limit: u64,
        cached: impl FnOnce() -> bool,
        dir: NodeId,
        dir_end: impl FnOnce() -> u64,
        unread_files: impl FnOnce(Range<u64>) -> usize,
    ) -> Vec<Range<u64>> {
        if self.max_window == 0 || range.start >= range.end {
            return Vec::new();
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if range.start >= s.scheduled_end && cached() {
            return Vec::new();
        }
        let mut in_stream = s.end > 0 && range.start >= s.last_start && range.start <= s.end + GAP;
        // What read-ahead asked for counts as read: it is local or on its way.
        let read_up_to = s.end.max(s.scheduled_end);
        if in_stream
            && range.start > read_up_to
            && unread_files(read_up_to..range.start) > MAX_SKIPPED_FILES
        {
            in_stream = false;
        }
        if in_stream {
            if range.start > s.last_start {
                s.hits += 1;
                s.last_start = range.start;
            }
            s.end = s.end.max(range.end);
            s.crossed |= s.dir != dir;
        } else if s.end > 0
            && range.start < s.last_start
            && range.start + s.window.max(MIN_WINDOW) >= s.last_start
        {
            // Slightly behind the front: another reader of the same walk. It neither
            // advances the stream nor breaks it.
            return Vec::new();
        } else {
            *s = State {
                last_start: range.start,
                end: range.end,
                dir,
                ..State::default()
            };
            return Vec::new();
        }
        if s.hits < CONFIRM || s.scheduled_end >= s.end + s.window {
            return Vec::new();
        }
        let window = (s.window * 2).clamp(MIN_WINDOW, self.max_window.max(MIN_WINDOW));
        let from = s.scheduled_end.max(s.end);
        let mut to = (s.end + 2 * window).min(limit);
        if !s.crossed {
            to = to.min(*s.dir_end.get_or_insert_with(dir_end));
        }
        // Nothing left in the directory: the window grows only with what is asked for,
        // or a walk that moves on would start with a huge one.
        if to <= from {
            return Vec::new();
        }
        s.window = window;
        s.scheduled_end = to;
        (0..)
            .map(|i| from + i * window)
            .take_while(|&start| start < to)
            .map(|start| start..(start + window).min(to))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn no_end() -> u64 {
        u64::MAX
    }

    fn none_unread(_: Range<u64>) -> usize {
        0
    }

    /// Files of `len` bytes stored back to back, none read or local yet.
    fn unread_of(len: u64) -> impl Fn(Range<u64>) -> usize {
        move |gap| ((gap.end - gap.start) / len) as usize
    }

    #[test]
    fn windows_end_with_the_directory_until_the_walk_leaves_it() {
        let s = Stream::new(8 * MIB);
        let len = 16 << 10;
        // Ten files of directory 1 ending at 10 * len, then directory 2.
        let dir_end = 10 * len;
        let mut got = Vec::new();
        for i in 0..3u64 {
            got.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || false,
                1,
                || dir_end,
                none_unread,
            ));
        }
        assert_eq!(got.first().map(|r| r.end), Some(dir_end), "{got:?}");
        // More of the directory: still nothing past its end.
        for i in 3..10u64 {
            got.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || false,
                1,
                || dir_end,
                none_unread,
            ));
        }
        assert!(got.iter().all(|r| r.end <= dir_end), "{got:?}");
        // Accesses that found nothing to ask for did not grow the window: the first
        // one past the directory is of the size the next step calls for.
        assert!(got.iter().all(|r| r.end - r.start <= MIN_WINDOW), "{got:?}");
        // The walk goes on into the next directory: windows reach past it.
        let mut later = Vec::new();
        for i in 10..40u64 {
            later.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || false,
                2,
                || 11 * len,
                none_unread,
            ));
        }
        assert!(later.iter().any(|r| r.end > 2 * MIB), "{later:?}");
        assert!(later[0].end - later[0].start <= 2 * MIB, "{later:?}");
    }

    /// Files of `len` bytes stored back to back, read in storage order.
    fn walk(stream: &Stream, files: u64, len: u64, limit: u64) -> Vec<Range<u64>> {
        (0..files)
            .flat_map(|i| {
                stream.access(
                    i * len..(i + 1) * len,
                    limit,
                    || false,
                    0,
                    no_end,
                    none_unread,
                )
            })
            .collect()
    }

    #[test]
    fn a_walk_in_blob_order_reads_ahead_in_growing_contiguous_windows() {
        let s = Stream::new(8 * MIB);
        let got = walk(&s, 200, 64 << 10, u64::MAX);
        assert!(!got.is_empty());
        // Nothing before the stream is confirmed.
        assert!(got[0].start >= 2 * (64 << 10));
        // Windows are contiguous, grow, and stop growing at the maximum.
        for w in got.windows(2) {
            assert_eq!(w[0].end, w[1].start, "{got:?}");
        }
        let lens: Vec<u64> = got.iter().map(|r| r.end - r.start).collect();
        assert!(lens.iter().all(|&l| l <= 8 * MIB), "{lens:?}");
        assert!(lens.iter().any(|&l| l > MIN_WINDOW), "{lens:?}");
        // The reader never catches up with what was asked for, and two windows are
        // asked for at once.
        assert!(got.last().map_or(0, |r| r.end) >= 200 * (64 << 10));
        assert_eq!(got[0].end - got[0].start, MIN_WINDOW);
        assert_eq!(got[1].start, got[0].end);
    }

    #[test]
    fn reads_inside_one_chunk_do_not_advance_the_stream() {
        let s = Stream::new(8 * MIB);
        for _ in 0..10 {
            assert!(s
                .access(0..4 * MIB, u64::MAX, || false, 0, no_end, none_unread)
                .is_empty());
        }
    }

    #[test]
    fn random_access_never_reads_ahead() {
        let s = Stream::new(8 * MIB);
        let mut x = 7u64;
        for _ in 0..1000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (x >> 20) % (1 << 30);
            assert!(s
                .access(
                    start..start + 4096,
                    u64::MAX,
                    || false,
                    0,
                    no_end,
                    none_unread
                )
                .is_empty());
        }
    }

    #[test]
    fn stays_within_the_limit_and_can_be_disabled() {
        let s = Stream::new(8 * MIB);
        let got = walk(&s, 50, 64 << 10, 3 * MIB);
        assert!(got.iter().all(|r| r.end <= 3 * MIB), "{got:?}");
        assert!(walk(&Stream::new(0), 50, 64 << 10, u64::MAX).is_empty());
    }

    #[test]
    fn interleaved_readers_of_one_walk_keep_the_stream() {
        let s = Stream::new(8 * MIB);
        let len = 64 << 10;
        let mut got = Vec::new();
        // Two readers taking files from one queue: each access slightly out of order.
        for i in (0..200u64).step_by(2) {
            let unread = unread_of(len);
            got.extend(s.access(
                (i + 1) * len..(i + 2) * len,
                u64::MAX,
                || false,
                0,
                no_end,
                &unread,
            ));
            got.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || false,
                0,
                no_end,
                &unread,
            ));
        }
        assert!(got.last().map_or(0, |r| r.end) >= 200 * len, "{got:?}");
    }

    /// A program reading every third file of a directory in name order (PAM's modules,
    /// a server's data files) is no walk: nothing is read ahead of it.
    #[test]
    fn picking_files_here_and_there_reads_nothing_ahead() {
        let len = 4 << 10;
        let every_third = |unread: &dyn Fn(Range<u64>) -> usize| -> Vec<Range<u64>> {
            let s = Stream::new(8 * MIB);
            (0..300u64)
                .step_by(3)
                .flat_map(|i| {
                    s.access(
                        i * len..(i + 1) * len,
                        u64::MAX,
                        || false,
                        0,
                        no_end,
                        unread,
                    )
                })
                .collect()
        };
        let got = every_third(&unread_of(len));
        assert!(got.is_empty(), "{got:?}");
        // The same accesses with the files in between local (prefetched): a walk.
        assert!(!every_third(&none_unread).is_empty());
    }

    #[test]
    fn cached_accesses_start_nothing_but_carry_a_stream_through_its_windows() {
        let s = Stream::new(8 * MIB);
        let len = 64 << 10;
        // Prefetched files read in storage order: all local, nothing to read ahead.
        for i in 0..100u64 {
            assert!(s
                .access(
                    i * len..(i + 1) * len,
                    u64::MAX,
                    || true,
                    0,
                    no_end,
                    none_unread
                )
                .is_empty());
        }
        // Misses start a stream...
        let mut got = Vec::new();
        for i in 100..103u64 {
            got.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || false,
                0,
                no_end,
                none_unread,
            ));
        }
        assert!(!got.is_empty());
        // ...and reading what it fetched (local by then) keeps it going.
        let end = got.last().map_or(0, |r| r.end);
        let mut more = Vec::new();
        for i in 103..(end / len + 1) {
            more.extend(s.access(
                i * len..(i + 1) * len,
                u64::MAX,
                || true,
                0,
                no_end,
                none_unread,
            ));
        }
        assert!(more.first().is_some_and(|r| r.start == end), "{more:?}");
    }
}
