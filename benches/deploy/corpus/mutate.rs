//! Mutations: the release-to-release changes of each [`Scenario`].

use super::*;

/// The release-to-release changes the benchmark deploys, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum Scenario {
    /// The first deploy to an empty target.
    Initial,
    /// ~50 files with a few lines changed.
    Patch,
    /// ~300 changed, 50 added, 20 removed, 30 renamed, assets rebuilt.
    Minor,
    /// A third of vendor/ changed (a `composer update` of several packages).
    Vendor,
    /// Nothing changed.
    Noop,
    /// The same content, checked out anew: new inodes, every mtime new.
    FreshCi,
    /// ~50 other files changed as `Patch` changes them, checked out anew and deployed by a
    /// client without caches (a fresh CI runner: flip has no copy of the live manifest).
    CiPatch,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Initial,
        Scenario::Patch,
        Scenario::Minor,
        Scenario::Vendor,
        Scenario::Noop,
        Scenario::FreshCi,
        Scenario::CiPatch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Initial => "initial",
            Scenario::Patch => "patch",
            Scenario::Minor => "minor",
            Scenario::Vendor => "vendor",
            Scenario::Noop => "noop",
            Scenario::FreshCi => "fresh-ci",
            Scenario::CiPatch => "ci-patch",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// The mtime given to files this step writes (one day per step).
    pub fn mtime(self) -> SystemTime {
        let step = Scenario::ALL.iter().position(|&x| x == self).unwrap_or(0) as u64;
        SystemTime::UNIX_EPOCH + Duration::from_secs(BASE_MTIME + step * 86_400)
    }
}

pub(super) fn is_text(path: &str) -> bool {
    [".php", ".twig", ".yaml", ".xlf", ".xml", ".md", ".json"]
        .iter()
        .any(|e| path.ends_with(e))
        && !path.starts_with("vendor/composer/")
}

pub(super) fn is_minified(path: &str) -> bool {
    path.ends_with(".js") || path.ends_with(".css")
}

/// Edits `ops` lines of a text file: a word replaced, a line duplicated with a change, or a
/// line removed, at random places — what a small code change looks like to a delta algorithm.
pub(super) fn edit_text(rng: &mut Rng, data: &[u8], ops: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() < 4 {
        lines.push(format!("// {}", rng.next_u64()));
    }
    for _ in 0..ops {
        let i = rng.range(2.min(lines.len() - 1), lines.len() - 1);
        match rng.below(10) {
            0..=4 => lines[i] = mutate_line(rng, &lines[i]),
            5..=7 => {
                let l = mutate_line(rng, &lines[i]);
                lines.insert(i + 1, l);
            }
            _ => {
                if lines.len() > 6 && lines[i].trim().len() > 2 {
                    lines.remove(i);
                } else {
                    lines[i] = mutate_line(rng, &lines[i]);
                }
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out.into_bytes()
}

/// Replaces one word of the line (or appends one to a line without words).
pub(super) fn mutate_line(rng: &mut Rng, line: &str) -> String {
    let words: Vec<(usize, usize)> = {
        let b = line.as_bytes();
        let mut v = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_alphabetic() {
                let s = i;
                while i < b.len() && b[i].is_ascii_alphanumeric() {
                    i += 1;
                }
                if i - s >= 3 {
                    v.push((s, i));
                }
            } else {
                i += 1;
            }
        }
        v
    };
    let new = *rng.pick(&WORDS);
    if words.is_empty() {
        return format!("{line} // {new}");
    }
    let (s, e) = *rng.pick(&words);
    let mut w = String::new();
    if line.as_bytes()[s].is_ascii_uppercase() {
        capitalize(new, &mut w);
    } else {
        w.push_str(new);
    }
    if rng.chance(0.3) {
        capitalize(rng.word(&WORDS), &mut w);
    }
    format!("{}{}{}", &line[..s], w, &line[e..])
}

/// Scattered small changes through a minified asset (a rebuilt bundle: new module ids, a few
/// changed functions), `spots` of them.
pub(super) fn edit_minified(rng: &mut Rng, data: &[u8], spots: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    let vocab = Vocab {
        words: WORDS.clone(),
    };
    for _ in 0..spots {
        let at = rng.below(out.len().max(1));
        let cut = rng.range(10, 300).min(out.len() - at);
        let len = rng.range(10, 300);
        let add = if out.starts_with(b"@charset") {
            minified_css(rng, &vocab, len)
        } else {
            minified_js(rng, &vocab, len)
        };
        let add = add.strip_suffix(b"\n").unwrap_or(&add).to_vec();
        out.splice(at..at + cut, add);
    }
    out
}

impl Corpus {
    pub(super) fn paths_where(&self, f: impl Fn(&str) -> bool) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(p, n)| matches!(n, Node::File { .. }) && f(p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Picks `n` distinct paths from `pool` (fewer if the pool is smaller).
    pub(super) fn sample(rng: &mut Rng, pool: &[String], n: usize) -> Vec<String> {
        let mut idx: Vec<usize> = (0..pool.len()).collect();
        let n = n.min(pool.len());
        for i in 0..n {
            let j = i + rng.below(pool.len() - i);
            idx.swap(i, j);
        }
        let mut out: Vec<String> = idx[..n].iter().map(|&i| pool[i].clone()).collect();
        out.sort();
        out
    }

    pub(super) fn edit(&mut self, rng: &mut Rng, path: &str, ops: usize, ch: &mut Change) {
        let Some(Node::File { data, .. }) = self.entries.get_mut(path) else {
            return;
        };
        *data = if is_minified(path) {
            edit_minified(rng, data, ops)
        } else {
            edit_text(rng, data, ops)
        };
        if !ch.added.contains(path) {
            ch.changed.insert(path.to_string());
        }
    }

    pub(super) fn remove(&mut self, path: &str, ch: &mut Change) {
        self.entries.remove(path);
        ch.changed.remove(path);
        if ch.added.remove(path) {
            return;
        }
        if let Some(i) = ch.renamed.iter().position(|(_, new)| new == path) {
            // Renamed, then removed: only the removal of the old path is left.
            ch.renamed.remove(i);
            return;
        }
        ch.removed.insert(path.to_string());
    }

    /// Text files of the application itself (not vendor/).
    fn is_app_text(p: &str) -> bool {
        is_text(p)
            && (p.starts_with("src/")
                || p.starts_with("templates/")
                || p.starts_with("config/")
                || p.starts_with("translations/")
                || p.starts_with("tests/"))
    }

    /// Applies the scenario's changes to the tree (deterministic for `seed`).
    pub fn mutate(&mut self, scenario: Scenario, seed: u64) -> Change {
        let mut ch = Change::default();
        let mut rng = Rng::derive(seed, scenario.name());
        let scale = self.entries.len().max(1) as f64 / 12_000.0;
        let k = |n: f64| ((n * scale).round() as usize).max(1);
        match scenario {
            Scenario::Initial | Scenario::Noop | Scenario::FreshCi => {}
            Scenario::Patch | Scenario::CiPatch => self.patch(&mut rng, &k, &mut ch),
            Scenario::Minor => self.minor(&mut rng, &k, &mut ch),
            Scenario::Vendor => self.vendor_upgrade(&mut rng, &k, &mut ch),
        }
        ch
    }

    /// ~50 files: mostly app code, a handful in one vendor package (a patch bump). `k` scales
    /// a count for 12,000 files to this corpus.
    fn patch(&mut self, rng: &mut Rng, k: &dyn Fn(f64) -> usize, ch: &mut Change) {
        let app = self.paths_where(Corpus::is_app_text);
        for p in Corpus::sample(rng, &app, k(42.0)) {
            let ops = rng.range(1, 4);
            self.edit(rng, &p, ops, ch);
        }
        let vendor = self.paths_where(|p| {
            p.starts_with("vendor/") && p.ends_with(".php") && !p.starts_with("vendor/composer/")
        });
        if let Some(first) = vendor.get(rng.below(vendor.len().max(1))) {
            let pkg: String = first.split('/').take(3).collect::<Vec<_>>().join("/");
            let in_pkg: Vec<String> = vendor
                .iter()
                .filter(|p| p.starts_with(&format!("{pkg}/")))
                .cloned()
                .collect();
            for p in Corpus::sample(rng, &in_pkg, k(6.0)) {
                let ops = rng.range(1, 3);
                self.edit(rng, &p, ops, ch);
            }
        }
        self.edit(rng, "composer.lock", 2, ch);
        self.edit(rng, "vendor/composer/installed.json", 2, ch);
    }

    /// ~300 changed, 50 added, 20 removed, 30 renamed, assets rebuilt.
    fn minor(&mut self, rng: &mut Rng, k: &dyn Fn(f64) -> usize, ch: &mut Change) {
        let app = self.paths_where(Corpus::is_app_text);
        let targets = Corpus::sample(rng, &app, k(290.0) + k(30.0));
        let (renames, edits) = targets.split_at(k(30.0).min(targets.len()));
        for p in edits {
            let ops = 1 + rng.skewed(30);
            self.edit(rng, p, ops, ch);
        }
        self.rename(rng, renames, ch);
        // 20 removed.
        let app = self.paths_where(|p| Corpus::is_app_text(p) && !ch.changed.contains(p));
        for p in Corpus::sample(rng, &app, k(20.0)) {
            self.remove(&p, ch);
        }
        self.add_sources(rng, k(50.0), ch);
        self.rebuild_assets(rng, ch);
        self.edit(rng, "composer.lock", 4, ch);
        self.refresh_autoload(ch);
    }

    /// Two thirds of `renames` moved as they are, one third moved and edited (a class moved to
    /// another namespace changes its `namespace` line).
    fn rename(&mut self, rng: &mut Rng, renames: &[String], ch: &mut Change) {
        let new_dir = format!("src/{}", pascal(&[*rng.pick(&WORDS), *rng.pick(&WORDS)]));
        for (i, old) in renames.iter().enumerate() {
            let Some(node) = self.entries.remove(old) else {
                continue;
            };
            let file = old.rsplit('/').next().unwrap_or("x");
            let new = if old.starts_with("src/") {
                format!("{new_dir}/{file}")
            } else {
                format!("{}/moved/{file}", old.split('/').next().unwrap_or("src"))
            };
            if self.entries.contains_key(&new) {
                self.entries.insert(old.clone(), node);
                continue;
            }
            ch.removed.insert(old.clone());
            self.entries.insert(new.clone(), node);
            if i % 3 == 2 {
                self.edit(rng, &new, 1, ch);
                ch.changed.remove(&new);
            }
            ch.renamed.push((old.clone(), new));
        }
    }

    /// `count` new classes and templates.
    fn add_sources(&mut self, rng: &mut Rng, count: usize, ch: &mut Change) {
        let vocab = Vocab::new(rng, 60);
        let mut added = 0;
        while added < count {
            let (path, text) = if rng.chance(0.75) {
                let class = vocab.class(rng);
                let dir = rng.pick(&[
                    "Controller",
                    "Service",
                    "Entity",
                    "Form/Type",
                    "Message",
                    "MessageHandler",
                ]);
                let f = PhpFile {
                    vocab: &vocab,
                    namespace: format!("App\\{}", dir.replace('/', "\\")),
                    class: class.clone(),
                    uses: vec![],
                    header: "",
                };
                let size = text_size(rng);
                (format!("src/{dir}/{class}.php"), php_class(rng, &f, size))
            } else {
                let size = rng.lognormal(2500.0, 0.8, 200.0, 40_000.0);
                (
                    format!(
                        "templates/{}/{}.html.twig",
                        vocab.word(rng),
                        vocab.snake(rng)
                    ),
                    twig_template(rng, &vocab, size),
                )
            };
            if self.entries.contains_key(&path) {
                continue;
            }
            self.put_text(path.clone(), text);
            ch.added.insert(path);
            added += 1;
        }
    }

    /// The front-end bundle is rebuilt: one asset gets a new content hash in its name and
    /// scattered changes, another changes in place; two images replaced.
    fn rebuild_assets(&mut self, rng: &mut Rng, ch: &mut Change) {
        let assets = self.paths_where(|p| p.starts_with("public/build/"));
        if let Some(old) = assets.first() {
            let Some(Node::File { data, mode }) = self.entries.remove(old) else {
                unreachable!()
            };
            let data = edit_minified(rng, &data, 40);
            let (stem, ext) = old.rsplit_once('.').unwrap_or((old, "js"));
            let stem = stem.rsplit_once('.').map_or(stem, |(s, _)| s);
            let new = format!("{stem}.{:08x}.{ext}", rng.next_u64() as u32);
            self.entries.insert(new.clone(), Node::File { data, mode });
            ch.removed.insert(old.clone());
            ch.added.insert(new);
        }
        if let Some(p) = assets.get(1) {
            self.edit(rng, p, 25, ch);
        }
        let images = self.paths_where(|p| p.starts_with("public/images/") && !p.ends_with(".svg"));
        for p in Corpus::sample(rng, &images, 2) {
            if let Some(Node::File { data, .. }) = self.entries.get_mut(&p) {
                let ext = p.rsplit('.').next().unwrap_or("png").to_string();
                *data = image(rng, &ext, data.len());
                ch.changed.insert(p);
            }
        }
    }

    /// Upgrades whole packages until about a third of vendor/ has changed.
    fn vendor_upgrade(&mut self, rng: &mut Rng, k: &dyn Fn(f64) -> usize, ch: &mut Change) {
        let vendor = self.paths_where(|p| {
            p.starts_with("vendor/")
                && !p.starts_with("vendor/composer/")
                && !p.starts_with("vendor/bin/")
        });
        let mut by_pkg: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &vendor {
            let pkg: String = p.split('/').take(3).collect::<Vec<_>>().join("/");
            by_pkg.entry(pkg).or_default().push(p.clone());
        }
        let mut pkgs: Vec<String> = by_pkg.keys().cloned().collect();
        let goal = vendor.len() / 3;
        let mut changed = 0;
        while changed < goal && !pkgs.is_empty() {
            let pkg = pkgs.remove(rng.below(pkgs.len()));
            let files = &by_pkg[&pkg];
            let vocab = Vocab::new(rng, 40);
            for p in files {
                if changed >= goal {
                    break;
                }
                if !rng.chance(0.88) {
                    continue;
                }
                let ops = if rng.chance(0.12) {
                    rng.range(15, 60)
                } else {
                    rng.range(1, 10)
                };
                self.edit(rng, p, ops, ch);
                changed += 1;
            }
            // A release adds and drops a few files too.
            for _ in 0..rng.range(0, 3) {
                let class = vocab.class(rng);
                let path = format!("{pkg}/src/{class}.php");
                // `pkg` may be a file directly under vendor/ (vendor/autoload.php): no package.
                if self.entries.contains_key(&path) || self.entries.contains_key(&pkg) {
                    continue;
                }
                let f = PhpFile {
                    vocab: &vocab,
                    namespace: pkg.trim_start_matches("vendor/").replace('/', "\\"),
                    class,
                    uses: vec![],
                    header: "",
                };
                let size = text_size(rng);
                self.put_text(path.clone(), php_class(rng, &f, size));
                ch.added.insert(path);
            }
            if rng.chance(0.5) && files.len() > 10 {
                let victim = files[rng.below(files.len())].clone();
                if self.entries.contains_key(&victim) && victim.ends_with(".php") {
                    self.remove(&victim, ch);
                }
            }
        }
        self.edit(rng, "composer.lock", k(60.0), ch);
        self.edit(rng, "vendor/composer/installed.json", k(60.0), ch);
        self.refresh_autoload(ch);
    }

    pub(super) fn refresh_autoload(&mut self, ch: &mut Change) {
        let before = (
            self.entries
                .get("vendor/composer/autoload_classmap.php")
                .cloned(),
            self.entries
                .get("vendor/composer/autoload_static.php")
                .cloned(),
        );
        regenerate_autoload(self);
        for (p, old) in [
            ("vendor/composer/autoload_classmap.php", before.0),
            ("vendor/composer/autoload_static.php", before.1),
        ] {
            if self.entries.get(p) != old.as_ref() {
                ch.changed.insert(p.to_string());
            }
        }
    }
}
