//! Choosing the zstd level from the link, in the spirit of `zstd --adapt`: a writer that spends
//! most of its time blocked on the transport (the link is the bottleneck) can afford to
//! compress harder for free; one that spends most of its time compressing (a fast link: the
//! link waits for the compressor) should compress less.
//!
//! [`AdaptiveLevel`] is only the decision: it is fed the time a writer spent compressing, the
//! time it spent blocked writing and the time it waited for something to write (the deploy
//! preparing content), per piece of input, and after every [`WINDOW`] bytes of input says
//! whether to step the level up or down by one (within [`MIN_LEVEL`]..=[`MAX_LEVEL`]).
//! Blocking is only seen once the buffers between the writer and the bottleneck (pipes, socket
//! buffers, often several megabytes) are full, so a short stream over a slow link may end
//! before the level moves; compression is only made cheaper when it is what the deploy waits
//! on, never merely because nothing blocked.
//! [`FrameWriter`](crate::FrameWriter) measures and applies it (a new level starts a new zstd
//! frame, which the reader takes transparently).

use std::time::Duration;

/// The `compress` level that asks for an adaptive one ([`FrameWriter::start_compression`]
/// (crate::FrameWriter::start_compression)); on the wire the peer is told level 3.
pub const ADAPTIVE: i32 = -1;
/// The level adaptive compression starts at.
pub const START_LEVEL: i32 = 3;
/// The cheapest level it goes down to.
pub const MIN_LEVEL: i32 = 1;
/// The hardest level it goes up to (beyond it zstd gets much slower for little gain).
pub const MAX_LEVEL: i32 = 9;
/// Input bytes per decision: enough for the timings to mean something, few enough that a
/// deploy of tens of megabytes settles on its level.
pub const WINDOW: u64 = 1 << 20;

/// Blocked time above this multiple of compression time: the link is the bottleneck.
const UP_RATIO: u32 = 2;

/// Each window's timings count for this share of the running averages (1/4): blocking comes in
/// bursts (a buffer filling, a flow-control window opening), so one window alone says little.
const SMOOTHING: u32 = 4;

/// The adaptive level controller (see the module docs). Deterministic: it sees only the
/// numbers it is given.
#[derive(Clone, Debug)]
pub struct AdaptiveLevel {
    level: i32,
    input: u64,
    compressing: Duration,
    blocked: Duration,
    waiting: Duration,
    /// Running averages per window: (compressing, blocked, waiting).
    avg: (Duration, Duration, Duration),
}

impl Default for AdaptiveLevel {
    fn default() -> Self {
        Self::new(START_LEVEL)
    }
}

impl AdaptiveLevel {
    /// Starts at `level` (clamped to [`MIN_LEVEL`]..=[`MAX_LEVEL`]).
    pub fn new(level: i32) -> Self {
        AdaptiveLevel {
            level: level.clamp(MIN_LEVEL, MAX_LEVEL),
            input: 0,
            compressing: Duration::ZERO,
            blocked: Duration::ZERO,
            waiting: Duration::ZERO,
            avg: (Duration::ZERO, Duration::ZERO, Duration::ZERO),
        }
    }

    /// The current level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Records `input` bytes that took `compressing` to compress and `blocked` waiting on the
    /// transport, after `waiting` for them to be produced. Once a [`WINDOW`] of input is
    /// recorded, folds its timings into running averages (each window counts for a quarter)
    /// and decides on those: blocked more than twice as long as compressing (the link is the
    /// bottleneck) → one level up; compressing longer than both blocked and waiting (the
    /// compressor is) → one level down; otherwise → unchanged. Returns the new level when it
    /// changes.
    pub fn record(
        &mut self,
        input: u64,
        compressing: Duration,
        blocked: Duration,
        waiting: Duration,
    ) -> Option<i32> {
        self.input += input;
        self.compressing += compressing;
        self.blocked += blocked;
        self.waiting += waiting;
        if self.input < WINDOW {
            return None;
        }
        let fold = |avg: Duration, x: Duration| avg * (SMOOTHING - 1) / SMOOTHING + x / SMOOTHING;
        self.avg = (
            fold(self.avg.0, self.compressing),
            fold(self.avg.1, self.blocked),
            fold(self.avg.2, self.waiting),
        );
        let (c, b, w) = self.avg;
        self.input = 0;
        self.compressing = Duration::ZERO;
        self.blocked = Duration::ZERO;
        self.waiting = Duration::ZERO;
        let next = if b > c * UP_RATIO {
            self.level + 1
        } else if c > b && c > w {
            self.level - 1
        } else {
            self.level
        }
        .clamp(MIN_LEVEL, MAX_LEVEL);
        (next != self.level).then(|| {
            self.level = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `windows` windows of input in 64 KiB pieces, each window taking `c` compressing,
    /// `b` blocked and `w` waiting for input; returns the levels after each window.
    fn run_waiting(
        a: &mut AdaptiveLevel,
        windows: usize,
        c: Duration,
        b: Duration,
        w: Duration,
    ) -> Vec<i32> {
        let pieces = (WINDOW / (64 << 10)) as u32;
        (0..windows)
            .map(|_| {
                for _ in 0..pieces {
                    a.record(64 << 10, c / pieces, b / pieces, w / pieces);
                }
                a.level()
            })
            .collect()
    }

    /// [`run_waiting`] for a writer that never waits for input.
    fn run(a: &mut AdaptiveLevel, windows: usize, c: Duration, b: Duration) -> Vec<i32> {
        run_waiting(a, windows, c, b, Duration::ZERO)
    }

    #[test]
    fn a_slow_link_climbs_one_level_per_window_up_to_the_maximum() {
        let mut a = AdaptiveLevel::default();
        // 1 MiB at 10 MB/s: ~100 ms blocked, 4 ms compressing.
        let levels = run(&mut a, 8, 4 * MS, 100 * MS);
        assert_eq!(levels, vec![4, 5, 6, 7, 8, 9, 9, 9]);
    }

    #[test]
    fn a_fast_link_steps_down_to_the_cheapest_level() {
        let mut a = AdaptiveLevel::default();
        // A local pipe: never blocked.
        assert_eq!(run(&mut a, 4, 4 * MS, Duration::ZERO), vec![2, 1, 1, 1]);
    }

    #[test]
    fn nothing_blocking_is_no_reason_to_compress_less_when_the_input_is_the_bottleneck() {
        // Buffers absorb the output, and the writer mostly waits for content to be prepared:
        // compressing is not what the deploy waits on.
        let mut a = AdaptiveLevel::default();
        assert_eq!(
            run_waiting(&mut a, 3, 4 * MS, Duration::ZERO, 20 * MS),
            vec![3, 3, 3]
        );
        // The same writer once compressing dominates: cheaper, as the averages turn.
        let levels = run_waiting(&mut a, 8, 30 * MS, Duration::ZERO, 20 * MS);
        assert!(levels.windows(2).all(|w| w[0] >= w[1]), "{levels:?}");
        assert!(*levels.last().unwrap() < START_LEVEL, "{levels:?}");
    }

    #[test]
    fn bursts_of_blocking_count_on_average() {
        // What a deploy over a 10 MB/s SSH link shows once its buffers are full: most windows
        // do not block at all, one in eight blocks for 140 ms (measured).
        let mut a = AdaptiveLevel::default();
        let mut levels = Vec::new();
        for _ in 0..4 {
            run_waiting(&mut a, 7, 4 * MS, Duration::ZERO, 7 * MS);
            levels.extend(run_waiting(&mut a, 1, 4 * MS, 140 * MS, 7 * MS));
        }
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
        assert!(*levels.last().unwrap() > START_LEVEL, "{levels:?}");
    }

    #[test]
    fn a_balanced_link_keeps_its_level() {
        let mut a = AdaptiveLevel::new(6);
        // Blocked between once and twice the compression time: neither side waits much.
        assert_eq!(run(&mut a, 3, 10 * MS, 15 * MS), vec![6, 6, 6]);
    }

    #[test]
    fn the_level_follows_the_link_when_it_changes() {
        let mut a = AdaptiveLevel::default();
        run(&mut a, 10, 4 * MS, 100 * MS);
        assert_eq!(a.level(), MAX_LEVEL);
        // The link got fast: compression is now the bottleneck. The averages turn within a
        // few windows, then the level steps down one per window.
        let levels = run(&mut a, 12, 20 * MS, 2 * MS);
        assert!(levels.windows(2).all(|w| w[0] >= w[1]), "{levels:?}");
        assert!(levels[..3].iter().all(|&l| l == MAX_LEVEL), "{levels:?}");
        assert!(*levels.last().unwrap() <= 5, "{levels:?}");
    }

    #[test]
    fn nothing_is_decided_before_a_window_of_input() {
        let mut a = AdaptiveLevel::default();
        let z = Duration::ZERO;
        assert_eq!(a.record(WINDOW - 1, MS, 1000 * MS, z), None);
        assert_eq!(a.level(), START_LEVEL);
        assert_eq!(a.record(1, z, z, z), Some(4));
        // The window starts over.
        assert_eq!(a.record(WINDOW - 1, 10 * MS, z, z), None);
        assert_eq!(a.level(), 4);
    }

    #[test]
    fn levels_outside_the_range_are_clamped() {
        assert_eq!(AdaptiveLevel::new(0).level(), MIN_LEVEL);
        assert_eq!(AdaptiveLevel::new(19).level(), MAX_LEVEL);
    }
}
