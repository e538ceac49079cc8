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
//! [`FrameWriter`](crate::FrameWriter) measures and applies it: a new level starts a new zstd
//! frame, which the reader takes transparently, except between the levels a writer on zstd's
//! worker threads keeps ([`FrameWriter::set_workers`](crate::FrameWriter::set_workers)),
//! where it applies from the next job on, in the same frame, and the writer has the controller
//! [`settle`](AdaptiveLevel::settle) so that it judges the new level, not the jobs still in
//! flight at the old one.

use std::time::Duration;

/// The `compress` level that asks for an adaptive one
/// ([`FrameWriter::start_compression`](crate::FrameWriter::start_compression)); on the wire
/// the peer is told level 3.
pub const ADAPTIVE: i32 = -1;
/// The level adaptive compression starts at.
pub const START_LEVEL: i32 = 3;
/// The cheapest level it goes down to.
pub const MIN_LEVEL: i32 = 1;
/// The hardest level it goes up to (beyond it zstd gets much slower for little gain: on a
/// generated PHP tree of 80 MB, level 9 gives 18.3 MB, 12 gives 17.8 MB at a third of the
/// speed, 19 with a 32 MiB window 15.3 MB at a thirtieth; a longer window or long-distance
/// matching gains under 1% there).
pub const MAX_LEVEL: i32 = 12;
/// Input bytes per decision: enough for the timings to mean something, few enough that a
/// deploy of tens of megabytes settles on its level.
pub const WINDOW: u64 = 1 << 20;

/// Blocked time above this multiple of compression time: the link is the bottleneck.
const UP_RATIO: u32 = 2;
/// Compression time above this multiple of blocked time (and above the time waiting for
/// input): the compressor is the bottleneck. Between the two ratios the level holds: over SSH
/// blocking comes in bursts, and a band narrower than this made the level swing between 1 and
/// 5 every few megabytes at 10 MB/s (measured).
const DOWN_RATIO: u32 = 4;

/// Each window's timings count for this share of the running averages (1/16): blocking comes in
/// bursts (a flow-control window opening: at 10 MB/s over SSH, 80–140 ms once in 10 to 20
/// windows, nothing in between), so one window alone says little, and an average that forgets
/// a burst before the next one comes steps down a level the link can afford.
const SMOOTHING: u32 = 16;
/// The share of each window in the slow averages (1/64) that must agree before a step down
/// (measured at 10 MB/s: with the fast averages alone, the level still fell to 1 between
/// bursts, on a link that the writer kept busy only thanks to megabytes of buffers).
const LONG_SMOOTHING: u32 = 64;

/// Output bytes before the level may go down: until the buffers between the writer and the
/// link (pipes, the SSH channel window, socket buffers: several megabytes) are full, not
/// blocking says nothing about the link, and a slow link would get level 1 for its first tens
/// of megabytes of input. On a fast link this keeps the start level (3, barely slower than 1)
/// for the first ~30 MB of input.
pub const BUFFERED: u64 = 8 << 20;

/// The adaptive level controller (see the module docs). Deterministic: it sees only the
/// numbers it is given.
#[derive(Clone, Debug)]
pub struct AdaptiveLevel {
    level: i32,
    input: u64,
    /// Output bytes recorded in all.
    output: u64,
    compressing: Duration,
    blocked: Duration,
    waiting: Duration,
    /// Running averages per window: (compressing, blocked, waiting).
    avg: (Duration, Duration, Duration),
    /// Slow running averages per window (each counts for [`LONG_SMOOTHING`]): (compressing,
    /// blocked).
    long: (Duration, Duration),
    /// Input bytes still to come before the last change shows ([`AdaptiveLevel::settle`]):
    /// their timings are not used.
    settling: u64,
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
            output: 0,
            compressing: Duration::ZERO,
            blocked: Duration::ZERO,
            waiting: Duration::ZERO,
            avg: (Duration::ZERO, Duration::ZERO, Duration::ZERO),
            long: (Duration::ZERO, Duration::ZERO),
            settling: 0,
        }
    }

    /// Tells the controller that the level it chose shows only `input` bytes later (zstd on
    /// worker threads applies it from the next job on, behind the jobs in flight): the
    /// timings of those bytes still say what the old level cost, so they are not counted, and
    /// the level moves at most once per `input` + [`WINDOW`] bytes instead of running up or
    /// down on stale timings.
    pub fn settle(&mut self, input: u64) {
        self.settling = input;
    }

    /// The current level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Records `input` bytes that became `output` bytes on the transport, took `compressing`
    /// to compress and `blocked` waiting on the transport, after `waiting` for them to be
    /// produced. Once a [`WINDOW`] of input is recorded, folds its timings into running
    /// averages (each window counts for a sixteenth) and decides on those: blocked more than
    /// twice as long as compressing (the link is the bottleneck) → one level up; compressing
    /// more than four times as long as blocked, on both averages (the slow one counts each
    /// window for a sixty-fourth), and longer
    /// than waiting (the compressor is the bottleneck), once [`BUFFERED`] bytes of output are
    /// out → one level down; otherwise → unchanged. Returns the new level when it changes.
    pub fn record(
        &mut self,
        input: u64,
        output: u64,
        compressing: Duration,
        blocked: Duration,
        waiting: Duration,
    ) -> Option<i32> {
        self.output += output;
        if self.settling > 0 {
            self.settling = self.settling.saturating_sub(input);
            return None;
        }
        self.input += input;
        self.compressing += compressing;
        self.blocked += blocked;
        self.waiting += waiting;
        if self.input < WINDOW {
            return None;
        }
        let fold = |avg: Duration, x: Duration| avg * (SMOOTHING - 1) / SMOOTHING + x / SMOOTHING;
        let slow = |avg: Duration, x: Duration| {
            avg * (LONG_SMOOTHING - 1) / LONG_SMOOTHING + x / LONG_SMOOTHING
        };
        self.long = (
            slow(self.long.0, self.compressing),
            slow(self.long.1, self.blocked),
        );
        self.avg = (
            fold(self.avg.0, self.compressing),
            fold(self.avg.1, self.blocked),
            fold(self.avg.2, self.waiting),
        );
        let (c, b, w) = self.avg;
        // Over a stream of tens of megabytes, a link that blocks the writer at all blocks it
        // in a few bursts, far apart: the level goes down only when the last hundred or so
        // windows too say compressing is what it waits on.
        let compressor_bound = c > b * DOWN_RATIO
            && self.long.0 > self.long.1 * DOWN_RATIO
            && c > w
            && self.output >= BUFFERED;
        self.input = 0;
        self.compressing = Duration::ZERO;
        self.blocked = Duration::ZERO;
        self.waiting = Duration::ZERO;
        let next = if b > c * UP_RATIO {
            self.level + 1
        } else if compressor_bound {
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

    /// A controller whose output has filled the buffers to the link: it may step down.
    fn primed(level: i32) -> AdaptiveLevel {
        let mut a = AdaptiveLevel::new(level);
        let z = Duration::ZERO;
        assert_eq!(a.record(0, BUFFERED, z, z, z), None);
        a
    }

    /// Feeds `windows` windows of input in 64 KiB pieces (no output), each window taking `c`
    /// compressing, `b` blocked and `w` waiting for input; returns the levels after each
    /// window.
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
                    a.record(64 << 10, 0, c / pieces, b / pieces, w / pieces);
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
        let levels = run(&mut a, 11, 4 * MS, 100 * MS);
        assert_eq!(levels, vec![4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12]);
    }

    /// On worker threads a change shows only behind the jobs in flight: told to settle after
    /// each change, the level climbs once per lag and window, on timings taken after the last
    /// change showed.
    #[test]
    fn a_settling_compressor_moves_once_per_lag_and_window() {
        let climb = |a: &mut AdaptiveLevel, windows: usize, c: Duration, b: Duration| {
            (0..windows)
                .map(|_| {
                    let before = a.level();
                    let level = run(a, 1, c, b)[0];
                    if level != before {
                        a.settle(3 * WINDOW);
                    }
                    level
                })
                .collect::<Vec<_>>()
        };
        let mut a = AdaptiveLevel::default();
        assert_eq!(
            climb(&mut a, 12, 4 * MS, 100 * MS),
            vec![4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6]
        );
        // Timings behind a change do not count: a compressor-bound stretch right after a
        // step up is ignored, the one after it is not.
        let mut a = primed(START_LEVEL);
        assert_eq!(run(&mut a, 1, 4 * MS, 100 * MS), vec![4]);
        a.settle(2 * WINDOW);
        assert_eq!(run(&mut a, 2, 400 * MS, Duration::ZERO), vec![4, 4]);
        assert_eq!(run(&mut a, 1, 4 * MS, 100 * MS), vec![5]);
    }

    #[test]
    fn a_fast_link_steps_down_to_the_cheapest_level() {
        let mut a = primed(START_LEVEL);
        // A local pipe: never blocked.
        assert_eq!(run(&mut a, 4, 4 * MS, Duration::ZERO), vec![2, 1, 1, 1]);
    }

    #[test]
    fn nothing_blocking_is_no_reason_to_compress_less_when_the_input_is_the_bottleneck() {
        // Buffers absorb the output, and the writer mostly waits for content to be prepared:
        // compressing is not what the deploy waits on.
        let mut a = primed(START_LEVEL);
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
        let mut a = primed(START_LEVEL);
        let mut levels = Vec::new();
        for _ in 0..4 {
            run_waiting(&mut a, 7, 4 * MS, Duration::ZERO, 7 * MS);
            levels.extend(run_waiting(&mut a, 1, 4 * MS, 140 * MS, 7 * MS));
        }
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
        assert!(*levels.last().unwrap() > START_LEVEL, "{levels:?}");
    }

    #[test]
    fn a_link_that_blocks_in_rare_bursts_is_never_stepped_down() {
        // Measured at 10 MB/s over SSH once the buffers are full: 1 MiB windows of ~10 ms
        // compressing, ~6 ms waiting for content and no blocking, then one window blocked for
        // ~130 ms, once in ten to twenty windows. The link is as slow as the compressor is
        // fast: stepping down would only send more bytes over it.
        let mut a = primed(START_LEVEL);
        let mut levels = Vec::new();
        for _ in 0..8 {
            levels.extend(run_waiting(&mut a, 1, 10 * MS, 130 * MS, 6 * MS));
            levels.extend(run_waiting(&mut a, 11, 10 * MS, MS / 10, 6 * MS));
        }
        // (Fixed timings whatever the level: the averages, starting from nothing, climb.)
        assert!(levels.windows(2).all(|w| w[0] <= w[1]), "{levels:?}");
        assert!(levels[0] > START_LEVEL, "{levels:?}");
    }

    #[test]
    fn a_balanced_link_keeps_its_level() {
        let mut a = primed(6);
        // Blocked between a quarter of and twice the compression time: neither side waits
        // much.
        assert_eq!(run(&mut a, 3, 10 * MS, 15 * MS), vec![6, 6, 6]);
        assert_eq!(run(&mut a, 40, 10 * MS, 3 * MS), vec![6; 40]);
    }

    #[test]
    fn the_level_does_not_drop_while_the_buffers_to_the_link_fill() {
        // The first megabytes go into pipes and socket buffers without blocking, whatever the
        // link: compressing looks like the bottleneck, but is not known to be.
        let mut a = AdaptiveLevel::default();
        let z = Duration::ZERO;
        let mut levels = Vec::new();
        for _ in 0..12 {
            a.record(WINDOW, 1 << 20, 4 * MS, z, z);
            levels.push(a.level());
        }
        // Down only once BUFFERED bytes of output are out, then one level per window.
        assert_eq!(levels, vec![3, 3, 3, 3, 3, 3, 3, 2, 1, 1, 1, 1]);
    }

    #[test]
    fn the_level_follows_the_link_when_it_changes() {
        let mut a = primed(START_LEVEL);
        run(&mut a, 10, 4 * MS, 100 * MS);
        assert_eq!(a.level(), MAX_LEVEL);
        // The link got fast: compression is now the bottleneck. The averages turn within
        // about a hundred windows (blocking comes in bursts: quiet windows are no evidence),
        // then the level steps down one per window.
        let levels = run(&mut a, 160, 20 * MS, 2 * MS);
        assert!(levels.windows(2).all(|w| w[0] >= w[1]), "{levels:?}");
        assert!(levels[..40].iter().all(|&l| l == MAX_LEVEL), "{levels:?}");
        assert!(*levels.last().unwrap() <= 5, "{levels:?}");
    }

    #[test]
    fn nothing_is_decided_before_a_window_of_input() {
        let mut a = AdaptiveLevel::default();
        let z = Duration::ZERO;
        assert_eq!(a.record(WINDOW - 1, 0, MS, 1000 * MS, z), None);
        assert_eq!(a.level(), START_LEVEL);
        assert_eq!(a.record(1, 0, z, z, z), Some(4));
        // The window starts over.
        assert_eq!(a.record(WINDOW - 1, BUFFERED, 10 * MS, z, z), None);
        assert_eq!(a.level(), 4);
    }

    #[test]
    fn levels_outside_the_range_are_clamped() {
        assert_eq!(AdaptiveLevel::new(0).level(), MIN_LEVEL);
        assert_eq!(AdaptiveLevel::new(19).level(), MAX_LEVEL);
    }
}
