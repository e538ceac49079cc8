//! `flip diff OLD NEW`: what a deploy from OLD to NEW would do and send, with no target at all.
//! Both trees are scanned, planned and classified exactly as a deploy plans and reports
//! ([`flip_plan::report`]); each changed file is encoded locally by the deploy's rule (a patch
//! when the client that deployed OLD would have the old version in its content cache, an rsync
//! delta with the agent's parameters, else the bytes; whole when the encoding is no smaller), and
//! the content stream is compressed as a deploy compresses it.

use crate::cli::DiffArgs;
use crate::{exit, output};
use anyhow::Result;
use flip_plan::report::{Sent, Via};
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
    let mut changes = flip_plan::report::changes(Some(&old), &new, &plan);
    let paths: Vec<&flip_manifest::RelPath> = new.files().map(|(p, ..)| p).collect();
    // Each transfer: how it goes, and the bytes that would go into the stream.
    let transfers: Vec<_> = changes.transfers().collect();
    let sent: Vec<Result<(Sent, Vec<u8>)>> = transfers
        .par_iter()
        .map(|&(index, size, basis)| {
            let data = std::fs::read(a.new.join(paths[index as usize].as_str()))?;
            // The client that deployed OLD keeps every version up to the cache's file limit.
            let cached =
                !a.no_cache && basis.is_some_and(|b| b.1 <= flip_transfer::CONTENT_MAX_FILE);
            let chosen = flip_transfer::send_policy(size, basis.map(|b| b.1), cached);
            let encoded = match (chosen, basis) {
                (Via::Patch | Via::Delta, Some((b, _))) => {
                    let old_data = std::fs::read(a.old.join(b.as_str()))?;
                    if chosen == Via::Patch {
                        flip_transfer::patch(&old_data, &data)
                    } else {
                        flip_transfer::local_delta(&old_data, &data)
                    }
                }
                _ => None,
            };
            let (via, bytes) = match encoded {
                Some(e) => (chosen, e),
                None => (Via::Literal, data),
            };
            let note = flip_transfer::fallback_note(chosen, via);
            Ok((Sent { index, via, note }, bytes))
        })
        .collect();
    drop(transfers);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), a.compress_level.max(1))?;
    let (mut delta_bytes, mut literal_bytes) = (0, 0);
    let mut outcomes = Vec::with_capacity(sent.len());
    for s in sent {
        let (s, bytes) = s?;
        if s.via == Via::Literal {
            literal_bytes += bytes.len() as u64;
        } else {
            delta_bytes += bytes.len() as u64;
        }
        enc.write_all(&bytes)?;
        outcomes.push(s);
    }
    changes.settle(&outcomes);
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
        let mut out = serde_json::Map::new();
        out.insert("old".into(), json!(a.old.display().to_string()));
        out.insert("new".into(), json!(a.new.display().to_string()));
        output::counts_json(&changes.counts, &mut out);
        out.insert(
            "bytes".into(),
            json!({
                "literal": literal_bytes, "delta": delta_bytes, "matched": matched,
                "estimated_wire": content,
            }),
        );
        if a.itemize {
            out.insert("items".into(), output::items_json(&changes.items));
        }
        println!("{}", serde_json::Value::Object(out));
    } else {
        if a.itemize {
            output::print_items(&changes.items);
        }
        println!("{}", output::counts_text(&changes.counts));
        println!(
            "literal {}, delta {}, matched {}; about {} on the wire (zstd level {}, {})",
            output::bytes(literal_bytes),
            output::bytes(delta_bytes),
            output::bytes(matched),
            output::bytes(content),
            a.compress_level,
            if a.no_cache {
                "no local caches"
            } else {
                "warm caches of the client that deployed OLD"
            }
        );
    }
    Ok(exit::OK)
}
