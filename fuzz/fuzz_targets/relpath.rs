//! Arbitrary bytes → `flip_manifest::RelPath` validation (directly, through serde as the wire
//! decodes it, and through `join`). Whatever is accepted must be a path that cannot leave a root:
//! joined to a root directory and normalised lexically, it stays strictly inside it; it is UTF-8,
//! relative, without NUL, empty, `.` or `..` components, and within Linux's length limits.
//! `parent`, `file_name`, `depth` and the component-wise ordering must agree with the text.
#![no_main]

use flip_manifest::{RelPath, MAX_COMPONENT_LEN, MAX_PATH_LEN};
use libfuzzer_sys::fuzz_target;
use std::cmp::Ordering;
use std::path::{Component, Path};

/// Checks every promise `RelPath` makes about a path it accepted.
fn check(p: &RelPath) {
    let s = p.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_PATH_LEN, "{s:?}: length");
    assert!(
        !s.starts_with('/') && !s.contains('\0'),
        "{s:?}: absolute or NUL"
    );
    let comps: Vec<&str> = p.components().collect();
    assert_eq!(comps.len(), p.depth());
    for c in &comps {
        assert!(
            !c.is_empty() && *c != "." && *c != "..",
            "{s:?}: component {c:?}"
        );
        assert!(c.len() <= MAX_COMPONENT_LEN, "{s:?}: component too long");
    }
    assert_eq!(p.file_name(), *comps.last().unwrap());
    // Joined to a root, every component is a normal one: lexically it stays below the root.
    let joined = Path::new("/root").join(s);
    let below: Vec<Component> = joined.components().skip(2).collect();
    assert_eq!(below.len(), comps.len(), "{s:?}: joins to {joined:?}");
    assert!(below.iter().all(|c| matches!(c, Component::Normal(_))));
    match p.parent() {
        Some(parent) => {
            // The parent is a valid path too (its own ancestors are checked by induction:
            // each is some input's parent; checking the whole chain here would be quadratic).
            assert_eq!(RelPath::new(parent.as_str()).as_ref(), Ok(&parent));
            assert_eq!(parent.depth() + 1, p.depth());
            assert_eq!(format!("{parent}/{}", p.file_name()), s);
            // A directory sorts right before everything inside it.
            assert_eq!(parent.cmp(p), Ordering::Less);
        }
        None => assert_eq!(p.depth(), 1),
    }
}

/// The component-wise order the manifest relies on, by its plain definition.
fn plain_cmp(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

fuzz_target!(|data: &[u8]| {
    // Split the input in two candidate paths at the first 0xff byte (never valid UTF-8).
    let (a, b) = match data.iter().position(|&x| x == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let pa = RelPath::from_bytes(a);
    if let Ok(p) = &pa {
        check(p);
        // What the wire decodes (serde `try_from = "String"`) accepts exactly the same.
        assert_eq!(RelPath::try_from(p.as_str().to_string()).as_ref(), Ok(p));
    } else if let Ok(s) = std::str::from_utf8(a) {
        assert!(RelPath::try_from(s.to_string()).is_err());
    }
    if let (Ok(pa), Ok(pb)) = (&pa, &RelPath::from_bytes(b)) {
        check(pb);
        assert_eq!(pa.cmp(pb), plain_cmp(pa.as_str(), pb.as_str()));
        assert_eq!(pa.cmp(pb) == Ordering::Equal, pa == pb);
        if let Ok(j) = pa.join(pb.as_str()) {
            check(&j);
            assert_eq!(j.depth(), pa.depth() + pb.depth());
        }
    }
    if let (Ok(pa), Ok(s)) = (&pa, std::str::from_utf8(b)) {
        // `join` of arbitrary text never yields an escaping path.
        if let Ok(j) = pa.join(s) {
            check(&j);
        }
    }
});
