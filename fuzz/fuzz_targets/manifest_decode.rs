//! Arbitrary bytes → `flip_manifest::decode` (and `decode_diff`). Whatever decodes must be the
//! canonical encoding of what it decoded to: `encode(decode(b)) == b`, and the round trip is exact.
#![no_main]

use flip_manifest::{
    decode, decode_diff, encode, encode_diff, Digest, Entry, EntryKind, Manifest, RelPath,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A live manifest for decoded diffs to apply to.
fn base() -> &'static Manifest {
    static BASE: OnceLock<Manifest> = OnceLock::new();
    BASE.get_or_init(|| {
        let e = |p: &str, kind| Entry {
            path: RelPath::new(p).unwrap(),
            kind,
        };
        let dir = EntryKind::Dir { mode: 0o755 };
        let file = |c: &[u8]| EntryKind::File {
            mode: 0o644,
            size: c.len() as u64,
            digest: Digest::of(c),
        };
        Manifest::new(vec![
            e("a", dir.clone()),
            e("a/b", dir.clone()),
            e("a/b/c", file(b"c")),
            e("a/x", file(b"x")),
            e("a-b", file(b"")),
            e(
                "l",
                EntryKind::Symlink {
                    target: "a/x".into(),
                },
            ),
            e("z", dir),
            e("\u{e9}", file(b"e")),
        ])
        .unwrap()
    })
}

#[global_allocator]
static ALLOC: flip_fuzz::LimitAlloc = flip_fuzz::LimitAlloc {
    // A manifest never needs more than a small multiple of its input size; inputs are small.
    max_single: 16 << 20,
    max_live: 256 << 20,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        let enc = encode(&m);
        assert_eq!(
            enc, data,
            "decode accepted a non-canonical encoding of {m:?}"
        );
        assert_eq!(decode(&enc).as_ref(), Ok(&m));
        // A decoded manifest satisfies every invariant `Manifest::new` checks.
        assert_eq!(Manifest::new(m.entries().to_vec()).as_ref(), Ok(&m));
        assert_eq!(m.digest(), flip_manifest::Digest::of(data));
        // What the agent computes from a manifest it received (overflow checks catch sums).
        let _ = m.total_bytes();
        let plan = flip_plan::plan(Some(base()), &m);
        assert_eq!(plan.files.len(), m.file_count());
        let _ = flip_plan::plan(Some(&m), base());
        // Diffing against nothing and applying gives it back.
        let d = Manifest::default().diff(&m);
        assert_eq!(Manifest::default().apply(&d).as_ref(), Ok(&m));
    }
    if let Ok(d) = decode_diff(data) {
        let enc = encode_diff(&d);
        assert_eq!(
            enc, data,
            "decode_diff accepted a non-canonical encoding of {d:?}"
        );
        assert_eq!(decode_diff(&enc).as_ref(), Ok(&d));
        // Applying any decoded diff to any manifest either fails cleanly or yields a valid one.
        if let Ok(m) = Manifest::default().apply(&d) {
            assert_eq!(decode(&encode(&m)).as_ref(), Ok(&m));
            // diff(empty, m) applied to empty is m again.
            assert_eq!(
                Manifest::default()
                    .apply(&Manifest::default().diff(&m))
                    .as_ref(),
                Ok(&m)
            );
        }
        if let Ok(m) = base().apply(&d) {
            assert_eq!(decode(&encode(&m)).as_ref(), Ok(&m));
            assert_eq!(base().apply(&base().diff(&m)).as_ref(), Ok(&m));
        }
    }
});
