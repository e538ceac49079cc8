//! The session's [`flip_transfer::SendMeter`], against an agent served in this process: it
//! counts exactly the content the stage sends (files and their bytes, large files piece by
//! piece), and nothing for what the target already has.

mod common;

use common::session;
use std::path::Path;

/// Deploys `source` to `root`; returns the meter's (total, done) after the stage.
fn deploy(source: &Path, root: &Path) -> ((u64, u64), (u64, u64)) {
    let scan = flip_scan::scan(source, &flip_scan::ScanOptions::default()).unwrap();
    let mut s = session(root);
    let meter = s.meter();
    assert_eq!(meter.total(), (0, 0), "nothing to send before the stage");
    let (current, releases) = s.status().unwrap();
    let live = releases
        .iter()
        .find(|r| Some(r.id) == current)
        .map(|r| r.manifest_digest);
    let report = s
        .stage(source, &scan.manifest, None, None, None, live, false)
        .unwrap();
    s.activate(report.release).unwrap();
    s.close().unwrap();
    assert!(meter.wire_bytes() > 0);
    (meter.total(), meter.done())
}

#[test]
fn the_send_meter_counts_the_content_sent_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, root) = (tmp.path().join("src"), tmp.path().join("target"));
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("small.txt"), b"hello").unwrap();
    std::fs::write(source.join("empty"), b"").unwrap();
    // Above the size sent piece by piece (4 MiB), not a multiple of a piece.
    let big: Vec<u8> = (0..(9u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(source.join("big.bin"), &big).unwrap();
    let bytes = 5 + big.len() as u64;
    let (total, done) = deploy(&source, &root);
    assert_eq!(total, (3, bytes));
    assert_eq!(done, total);

    // The next deploy sends only the changed file.
    std::fs::write(source.join("small.txt"), b"hello, again").unwrap();
    let (total, done) = deploy(&source, &root);
    assert_eq!(total, (1, 12));
    assert_eq!(done, total);
}
