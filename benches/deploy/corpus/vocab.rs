//! The vocabulary identifiers and prose are built from: word lists (data files in `words/`,
//! one entry a line) and the per-package [`Vocab`].

use super::*;
use std::sync::LazyLock;

pub(super) static WORDS: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/words.txt").lines().collect());

pub(super) static VERBS: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/verbs.txt").lines().collect());

pub(super) static PROSE: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/prose.txt").lines().collect());

pub(super) static SUFFIXES: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/suffixes.txt").lines().collect());

pub(super) static TYPES: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/types.txt").lines().collect());

pub(super) static VENDORS: LazyLock<Vec<&str>> =
    LazyLock::new(|| include_str!("words/vendors.txt").lines().collect());

pub(super) fn capitalize(w: &str, out: &mut String) {
    let mut c = w.chars();
    if let Some(f) = c.next() {
        out.extend(f.to_uppercase());
        out.push_str(c.as_str());
    }
}

pub(super) fn pascal(words: &[&str]) -> String {
    let mut s = String::new();
    for w in words {
        capitalize(w, &mut s);
    }
    s
}

pub(super) fn camel(words: &[&str]) -> String {
    let mut s = String::new();
    for (i, w) in words.iter().enumerate() {
        if i == 0 {
            s.push_str(w);
        } else {
            capitalize(w, &mut s);
        }
    }
    s
}

/// Words favoured by one package or module: names repeat inside it, as in real code.
#[derive(Clone)]
pub(super) struct Vocab {
    pub(super) words: Vec<&'static str>,
}

impl Vocab {
    pub(super) fn new(rng: &mut Rng, size: usize) -> Vocab {
        let mut words = Vec::with_capacity(size);
        while words.len() < size {
            let w = *rng.pick(&WORDS);
            if !words.contains(&w) {
                words.push(w);
            }
        }
        Vocab { words }
    }

    /// A word: mostly from the package's own (skewed) list, sometimes from anywhere.
    pub(super) fn word(&self, rng: &mut Rng) -> &'static str {
        if rng.chance(0.15) {
            rng.word(&WORDS)
        } else {
            self.words[rng.skewed(self.words.len())]
        }
    }

    pub(super) fn words(&self, rng: &mut Rng, lo: usize, hi: usize) -> Vec<&'static str> {
        let n = rng.range(lo, hi);
        (0..n).map(|_| self.word(rng)).collect()
    }

    pub(super) fn var(&self, rng: &mut Rng) -> String {
        let w = self.words(rng, 1, 2);
        camel(&w)
    }

    pub(super) fn method(&self, rng: &mut Rng) -> String {
        let mut s = String::from(*rng.pick(&VERBS));
        for w in self.words(rng, 1, 2) {
            capitalize(w, &mut s);
        }
        s
    }

    pub(super) fn class(&self, rng: &mut Rng) -> String {
        let w = self.words(rng, 1, 3);
        let mut s = pascal(&w);
        s.push_str(rng.word(&SUFFIXES));
        s
    }

    pub(super) fn snake(&self, rng: &mut Rng) -> String {
        self.words(rng, 1, 3).join("_")
    }

    pub(super) fn sentence(&self, rng: &mut Rng, lo: usize, hi: usize) -> String {
        let n = rng.range(lo, hi);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            let w = if rng.chance(0.55) {
                *rng.pick(&PROSE)
            } else {
                self.word(rng)
            };
            if i == 0 {
                capitalize(w, &mut s);
            } else {
                s.push_str(w);
            }
        }
        s
    }
}
