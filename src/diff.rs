//! `flip diff OLD NEW`: what a deploy from OLD to NEW would do and send, with no target at all.
//! Both trees are scanned, planned exactly as a deploy plans, deltas are computed locally with
//! the agent's parameters, and the content stream is compressed as a deploy compresses it.

use crate::cli::DiffArgs;
use crate::exit;
use anyhow::Result;
use flip_plan::{Source, DELTA_MIN};
use rayon::prelude::*;
use serde_json::json;
use std::io::Write;

pub fn run(a: DiffArgs) -> Result<i32> {
    let scan = |dir: &std::path::Path| -> Result<flip_manifest::Manifest> {
        if !dir.is_dir() {
            return Err(exit::coded(
                exit::SOURCE,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let opts = flip_scan::ScanOptions {
            excludes: a.exclude.clone(),
            use_flipignore: !a.no_flipignore,
            hash_cache: None,
        };
        Ok(flip_scan::scan(dir, &opts)?.manifest)
    };
    let old = scan(&a.old)?;
    let new = scan(&a.new)?;
    let plan = flip_plan::plan(Some(&old), &new);
    // Each transfer: (bytes that would go into the stream, sent as delta?)
    let sent: Vec<Result<(Vec<u8>, bool)>> = plan
        .transfers()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|(_, step)| {
            let data = std::fs::read(a.new.join(step.path.as_str()))?;
            if let Source::Transfer { basis: Some(b) } = &step.source {
                let old_data = std::fs::read(a.old.join(b.as_str()))?;
                if data.len() as u64 >= DELTA_MIN && old_data.len() as u64 >= DELTA_MIN {
                    if let Some(d) = flip_transfer::local_delta(&old_data, &data) {
                        return Ok((d, true));
                    }
                }
            }
            Ok((data, false))
        })
        .collect();
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), a.compress_level.max(1))?;
    let (mut delta_files, mut literal_files, mut delta_bytes, mut literal_bytes) = (0, 0, 0, 0);
    for s in sent {
        let (bytes, is_delta) = s?;
        if is_delta {
            delta_files += 1;
            delta_bytes += bytes.len() as u64;
        } else {
            literal_files += 1;
            literal_bytes += bytes.len() as u64;
        }
        enc.write_all(&bytes)?;
    }
    let manifest_diff = flip_manifest::encode_diff(&old.diff(&new));
    enc.write_all(&manifest_diff)?;
    let compressed = enc.finish()?.len() as u64;
    let content = if a.compress_level == 0 {
        delta_bytes + literal_bytes + manifest_diff.len() as u64
    } else {
        compressed
    };
    let st = &plan.stats;
    let matched = st.matched_bytes
        + plan
            .transfers()
            .map(|(_, s)| s.size)
            .sum::<u64>()
            .saturating_sub(literal_bytes + delta_bytes);
    if a.json {
        println!(
            "{}",
            json!({
                "old": a.old.display().to_string(), "new": a.new.display().to_string(),
                "files": {
                    "total": st.files, "linked": st.linked, "copied": st.copied,
                    "delta": delta_files, "literal": literal_files, "removed": st.removed,
                },
                "bytes": {
                    "literal": literal_bytes, "delta": delta_bytes, "matched": matched,
                    "estimated_wire": content,
                },
            })
        );
    } else {
        println!(
            "{} files: {} linked, {} copied, {} delta, {} literal, {} removed",
            st.files, st.linked, st.copied, delta_files, literal_files, st.removed
        );
        println!(
            "literal {}, delta {}, matched {}; about {} on the wire (zstd level {}, warm manifest cache)",
            crate::output::bytes(literal_bytes),
            crate::output::bytes(delta_bytes),
            crate::output::bytes(matched),
            crate::output::bytes(content),
            a.compress_level
        );
    }
    Ok(exit::OK)
}
