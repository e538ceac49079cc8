//! A deterministic corpus shaped like a deployed PHP application (app code, templates, config,
//! translations, built assets, images and a Composer `vendor/` tree), and the release-to-release
//! mutations the benchmark deploys.
//!
//! Everything is derived from a seed with our own PRNG and kept in ordered maps, so the same
//! `(files, seed)` gives byte-identical trees on every machine and every run.
//!
//! Shape at the default 12,000 files: ~80 MB; text files (PHP classes, Twig, YAML, XLIFF, JSON,
//! Markdown) log-normally sized around a 3.4 KB median (mostly 1–30 KB) with identifiers built
//! from a few hundred words, skewed per package so names repeat the way they do in real code;
//! ~0.25 % minified JS/CSS of 100 KB–1 MB; ~0.5 % binary images and fonts (incompressible);
//! a few executables and `vendor/bin` symlinks; Composer's generated autoload files.

mod disk;
mod files;
mod generate;
mod mutate;
mod rng;
mod vocab;

// Not every user of the corpus (tests/estimate.rs) writes mutations to disk.
#[allow(unused_imports)]
pub use disk::{apply, materialize};
pub use generate::generate;
pub use mutate::Scenario;
pub use rng::Rng;

use files::*;
use generate::*;
use vocab::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Bumped whenever the generator's output changes (it keys cached lower bounds).
pub const GENERATOR_VERSION: u32 = 1;

/// Base mtime of every file of the first release (2023-11-14).
pub const BASE_MTIME: u64 = 1_700_000_000;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Node {
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// A source tree in memory: relative path → node. Directories are implied by the paths.
#[derive(Clone, Default)]
pub struct Corpus {
    pub entries: BTreeMap<String, Node>,
    /// PHP classes per package root (`vendor/acme/http-kernel` or `src`), for `use` lines and
    /// Composer's class map.
    classes: Vec<(String, String)>,
}

/// What one mutation did, in paths.
#[derive(Default, Debug)]
pub struct Change {
    pub changed: BTreeSet<String>,
    pub added: BTreeSet<String>,
    pub removed: BTreeSet<String>,
    /// (old, new) pairs; the new path is also in `added` or `changed` only when its content
    /// changed too.
    pub renamed: Vec<(String, String)>,
}

impl Change {
    /// Paths to (re)write.
    pub fn writes(&self) -> impl Iterator<Item = &String> {
        self.changed
            .iter()
            .chain(self.added.iter())
            .chain(self.renamed.iter().map(|(_, n)| n))
    }
}

impl Corpus {
    pub fn file_count(&self) -> usize {
        self.entries.len()
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                Node::Symlink(t) => t.len() as u64,
            })
            .sum()
    }

    fn put(&mut self, path: String, data: Vec<u8>) {
        self.entries.insert(path, Node::File { data, mode: 0o644 });
    }

    fn put_text(&mut self, path: String, data: String) {
        self.put(path, data.into_bytes());
    }
}
