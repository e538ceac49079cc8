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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Bumped whenever the generator's output changes (it keys cached lower bounds).
pub const GENERATOR_VERSION: u32 = 1;

/// Base mtime of every file of the first release (2023-11-14).
pub const BASE_MTIME: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// PRNG

/// SplitMix64: tiny, fast, and identical everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// A generator for a named sub-stream (so adding draws to one part does not shift others).
    pub fn derive(seed: u64, name: &str) -> Rng {
        let mut h = seed ^ 0xCBF2_9CE4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01B3);
        }
        Rng::new(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// One of `words`.
    pub fn word(&mut self, words: &[&'static str]) -> &'static str {
        words[self.below(words.len())]
    }

    /// An index in [0, n) skewed toward 0 (a cheap Zipf-like choice).
    pub fn skewed(&mut self, n: usize) -> usize {
        let u = self.f64();
        ((u * u * u) * n as f64) as usize % n
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-12);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Log-normal with the given median and sigma, clamped to [lo, hi].
    pub fn lognormal(&mut self, median: f64, sigma: f64, lo: f64, hi: f64) -> usize {
        (median * (sigma * self.normal()).exp()).clamp(lo, hi) as usize
    }

    /// Log-uniform in [lo, hi].
    pub fn log_uniform(&mut self, lo: f64, hi: f64) -> usize {
        (lo * (hi / lo).powf(self.f64())) as usize
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Vocabulary

const WORDS: &[&str] = &[
    "account",
    "action",
    "adapter",
    "address",
    "admin",
    "alias",
    "amount",
    "argument",
    "array",
    "asset",
    "attribute",
    "audit",
    "author",
    "batch",
    "bearer",
    "binding",
    "block",
    "body",
    "booking",
    "bridge",
    "bucket",
    "buffer",
    "bundle",
    "cache",
    "callback",
    "capture",
    "cart",
    "catalog",
    "category",
    "channel",
    "charset",
    "checkout",
    "child",
    "choice",
    "claim",
    "client",
    "closure",
    "code",
    "collection",
    "column",
    "command",
    "comment",
    "compiler",
    "component",
    "condition",
    "config",
    "connection",
    "constraint",
    "consumer",
    "container",
    "content",
    "context",
    "controller",
    "cookie",
    "country",
    "coupon",
    "credential",
    "criteria",
    "currency",
    "cursor",
    "customer",
    "data",
    "date",
    "debug",
    "decoder",
    "default",
    "definition",
    "delivery",
    "dependency",
    "descriptor",
    "device",
    "digest",
    "dispatcher",
    "document",
    "domain",
    "driver",
    "dump",
    "element",
    "email",
    "encoder",
    "endpoint",
    "entity",
    "entry",
    "environment",
    "error",
    "event",
    "exception",
    "expression",
    "extension",
    "factory",
    "feature",
    "field",
    "file",
    "filter",
    "firewall",
    "flag",
    "flow",
    "form",
    "format",
    "fragment",
    "gateway",
    "generator",
    "group",
    "guard",
    "handler",
    "hash",
    "header",
    "helper",
    "host",
    "identifier",
    "image",
    "import",
    "index",
    "info",
    "input",
    "instance",
    "integration",
    "interval",
    "inventory",
    "invoice",
    "item",
    "iterator",
    "job",
    "journal",
    "kernel",
    "key",
    "label",
    "language",
    "layout",
    "limit",
    "line",
    "link",
    "listener",
    "loader",
    "locale",
    "lock",
    "log",
    "login",
    "mailer",
    "manager",
    "mapping",
    "marker",
    "match",
    "media",
    "member",
    "memory",
    "menu",
    "message",
    "metadata",
    "method",
    "middleware",
    "migration",
    "mode",
    "model",
    "module",
    "money",
    "name",
    "node",
    "normalizer",
    "notification",
    "number",
    "object",
    "offset",
    "option",
    "order",
    "origin",
    "output",
    "owner",
    "package",
    "page",
    "pager",
    "parameter",
    "parser",
    "part",
    "password",
    "path",
    "payload",
    "payment",
    "period",
    "permission",
    "persister",
    "pipeline",
    "plugin",
    "policy",
    "pool",
    "position",
    "post",
    "prefix",
    "price",
    "priority",
    "process",
    "product",
    "profile",
    "profiler",
    "property",
    "provider",
    "proxy",
    "publisher",
    "query",
    "queue",
    "quota",
    "range",
    "rate",
    "reader",
    "reason",
    "receipt",
    "record",
    "reference",
    "refresh",
    "region",
    "registry",
    "relation",
    "renderer",
    "report",
    "repository",
    "request",
    "resolver",
    "resource",
    "response",
    "result",
    "review",
    "role",
    "route",
    "router",
    "rule",
    "runtime",
    "sample",
    "scheduler",
    "schema",
    "scope",
    "secret",
    "section",
    "security",
    "segment",
    "selector",
    "sender",
    "sequence",
    "serializer",
    "server",
    "service",
    "session",
    "setting",
    "shipment",
    "signal",
    "signature",
    "site",
    "slot",
    "slug",
    "snapshot",
    "source",
    "stack",
    "stamp",
    "state",
    "statement",
    "status",
    "step",
    "stock",
    "storage",
    "store",
    "strategy",
    "stream",
    "subject",
    "subscriber",
    "subscription",
    "suffix",
    "summary",
    "supplier",
    "table",
    "tag",
    "target",
    "task",
    "tax",
    "template",
    "tenant",
    "term",
    "text",
    "theme",
    "thread",
    "ticket",
    "timeout",
    "timestamp",
    "token",
    "topic",
    "trace",
    "tracker",
    "transport",
    "tree",
    "trigger",
    "type",
    "unit",
    "upload",
    "url",
    "user",
    "validator",
    "value",
    "variant",
    "vendor",
    "version",
    "view",
    "visitor",
    "voter",
    "warehouse",
    "webhook",
    "widget",
    "worker",
    "workflow",
    "writer",
    "zone",
];

const VERBS: &[&str] = &[
    "get",
    "set",
    "has",
    "is",
    "add",
    "remove",
    "create",
    "build",
    "find",
    "load",
    "resolve",
    "handle",
    "process",
    "supports",
    "normalize",
    "denormalize",
    "validate",
    "render",
    "dispatch",
    "configure",
    "register",
    "apply",
    "compute",
    "convert",
    "parse",
    "format",
    "send",
    "fetch",
    "update",
    "delete",
    "persist",
    "flush",
    "reset",
    "clear",
    "merge",
    "filter",
    "map",
    "collect",
    "ensure",
    "check",
    "guess",
    "match",
    "read",
    "write",
    "open",
    "close",
    "start",
    "stop",
    "boot",
    "prepare",
    "initialize",
    "decorate",
    "extract",
    "transform",
    "encode",
    "decode",
    "sign",
    "verify",
    "lock",
    "release",
    "schedule",
    "notify",
    "emit",
    "subscribe",
    "warm",
    "dump",
];

const PROSE: &[&str] = &[
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "for",
    "with",
    "when",
    "if",
    "is",
    "are",
    "be",
    "this",
    "that",
    "it",
    "on",
    "by",
    "from",
    "as",
    "or",
    "and",
    "not",
    "can",
    "must",
    "should",
    "will",
    "may",
    "all",
    "any",
    "each",
    "no",
    "only",
    "given",
    "returned",
    "used",
    "called",
    "passed",
    "defined",
    "configured",
    "registered",
    "expected",
    "current",
    "new",
    "existing",
    "optional",
    "default",
    "valid",
    "invalid",
    "empty",
    "missing",
    "allowed",
    "available",
    "supported",
    "deprecated",
    "since",
    "version",
    "instead",
    "before",
    "after",
    "during",
    "otherwise",
    "also",
    "which",
    "whether",
    "between",
    "without",
    "until",
    "once",
    "always",
    "never",
    "unless",
];

const SUFFIXES: &[&str] = &[
    "",
    "",
    "",
    "",
    "Interface",
    "Exception",
    "Factory",
    "Handler",
    "Listener",
    "Subscriber",
    "Provider",
    "Manager",
    "Builder",
    "Resolver",
    "Loader",
    "Normalizer",
    "Voter",
    "Command",
    "Controller",
    "Repository",
    "Type",
    "Extension",
    "Trait",
    "Pass",
    "Event",
    "Helper",
    "Configuration",
    "Storage",
    "Adapter",
    "Compiler",
    "Dumper",
    "Guesser",
    "Transformer",
];

const TYPES: &[&str] = &[
    "string", "int", "bool", "array", "float", "?string", "?int", "iterable", "callable", "mixed",
    "object", "?array", "self", "static",
];

const VENDORS: &[&str] = &[
    "symfony",
    "doctrine",
    "laminas",
    "league",
    "monolog",
    "guzzlehttp",
    "psr",
    "nesbot",
    "ramsey",
    "twig",
    "egulias",
    "phpdocumentor",
    "sebastian",
    "nikic",
    "webmozart",
    "brick",
    "composer",
    "friendsofphp",
    "sensio",
    "knplabs",
    "stof",
    "lexik",
    "nelmio",
    "api-platform",
    "willdurand",
    "jms",
    "liip",
    "ocramius",
    "phpstan",
    "masterminds",
    "spatie",
    "illuminate",
    "laravel",
    "vlucas",
    "dflydev",
    "fig",
    "intervention",
    "predis",
    "aws",
    "paragonie",
];

fn capitalize(w: &str, out: &mut String) {
    let mut c = w.chars();
    if let Some(f) = c.next() {
        out.extend(f.to_uppercase());
        out.push_str(c.as_str());
    }
}

fn pascal(words: &[&str]) -> String {
    let mut s = String::new();
    for w in words {
        capitalize(w, &mut s);
    }
    s
}

fn camel(words: &[&str]) -> String {
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
struct Vocab {
    words: Vec<&'static str>,
}

impl Vocab {
    fn new(rng: &mut Rng, size: usize) -> Vocab {
        let mut words = Vec::with_capacity(size);
        while words.len() < size {
            let w = *rng.pick(WORDS);
            if !words.contains(&w) {
                words.push(w);
            }
        }
        Vocab { words }
    }

    /// A word: mostly from the package's own (skewed) list, sometimes from anywhere.
    fn word(&self, rng: &mut Rng) -> &'static str {
        if rng.chance(0.15) {
            rng.word(WORDS)
        } else {
            self.words[rng.skewed(self.words.len())]
        }
    }

    fn words(&self, rng: &mut Rng, lo: usize, hi: usize) -> Vec<&'static str> {
        let n = rng.range(lo, hi);
        (0..n).map(|_| self.word(rng)).collect()
    }

    fn var(&self, rng: &mut Rng) -> String {
        let w = self.words(rng, 1, 2);
        camel(&w)
    }

    fn method(&self, rng: &mut Rng) -> String {
        let mut s = String::from(*rng.pick(VERBS));
        for w in self.words(rng, 1, 2) {
            capitalize(w, &mut s);
        }
        s
    }

    fn class(&self, rng: &mut Rng) -> String {
        let w = self.words(rng, 1, 3);
        let mut s = pascal(&w);
        s.push_str(rng.word(SUFFIXES));
        s
    }

    fn snake(&self, rng: &mut Rng) -> String {
        self.words(rng, 1, 3).join("_")
    }

    fn sentence(&self, rng: &mut Rng, lo: usize, hi: usize) -> String {
        let n = rng.range(lo, hi);
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(' ');
            }
            let w = if rng.chance(0.55) {
                *rng.pick(PROSE)
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

// ---------------------------------------------------------------------------------------------
// The tree

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

// ---------------------------------------------------------------------------------------------
// Generators for file kinds

struct PhpFile<'a> {
    vocab: &'a Vocab,
    namespace: String,
    class: String,
    uses: Vec<String>,
    header: &'a str,
}

/// The per-package license header (identical across the package's files, as in real code).
fn license_header(vendor: &str, package: &str, author: &str) -> String {
    format!(
        "/*\n * This file is part of the {} {} package.\n *\n * (c) {} <{}@{}.example>\n *\n * For the full copyright and license information, please view the LICENSE\n * file that was distributed with this source code.\n */\n",
        pascal(&[vendor]),
        package,
        author,
        author.split(' ').next().unwrap_or("dev").to_lowercase(),
        vendor
    )
}

fn php_class(rng: &mut Rng, f: &PhpFile, size: usize) -> String {
    let v = f.vocab;
    let mut s = String::with_capacity(size + 512);
    s.push_str("<?php\n\n");
    if !f.header.is_empty() {
        s.push_str(f.header);
        s.push('\n');
    }
    if rng.chance(0.4) {
        s.push_str("declare(strict_types=1);\n\n");
    }
    let _ = writeln!(s, "namespace {};\n", f.namespace);
    for u in &f.uses {
        let _ = writeln!(s, "use {u};");
    }
    if !f.uses.is_empty() {
        s.push('\n');
    }
    let _ = writeln!(s, "/**\n * {}.\n *", v.sentence(rng, 6, 16));
    if rng.chance(0.5) {
        let _ = writeln!(s, " * {}.\n *", v.sentence(rng, 8, 20));
    }
    let _ = writeln!(s, " * @author {}\n */", author_name(rng));
    let kind = if f.class.ends_with("Interface") {
        "interface"
    } else if f.class.ends_with("Trait") {
        "trait"
    } else if rng.chance(0.3) {
        "final class"
    } else if rng.chance(0.15) {
        "abstract class"
    } else {
        "class"
    };
    let _ = write!(s, "{kind} {}", f.class);
    if kind.ends_with("class") && rng.chance(0.35) {
        let _ = write!(s, " extends {}", v.class(rng));
    }
    if kind.ends_with("class") && rng.chance(0.45) {
        let _ = write!(s, " implements {}Interface", pascal(&v.words(rng, 1, 2)));
    }
    s.push_str("\n{\n");
    let props: Vec<String> = (0..rng.range(1, 6)).map(|_| v.var(rng)).collect();
    if kind != "interface" {
        for _ in 0..rng.range(0, 3) {
            let _ = writeln!(
                s,
                "    public const {} = '{}';",
                v.snake(rng).to_uppercase(),
                v.snake(rng)
            );
        }
        s.push('\n');
        for p in &props {
            let _ = writeln!(s, "    private {} ${p};", rng.pick(TYPES));
        }
        s.push('\n');
        if rng.chance(0.6) {
            s.push_str("    public function __construct(");
            for (i, p) in props.iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                let _ = write!(s, "{} ${p}", rng.pick(TYPES));
            }
            s.push_str(")\n    {\n");
            for p in &props {
                let _ = writeln!(s, "        $this->{p} = ${p};");
            }
            s.push_str("    }\n");
        }
    }
    while s.len() < size {
        s.push('\n');
        php_method(rng, v, &props, kind == "interface", &mut s);
    }
    s.push_str("}\n");
    s
}

fn php_method(rng: &mut Rng, v: &Vocab, props: &[String], interface: bool, s: &mut String) {
    let name = v.method(rng);
    let args: Vec<(String, &str)> = (0..rng.range(0, 3))
        .map(|_| (v.var(rng), *rng.pick(TYPES)))
        .collect();
    let ret = *rng.pick(TYPES);
    if rng.chance(0.6) {
        let _ = writeln!(s, "    /**\n     * {}.\n     *", v.sentence(rng, 5, 14));
        for (a, t) in &args {
            let _ = writeln!(s, "     * @param {t} ${a} {}", v.sentence(rng, 2, 7));
        }
        if rng.chance(0.3) {
            let _ = writeln!(
                s,
                "     *\n     * @throws {}Exception",
                pascal(&[v.word(rng)])
            );
        }
        s.push_str("     */\n");
    }
    let vis = if interface || rng.chance(0.6) {
        "public"
    } else if rng.chance(0.5) {
        "private"
    } else {
        "protected"
    };
    let _ = write!(s, "    {vis} function {name}(");
    for (i, (a, t)) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{t} ${a}");
        if rng.chance(0.2) {
            s.push_str(" = null");
        }
    }
    let _ = write!(s, "): {ret}");
    if interface {
        s.push_str(";\n");
        return;
    }
    s.push_str("\n    {\n");
    let mut locals: Vec<String> = args.iter().map(|(a, _)| a.clone()).collect();
    for _ in 0..rng.range(2, 9) {
        php_statement(rng, v, props, &mut locals, 2, s);
    }
    let r = if locals.is_empty() {
        format!("$this->{}", rng.pick(props))
    } else {
        format!("${}", rng.pick(&locals))
    };
    let _ = writeln!(s, "        return {r};\n    }}");
}

fn php_expr(rng: &mut Rng, v: &Vocab, props: &[String], locals: &[String]) -> String {
    let operand = |rng: &mut Rng| -> String {
        if !locals.is_empty() && rng.chance(0.5) {
            format!("${}", rng.pick(locals))
        } else {
            format!("$this->{}", rng.pick(props))
        }
    };
    match rng.below(9) {
        0 => format!("$this->{}({})", v.method(rng), operand(rng)),
        1 => format!("{}->{}()", operand(rng), v.method(rng)),
        2 => format!("new {}({}, '{}')", v.class(rng), operand(rng), v.snake(rng)),
        3 => format!("{}['{}'] ?? {}", operand(rng), v.snake(rng), operand(rng)),
        4 => format!(
            "\\sprintf('{} \"%s\".', {})",
            v.sentence(rng, 3, 8),
            operand(rng)
        ),
        5 => format!(
            "array_map(static fn ($item) => $item->{}(), {})",
            v.method(rng),
            operand(rng)
        ),
        6 => format!("{}::{}({})", v.class(rng), v.method(rng), operand(rng)),
        7 => format!("{} + {}", operand(rng), rng.below(1000)),
        _ => format!("self::{}", v.snake(rng).to_uppercase()),
    }
}

fn php_statement(
    rng: &mut Rng,
    v: &Vocab,
    props: &[String],
    locals: &mut Vec<String>,
    depth: usize,
    s: &mut String,
) {
    let ind = "    ".repeat(depth);
    let nested = depth < 4;
    match rng.below(12) {
        0..=2 => {
            let l = v.var(rng);
            let e = php_expr(rng, v, props, locals);
            let _ = writeln!(s, "{ind}${l} = {e};");
            locals.push(l);
        }
        3 if nested => {
            let e = php_expr(rng, v, props, locals);
            let _ = writeln!(s, "{ind}if (null === {e}) {{");
            let _ = writeln!(
                s,
                "{ind}    throw new {}Exception(\\sprintf('{} \"%s\" {}.', {}));",
                pascal(&[v.word(rng)]),
                v.sentence(rng, 2, 6),
                v.sentence(rng, 2, 6).to_lowercase(),
                php_expr(rng, v, props, locals)
            );
            let _ = writeln!(s, "{ind}}}\n");
        }
        4 if nested => {
            let item = v.var(rng);
            let _ = writeln!(
                s,
                "{ind}foreach ({} as $key => ${item}) {{",
                php_expr(rng, v, props, locals)
            );
            locals.push(item);
            for _ in 0..rng.range(1, 3) {
                php_statement(rng, v, props, locals, depth + 1, s);
            }
            let _ = writeln!(s, "{ind}}}");
        }
        5 if nested => {
            let _ = writeln!(
                s,
                "{ind}if (!isset(${}['{}'])) {{",
                locals.last().map_or("options", |l| l.as_str()),
                v.snake(rng)
            );
            php_statement(rng, v, props, locals, depth + 1, s);
            if rng.chance(0.4) {
                let _ = writeln!(s, "{ind}}} else {{");
                php_statement(rng, v, props, locals, depth + 1, s);
            }
            let _ = writeln!(s, "{ind}}}");
        }
        6 => {
            let _ = writeln!(s, "{ind}// {}.", v.sentence(rng, 4, 14));
        }
        7 => {
            let _ = writeln!(
                s,
                "{ind}$this->{}[{}] = {};",
                rng.pick(props),
                php_expr(rng, v, props, locals),
                php_expr(rng, v, props, locals)
            );
        }
        8 => {
            let l = v.var(rng);
            let _ = writeln!(s, "{ind}${l} = [");
            for _ in 0..rng.range(2, 6) {
                let _ = writeln!(
                    s,
                    "{ind}    '{}' => {},",
                    v.snake(rng),
                    php_expr(rng, v, props, locals)
                );
            }
            let _ = writeln!(s, "{ind}];");
            locals.push(l);
        }
        _ => {
            let _ = writeln!(
                s,
                "{ind}$this->{}({});",
                v.method(rng),
                php_expr(rng, v, props, locals)
            );
        }
    }
}

fn author_name(rng: &mut Rng) -> String {
    const FIRST: &[&str] = &[
        "Fabien",
        "Nicolas",
        "Tobias",
        "Christophe",
        "Jordi",
        "Marco",
        "Sebastian",
        "Taylor",
        "Kévin",
        "Ryan",
        "Javier",
        "Grégoire",
        "Alexander",
        "Jérémy",
        "Wouter",
        "Robin",
        "Anna",
        "Maria",
        "Yonel",
        "Titouan",
        "Oskar",
        "Mathias",
        "Hamza",
        "Jules",
        "Lukas",
        "Sara",
    ];
    const LAST: &[&str] = &[
        "Potencier",
        "Grekas",
        "Nyholm",
        "Coevoet",
        "Boggiano",
        "Pivetta",
        "Bergmann",
        "Otwell",
        "Dunglas",
        "Weaver",
        "Eguiluz",
        "Pineau",
        "Schranz",
        "Derussé",
        "de Jong",
        "Chalas",
        "Müller",
        "Rossi",
        "Ceballos",
        "Wiesner",
        "Kowalski",
        "Frank",
        "Amrouche",
        "Martin",
    ];
    format!("{} {}", rng.pick(FIRST), rng.pick(LAST))
}

fn twig_template(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 256);
    let _ = writeln!(s, "{{% extends '{}/base.html.twig' %}}\n", v.word(rng));
    let _ = writeln!(
        s,
        "{{% block title %}}{{{{ '{}.{}'|trans }}}}{{% endblock %}}\n",
        v.word(rng),
        v.snake(rng)
    );
    while s.len() < size {
        let block = v.snake(rng);
        let _ = writeln!(s, "{{% block {block} %}}");
        let _ = writeln!(
            s,
            "    <div class=\"{}-{} {}\">",
            v.word(rng),
            v.word(rng),
            v.word(rng)
        );
        for _ in 0..rng.range(2, 8) {
            match rng.below(6) {
                0 => {
                    let item = v.word(rng);
                    let _ = writeln!(s, "        {{% for {item} in {}s %}}", v.word(rng));
                    let _ = writeln!(
                        s,
                        "            <li class=\"{}\"><a href=\"{{{{ path('{}_{}', {{id: {item}.id}}) }}}}\">{{{{ {item}.{} }}}}</a></li>",
                        v.word(rng),
                        v.word(rng),
                        v.word(rng),
                        v.var(rng)
                    );
                    let _ = writeln!(s, "        {{% else %}}\n            <li>{{{{ '{}'|trans }}}}</li>\n        {{% endfor %}}", v.snake(rng));
                }
                1 => {
                    let _ = writeln!(
                        s,
                        "        {{% if {}.{} is defined and {}.{} %}}\n            <span class=\"badge badge-{}\">{{{{ {}.{}|{} }}}}</span>\n        {{% endif %}}",
                        v.word(rng),
                        v.var(rng),
                        v.word(rng),
                        v.var(rng),
                        v.word(rng),
                        v.word(rng),
                        v.var(rng),
                        rng.pick(&["escape", "upper", "date('Y-m-d')", "format_currency('EUR')", "length", "raw"])
                    );
                }
                2 => {
                    let _ = writeln!(
                        s,
                        "        <p class=\"text-{}\">{}</p>",
                        v.word(rng),
                        v.sentence(rng, 6, 18)
                    );
                }
                3 => {
                    let _ = writeln!(
                        s,
                        "        {{{{ include('{}/_{}.html.twig', {{ {}: {} }}) }}}}",
                        v.word(rng),
                        v.snake(rng),
                        v.var(rng),
                        v.var(rng)
                    );
                }
                4 => {
                    let _ = writeln!(
                        s,
                        "        <button type=\"submit\" class=\"btn btn-{}\" data-action=\"{}#{}\">{{{{ '{}.{}'|trans }}}}</button>",
                        rng.pick(&["primary", "secondary", "danger", "link"]),
                        v.word(rng),
                        v.method(rng),
                        v.word(rng),
                        v.snake(rng)
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "        {{{{ form_row(form.{}, {{ label: '{}', attr: {{ class: '{}' }} }}) }}}}",
                        v.var(rng),
                        v.sentence(rng, 1, 4),
                        v.word(rng)
                    );
                }
            }
        }
        s.push_str("    </div>\n{% endblock %}\n\n");
    }
    s
}

fn yaml_config(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 128);
    while s.len() < size {
        let _ = writeln!(s, "{}:", v.snake(rng));
        for _ in 0..rng.range(2, 7) {
            match rng.below(4) {
                0 => {
                    let _ = writeln!(
                        s,
                        "    {}: '%env({})%'",
                        v.snake(rng),
                        v.snake(rng).to_uppercase()
                    );
                }
                1 => {
                    let _ = writeln!(s, "    {}:", v.snake(rng));
                    for _ in 0..rng.range(1, 4) {
                        let _ = writeln!(s, "        - {}", v.snake(rng));
                    }
                }
                2 => {
                    let _ = writeln!(
                        s,
                        "    {}: {}",
                        v.snake(rng),
                        rng.pick(&["true", "false", "null", "~"])
                    );
                }
                _ => {
                    let _ = writeln!(
                        s,
                        "    {}: '{}\\{}'",
                        v.snake(rng),
                        pascal(&[v.word(rng)]),
                        v.class(rng)
                    );
                }
            }
        }
        s.push('\n');
    }
    s
}

fn xliff(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::with_capacity(size + 256);
    s.push_str("<?xml version=\"1.0\"?>\n<xliff version=\"1.2\" xmlns=\"urn:oasis:names:tc:xliff:document:1.2\">\n    <file source-language=\"en\" datatype=\"plaintext\" original=\"file.ext\">\n        <body>\n");
    let mut id = 1;
    while s.len() < size {
        let src = v.sentence(rng, 3, 12);
        let _ = writeln!(
            s,
            "            <trans-unit id=\"{id}\">\n                <source>{src}.</source>\n                <target>{}.</target>\n            </trans-unit>",
            v.sentence(rng, 3, 12)
        );
        id += 1;
    }
    s.push_str("        </body>\n    </file>\n</xliff>\n");
    s
}

fn markdown(rng: &mut Rng, v: &Vocab, title: &str, size: usize) -> String {
    let mut s = format!("{title}\n{}\n\n", "=".repeat(title.len()));
    while s.len() < size {
        match rng.below(5) {
            0 => {
                let _ = writeln!(s, "## {}\n", v.sentence(rng, 2, 5));
            }
            1 => {
                let _ = writeln!(
                    s,
                    "```php\n${} = new {}();\n${}->{}('{}');\n```\n",
                    v.var(rng),
                    v.class(rng),
                    v.var(rng),
                    v.method(rng),
                    v.snake(rng)
                );
            }
            2 => {
                for _ in 0..rng.range(2, 5) {
                    let _ = writeln!(s, " * {}", v.sentence(rng, 4, 12));
                }
                s.push('\n');
            }
            _ => {
                let _ = writeln!(
                    s,
                    "{}. {}.\n",
                    v.sentence(rng, 8, 20),
                    v.sentence(rng, 6, 16)
                );
            }
        }
    }
    s
}

fn changelog(rng: &mut Rng, v: &Vocab, size: usize) -> String {
    let mut s = String::from("CHANGELOG\n=========\n\n");
    let mut major = rng.range(2, 7);
    let mut minor = 4;
    while s.len() < size {
        let _ = writeln!(s, "{major}.{minor}\n---\n");
        for _ in 0..rng.range(2, 7) {
            let _ = writeln!(
                s,
                " * {} `{}::{}()` {}",
                rng.pick(&["Add", "Deprecate", "Remove", "Fix", "Allow"]),
                v.class(rng),
                v.method(rng),
                v.sentence(rng, 3, 10).to_lowercase()
            );
        }
        s.push('\n');
        if minor == 0 {
            major -= 1;
            minor = 4;
        } else {
            minor -= 1;
        }
        if major == 0 {
            break;
        }
    }
    s
}

const MIT: &str = "Copyright (c) 2004-present YEAR HOLDER\n\nPermission is hereby granted, free of charge, to any person obtaining a copy\nof this software and associated documentation files (the \"Software\"), to deal\nin the Software without restriction, including without limitation the rights\nto use, copy, modify, merge, publish, distribute, sublicense, and/or sell\ncopies of the Software, and to permit persons to whom the Software is furnished\nto do so, subject to the following conditions:\n\nThe above copyright notice and this permission notice shall be included in all\ncopies or substantial portions of the Software.\n\nTHE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR\nIMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,\nFITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE\nAUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER\nLIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,\nOUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN\nTHE SOFTWARE.\n";

fn composer_json(rng: &mut Rng, v: &Vocab, name: &str, namespace: &str) -> String {
    let mut s = format!(
        "{{\n    \"name\": \"{name}\",\n    \"type\": \"library\",\n    \"description\": \"{}\",\n    \"keywords\": [",
        v.sentence(rng, 4, 10)
    );
    for i in 0..rng.range(1, 5) {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "\"{}\"", v.word(rng));
    }
    let _ = write!(
        s,
        "],\n    \"homepage\": \"https://{}.example.org\",\n    \"license\": \"MIT\",\n    \"authors\": [\n        {{\n            \"name\": \"{}\",\n            \"email\": \"{}@example.org\"\n        }}\n    ],\n    \"require\": {{\n        \"php\": \">=8.1\"",
        name.replace('/', "-"),
        author_name(rng),
        v.word(rng)
    );
    for _ in 0..rng.range(0, 6) {
        let _ = write!(
            s,
            ",\n        \"{}/{}\": \"^{}.{}\"",
            rng.pick(VENDORS),
            v.word(rng),
            rng.range(1, 7),
            rng.range(0, 4)
        );
    }
    let _ = write!(
        s,
        "\n    }},\n    \"autoload\": {{\n        \"psr-4\": {{ \"{}\\\\\": \"src/\" }},\n        \"exclude-from-classmap\": [\n            \"/Tests/\"\n        ]\n    }},\n    \"minimum-stability\": \"dev\"\n}}\n",
        namespace.replace('\\', "\\\\")
    );
    s
}

/// One line of minified JavaScript-like tokens.
fn minified_js(rng: &mut Rng, v: &Vocab, size: usize) -> Vec<u8> {
    let mut s = String::with_capacity(size + 256);
    s.push_str("/*! For license information please see app.js.LICENSE.txt */\n");
    let ids: Vec<String> = (0..60)
        .map(|i| {
            let a = (b'a' + (i % 26) as u8) as char;
            if i < 26 {
                a.to_string()
            } else {
                format!("{a}{}", (b'A' + (i / 26) as u8) as char)
            }
        })
        .collect();
    let mut module = rng.range(1000, 9000);
    while s.len() < size {
        module += rng.range(1, 40);
        let _ = write!(s, "{module}:function(e,t,n){{\"use strict\";");
        for _ in 0..rng.range(3, 14) {
            let a = rng.pick(&ids);
            let b = rng.pick(&ids);
            match rng.below(7) {
                0 => {
                    let _ = write!(s, "var {a}=n({});", rng.range(1000, 9999));
                }
                1 => {
                    let _ = write!(
                        s,
                        "{a}.{}=function({b}){{return this.{}({b})}};",
                        v.method(rng),
                        v.var(rng)
                    );
                }
                2 => {
                    let _ = write!(
                        s,
                        "if(!{a}||{a}.length<{})throw new Error(\"{}\");",
                        rng.below(64),
                        v.sentence(rng, 2, 6)
                    );
                }
                3 => {
                    let _ = write!(
                        s,
                        "for(var {a}=0;{a}<{b}.length;{a}++){b}[{a}]&&{b}[{a}].{}();",
                        v.method(rng)
                    );
                }
                4 => {
                    let _ = write!(
                        s,
                        "{a}={{{}:\"{}\",{}:{},{}:!0}};",
                        v.var(rng),
                        v.snake(rng),
                        v.var(rng),
                        rng.below(10000),
                        v.var(rng)
                    );
                }
                5 => {
                    let _ = write!(s, "Object.defineProperty({a},\"{}\",{{enumerable:!0,get:function(){{return {b}.{}}}}});", v.var(rng), v.var(rng));
                }
                _ => {
                    let _ = write!(
                        s,
                        "{a}.prototype.{}=function({b},{}){{return {b}?{}:void 0}};",
                        v.method(rng),
                        rng.pick(&ids),
                        rng.pick(&ids)
                    );
                }
            }
        }
        s.push_str("},");
    }
    s.push('\n');
    s.into_bytes()
}

fn minified_css(rng: &mut Rng, v: &Vocab, size: usize) -> Vec<u8> {
    const PROPS: &[&str] = &[
        "display:flex",
        "display:block",
        "display:none",
        "position:relative",
        "position:absolute",
        "margin:0",
        "padding:0 .5rem",
        "padding:.375rem .75rem",
        "font-weight:600",
        "line-height:1.5",
        "border:1px solid transparent",
        "border-radius:.25rem",
        "text-decoration:none",
        "cursor:pointer",
        "overflow:hidden",
        "width:100%",
        "align-items:center",
        "justify-content:space-between",
        "flex-wrap:wrap",
        "z-index:1000",
        "transition:color .15s ease-in-out,background-color .15s ease-in-out",
    ];
    let mut s = String::with_capacity(size + 256);
    s.push_str("@charset \"UTF-8\";");
    while s.len() < size {
        let _ = write!(s, ".{}-{}", v.word(rng), v.word(rng));
        if rng.chance(0.4) {
            let _ = write!(
                s,
                ":{}",
                rng.pick(&["hover", "focus", "active", "not(:disabled)", "first-child"])
            );
        }
        s.push('{');
        for i in 0..rng.range(1, 6) {
            if i > 0 {
                s.push(';');
            }
            if rng.chance(0.35) {
                let _ = write!(s, "color:#{:06x}", rng.next_u64() & 0xff_ffff);
            } else {
                s.push_str(rng.word(PROPS));
            }
        }
        s.push('}');
        if rng.chance(0.05) {
            let _ = write!(
                s,
                "@media (min-width:{}px){{",
                rng.pick(&[576, 768, 992, 1200, 1400])
            );
            let _ = write!(
                s,
                ".{}-{}{{{}}}}}",
                v.word(rng),
                rng.pick(&["sm", "md", "lg", "xl"]),
                rng.pick(PROPS)
            );
        }
    }
    s.push('\n');
    s.into_bytes()
}

/// An "image": a real signature and header-ish prefix, then incompressible bytes.
fn image(rng: &mut Rng, ext: &str, size: usize) -> Vec<u8> {
    let mut v = match ext {
        "png" => b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
        "jpg" => b"\xff\xd8\xff\xe0\0\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0".to_vec(),
        "woff2" => b"wOF2\0\x01\0\0".to_vec(),
        _ => b"GIF89a".to_vec(),
    };
    v.extend(rng.bytes(size.saturating_sub(v.len())));
    v
}

fn svg(rng: &mut Rng, size: usize) -> String {
    let mut s = String::from("<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 512 512\">");
    while s.len() < size {
        let _ = write!(
            s,
            "<path fill=\"#{:06x}\" d=\"M",
            rng.next_u64() & 0xff_ffff
        );
        for _ in 0..rng.range(4, 20) {
            let _ = write!(
                s,
                "{}.{} {}.{}{}",
                rng.below(512),
                rng.below(100),
                rng.below(512),
                rng.below(100),
                rng.pick(&["L", "C", "l", "c", "H", "V", "z"])
            );
        }
        s.push_str("\"/>");
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------------
// The generator

/// Text sizes: log-normal, median 3.4 KB, so most files are 1–30 KB.
fn text_size(rng: &mut Rng) -> usize {
    rng.lognormal(3400.0, 0.9, 250.0, 90_000.0)
}

struct Package {
    root: String,
    namespace: String,
    vocab: Vocab,
    header: String,
    subdirs: Vec<String>,
    files: usize,
    minified: usize,
}

fn ns_part(word: &str) -> String {
    word.split('-').map(|w| pascal(&[w])).collect()
}

/// Builds the corpus for about `files` files (12,000 ≈ 80 MB).
pub fn generate(files: usize, seed: u64) -> Corpus {
    let files = files.max(60);
    let scale = files as f64 / 12_000.0;
    let n = |frac: f64, min: usize| ((frac * files as f64).round() as usize).max(min);
    let mut c = Corpus::default();
    let mut rng = Rng::derive(seed, "tree");

    // -- the application ----------------------------------------------------------------------
    let app_vocab = Vocab::new(&mut rng, 90);
    let app_dirs = [
        "Controller",
        "Controller/Admin",
        "Controller/Api",
        "Entity",
        "Repository",
        "Form",
        "Form/Type",
        "Service",
        "EventSubscriber",
        "Command",
        "Security",
        "Security/Voter",
        "Twig",
        "Message",
        "MessageHandler",
        "Validator",
        "Serializer",
        "DataFixtures",
    ];
    for i in 0..n(0.05, 8) {
        let dir = app_dirs[i % app_dirs.len()];
        let class = app_vocab.class(&mut rng);
        let path = format!("src/{dir}/{class}.php");
        if c.entries.contains_key(&path) {
            continue;
        }
        let namespace = format!("App\\{}", dir.replace('/', "\\"));
        c.classes
            .push(("src".into(), format!("{namespace}\\{class}")));
        let uses = (0..rng.range(2, 9))
            .map(|_| {
                format!(
                    "App\\{}\\{}",
                    app_dirs[rng.below(app_dirs.len())].replace('/', "\\"),
                    app_vocab.class(&mut rng)
                )
            })
            .collect();
        let size = text_size(&mut rng);
        let f = PhpFile {
            vocab: &app_vocab,
            namespace,
            class,
            uses,
            header: "",
        };
        let text = php_class(&mut rng, &f, size);
        c.put_text(path, text);
    }
    for i in 0..n(0.01, 2) {
        let path = format!(
            "migrations/Version2023{:02}{:02}{:06}.php",
            1 + i % 12,
            1 + i % 28,
            rng.below(240_000)
        );
        let f = PhpFile {
            vocab: &app_vocab,
            namespace: "DoctrineMigrations".into(),
            class: "Version".into(),
            uses: vec![
                "Doctrine\\DBAL\\Schema\\Schema".into(),
                "Doctrine\\Migrations\\AbstractMigration".into(),
            ],
            header: "",
        };
        let size = rng.lognormal(1800.0, 0.6, 400.0, 12_000.0);
        c.put_text(path, php_class(&mut rng, &f, size));
    }
    let sections: Vec<&str> = (0..12).map(|_| app_vocab.word(&mut rng)).collect();
    for _ in 0..n(0.025, 4) {
        let path = format!(
            "templates/{}/{}.html.twig",
            rng.pick(&sections),
            app_vocab.snake(&mut rng)
        );
        let size = rng.lognormal(2500.0, 0.8, 200.0, 40_000.0);
        c.put_text(path, twig_template(&mut rng, &app_vocab, size));
    }
    for _ in 0..n(0.005, 3) {
        let path = format!("config/packages/{}.yaml", app_vocab.snake(&mut rng));
        let size = rng.lognormal(900.0, 0.7, 100.0, 10_000.0);
        c.put_text(path, yaml_config(&mut rng, &app_vocab, size));
    }
    for name in ["services", "routes", "bundles", "preload", "reference"] {
        let size = rng.lognormal(3000.0, 0.5, 500.0, 20_000.0);
        c.put_text(
            format!("config/{name}.yaml"),
            yaml_config(&mut rng, &app_vocab, size),
        );
    }
    let locales = [
        "en", "fr", "de", "es", "it", "nl", "pl", "pt_BR", "ja", "zh_CN",
    ];
    for i in 0..n(0.004, 2) {
        let path = format!(
            "translations/{}+intl-icu.{}.xlf",
            ["messages", "validators", "security", "admin", "emails"][i / locales.len() % 5],
            locales[i % locales.len()]
        );
        let size = rng.lognormal(6000.0, 0.7, 500.0, 60_000.0);
        c.put_text(path, xliff(&mut rng, &app_vocab, size));
    }
    for _ in 0..n(0.015, 2) {
        let class = format!("{}Test", pascal(&app_vocab.words(&mut rng, 1, 3)));
        let path = format!("tests/{}/{class}.php", rng.pick(&app_dirs[..8]));
        let f = PhpFile {
            vocab: &app_vocab,
            namespace: "App\\Tests".into(),
            class,
            uses: vec!["PHPUnit\\Framework\\TestCase".into()],
            header: "",
        };
        let size = text_size(&mut rng);
        c.put_text(path, php_class(&mut rng, &f, size));
    }
    // Built assets (Webpack Encore output) and static images.
    let app_minified = ((12.0 * scale).round() as usize).max(1);
    for i in 0..app_minified {
        let hash = format!("{:08x}", rng.next_u64() as u32);
        let size = rng.log_uniform(100_000.0, 1_000_000.0);
        if i % 3 == 2 {
            c.put(
                format!("public/build/{}.{hash}.css", app_vocab.word(&mut rng)),
                minified_css(&mut rng, &app_vocab, size),
            );
        } else {
            c.put(
                format!("public/build/{}.{hash}.js", app_vocab.word(&mut rng)),
                minified_js(&mut rng, &app_vocab, size),
            );
        }
    }
    for i in 0..n(0.004, 2) {
        let ext = ["png", "jpg", "png", "svg", "woff2", "gif"][i % 6];
        let dir = if ext == "woff2" { "fonts" } else { "images" };
        let size = rng.log_uniform(3_000.0, 250_000.0);
        let data = if ext == "svg" {
            svg(&mut rng, size / 4).into_bytes()
        } else {
            image(&mut rng, ext, size)
        };
        c.put(
            format!("public/{dir}/{}-{}.{ext}", app_vocab.word(&mut rng), i),
            data,
        );
    }
    let index = "<?php\n\nuse App\\Kernel;\n\nrequire_once dirname(__DIR__).'/vendor/autoload_runtime.php';\n\nreturn function (array $context) {\n    return new Kernel($context['APP_ENV'], (bool) $context['APP_DEBUG']);\n};\n";
    c.put_text("public/index.php".into(), index.into());
    c.put_text(
        "public/robots.txt".into(),
        "User-agent: *\nDisallow: /admin/\n".into(),
    );
    c.put_text(".env".into(), "APP_ENV=prod\nAPP_SECRET=\nDATABASE_URL=\"postgresql://app:!ChangeMe!@127.0.0.1:5432/app?serverVersion=15&charset=utf8\"\nMESSENGER_TRANSPORT_DSN=doctrine://default?auto_setup=0\n".into());
    let console = "#!/usr/bin/env php\n<?php\n\nuse App\\Kernel;\nuse Symfony\\Bundle\\FrameworkBundle\\Console\\Application;\n\nrequire_once dirname(__DIR__).'/vendor/autoload_runtime.php';\n\nreturn function (array $context) {\n    $kernel = new Kernel($context['APP_ENV'], (bool) $context['APP_DEBUG']);\n\n    return new Application($kernel);\n};\n";
    c.entries.insert(
        "bin/console".into(),
        Node::File {
            data: console.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    let readme_size = rng.range(2000, 6000);
    c.put_text(
        "README.md".into(),
        markdown(&mut rng, &app_vocab, "Application", readme_size),
    );

    // -- vendor/ --------------------------------------------------------------------------------
    let budget = files.saturating_sub(c.entries.len() + 8);
    let package_count = (budget / 55).max(2);
    // Pareto-ish package sizes.
    let weights: Vec<f64> = (0..package_count)
        .map(|i| 1.0 / ((i + 3) as f64).powf(0.9))
        .collect();
    let wsum: f64 = weights.iter().sum();
    let mut packages: Vec<Package> = Vec::new();
    let mut names = BTreeSet::new();
    let vendor_minified = ((18.0 * scale).round() as usize).max(1);
    for (i, w) in weights.iter().enumerate() {
        let vendor = *rng.pick(VENDORS);
        let vsize = rng.range(40, 80);
        let vocab = Vocab::new(&mut rng, vsize);
        let name = if rng.chance(0.5) {
            vocab.word(&mut rng).to_string()
        } else {
            format!(
                "{}-{}",
                vocab.word(&mut rng),
                rng.pick(&[
                    "bundle",
                    "bridge",
                    "component",
                    "contracts",
                    "client",
                    "kit",
                    "polyfill",
                    "http",
                    "orm",
                    "common"
                ])
            )
        };
        let root = format!("vendor/{vendor}/{name}");
        if !names.insert(root.clone()) {
            continue;
        }
        let namespace = format!("{}\\{}", ns_part(vendor), ns_part(&name));
        let header = if rng.chance(0.7) {
            license_header(vendor, &name, &author_name(&mut rng))
        } else {
            String::new()
        };
        let mut subdirs = vec![String::new()];
        for _ in 0..rng.range(1, 10) {
            let parent = rng.pick(&subdirs).clone();
            let d = pascal(&[vocab.word(&mut rng)]);
            let d = if parent.is_empty() || parent.matches('/').count() >= 2 {
                d
            } else {
                format!("{parent}/{d}")
            };
            if !subdirs.contains(&d) {
                subdirs.push(d);
            }
        }
        let files = ((w / wsum) * budget as f64).round().max(3.0) as usize;
        packages.push(Package {
            root,
            namespace,
            vocab,
            header,
            subdirs,
            files,
            minified: usize::from(i % 7 == 3 && i / 7 < vendor_minified),
        });
    }
    let mut installed = String::from("{\n    \"packages\": [\n");
    for p in &packages {
        let mut rng = Rng::derive(seed, &p.root);
        let pname = p.root.trim_start_matches("vendor/").to_string();
        c.put_text(
            format!("{}/composer.json", p.root),
            composer_json(&mut rng, &p.vocab, &pname, &p.namespace),
        );
        c.put_text(
            format!("{}/LICENSE", p.root),
            MIT.replace("YEAR HOLDER", &author_name(&mut rng)),
        );
        let size = rng.lognormal(2500.0, 0.8, 300.0, 30_000.0);
        c.put_text(
            format!("{}/README.md", p.root),
            markdown(&mut rng, &p.vocab, &pname, size),
        );
        let mut made = 3;
        if rng.chance(0.4) {
            let size = rng.lognormal(6000.0, 0.8, 500.0, 60_000.0);
            c.put_text(
                format!("{}/CHANGELOG.md", p.root),
                changelog(&mut rng, &p.vocab, size),
            );
            made += 1;
        }
        for _ in 0..p.minified {
            let size = rng.log_uniform(100_000.0, 1_000_000.0);
            let data = if rng.chance(0.5) {
                minified_js(&mut rng, &p.vocab, size)
            } else {
                minified_css(&mut rng, &p.vocab, size)
            };
            let ext = if data.starts_with(b"@charset") {
                "css"
            } else {
                "js"
            };
            c.put(
                format!(
                    "{}/Resources/public/{}.min.{ext}",
                    p.root,
                    p.vocab.word(&mut rng)
                ),
                data,
            );
            made += 1;
        }
        let mut classes = Vec::new();
        let mut attempts = 0;
        while made < p.files && attempts < p.files * 3 {
            attempts += 1;
            let roll = rng.f64();
            if roll < 0.04 {
                let size = rng.lognormal(1500.0, 0.8, 200.0, 20_000.0);
                let path = format!(
                    "{}/Resources/config/{}.xml",
                    p.root,
                    p.vocab.snake(&mut rng)
                );
                let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n<container xmlns=\"http://symfony.com/schema/dic/services\">\n    <services>\n");
                while s.len() < size {
                    let _ = writeln!(s, "        <service id=\"{}.{}\" class=\"{}\\{}\">\n            <argument type=\"service\" id=\"{}\" />\n            <tag name=\"{}.{}\" />\n        </service>", p.vocab.word(&mut rng), p.vocab.snake(&mut rng), p.namespace, p.vocab.class(&mut rng), p.vocab.snake(&mut rng), p.vocab.word(&mut rng), p.vocab.word(&mut rng));
                }
                s.push_str("    </services>\n</container>\n");
                c.put_text(path, s);
            } else if roll < 0.07 {
                let size = rng.lognormal(2000.0, 0.8, 200.0, 30_000.0);
                let path = format!(
                    "{}/Resources/views/{}.html.twig",
                    p.root,
                    p.vocab.snake(&mut rng)
                );
                c.put_text(path, twig_template(&mut rng, &p.vocab, size));
            } else if roll < 0.085 {
                let size = rng.lognormal(4000.0, 0.7, 300.0, 40_000.0);
                let path = format!(
                    "{}/Resources/translations/{}.{}.xlf",
                    p.root,
                    p.vocab.word(&mut rng),
                    rng.pick(&locales)
                );
                c.put_text(path, xliff(&mut rng, &p.vocab, size));
            } else {
                let sub = rng.pick(&p.subdirs).clone();
                let class = p.vocab.class(&mut rng);
                let (path, namespace) = if sub.is_empty() {
                    (format!("{}/src/{class}.php", p.root), p.namespace.clone())
                } else {
                    (
                        format!("{}/src/{sub}/{class}.php", p.root),
                        format!("{}\\{}", p.namespace, sub.replace('/', "\\")),
                    )
                };
                if c.entries.contains_key(&path) {
                    continue;
                }
                let mut uses: Vec<String> = classes
                    .iter()
                    .rev()
                    .take(rng.range(0, 5))
                    .cloned()
                    .collect();
                for _ in 0..rng.range(0, 3) {
                    if !c.classes.is_empty() {
                        uses.push(c.classes[rng.below(c.classes.len())].1.clone());
                    }
                }
                uses.sort();
                uses.dedup();
                let size = text_size(&mut rng);
                let f = PhpFile {
                    vocab: &p.vocab,
                    namespace: namespace.clone(),
                    class: class.clone(),
                    uses,
                    header: &p.header,
                };
                c.put_text(path, php_class(&mut rng, &f, size));
                let fq = format!("{namespace}\\{class}");
                classes.push(fq.clone());
                c.classes.push((p.root.clone(), fq));
            }
            made += 1;
        }
        if rng.chance(0.08) {
            let tool = p.vocab.word(&mut rng);
            let bin = format!("{}/bin/{tool}", p.root);
            let script = format!("#!/usr/bin/env php\n<?php\n\nrequire __DIR__.'/../src/{}.php';\n\n(new {}())->run($argv);\n", p.vocab.class(&mut rng), p.vocab.class(&mut rng));
            c.entries.insert(
                bin,
                Node::File {
                    data: script.into_bytes(),
                    mode: 0o755,
                },
            );
            c.entries.insert(
                format!("vendor/bin/{tool}"),
                Node::Symlink(format!("../{}/bin/{tool}", pname)),
            );
        }
        let _ = write!(
            installed,
            "        {{\n            \"name\": \"{pname}\",\n            \"version\": \"v{}.{}.{}\",\n            \"version_normalized\": \"{0}.{1}.{2}.0\",\n            \"source\": {{ \"type\": \"git\", \"url\": \"https://git.example.org/{pname}.git\", \"reference\": \"{:040x}\" }},\n            \"type\": \"library\",\n            \"install-path\": \"../{pname}\"\n        }},\n",
            rng.range(1, 7),
            rng.range(0, 4),
            rng.range(0, 30),
            rng.next_u64() as u128 * rng.next_u64() as u128
        );
    }
    installed.push_str("    ],\n    \"dev\": false\n}\n");
    c.put_text("vendor/composer/installed.json".into(), installed);
    regenerate_autoload(&mut c);
    let mut rng2 = Rng::derive(seed, "composer.lock");
    let lock = composer_lock(&mut rng2, &packages);
    c.put_text("composer.lock".into(), lock);
    c.put_text(
        "composer.json".into(),
        composer_json(&mut rng2, &app_vocab, "acme/app", "App"),
    );
    c.put_text("vendor/autoload.php".into(), "<?php\n\n// autoload.php @generated by Composer\n\nrequire_once __DIR__ . '/composer/autoload_real.php';\n\nreturn ComposerAutoloaderInit::getLoader();\n".into());
    c
}

fn composer_lock(rng: &mut Rng, packages: &[Package]) -> String {
    let mut s = format!(
        "{{\n    \"content-hash\": \"{:032x}\",\n    \"packages\": [\n",
        rng.next_u64() as u128 * rng.next_u64() as u128
    );
    for p in packages {
        let name = p.root.trim_start_matches("vendor/");
        let _ = write!(s, "        {{\n            \"name\": \"{name}\",\n            \"version\": \"v{}.{}.{}\",\n            \"dist\": {{\n                \"type\": \"zip\",\n                \"url\": \"https://api.example.org/repos/{name}/zipball/{:040x}\",\n                \"shasum\": \"\"\n            }},\n            \"description\": \"{}\",\n            \"time\": \"2023-{:02}-{:02}T{:02}:{:02}:00+00:00\"\n        }},\n", rng.range(1, 7), rng.range(0, 4), rng.range(0, 30), rng.next_u64() as u128 * rng.next_u64() as u128, p.vocab.sentence(rng, 4, 10), rng.range(1, 12), rng.range(1, 28), rng.range(0, 23), rng.range(0, 59));
    }
    s.push_str("    ]\n}\n");
    s
}

/// Composer's generated class map and static loader: one line per class, so any class added or
/// removed changes them (as `composer dump-autoload` does).
fn regenerate_autoload(c: &mut Corpus) {
    let mut classes: Vec<(String, String)> = c
        .classes
        .iter()
        .filter(|(root, fq)| {
            let path = class_path(root, fq);
            path.is_some_and(|p| c.entries.contains_key(&p))
        })
        .cloned()
        .collect();
    classes.sort_by(|a, b| a.1.cmp(&b.1));
    classes.dedup_by(|a, b| a.1 == b.1);
    let mut map = String::from("<?php\n\n// autoload_classmap.php @generated by Composer\n\n$vendorDir = dirname(__DIR__);\n$baseDir = dirname($vendorDir);\n\nreturn array(\n");
    let mut stat = String::from("<?php\n\n// autoload_static.php @generated by Composer\n\nnamespace Composer\\Autoload;\n\nclass ComposerStaticInit\n{\n    public static $classMap = array (\n");
    for (root, fq) in &classes {
        let Some(path) = class_path(root, fq) else {
            continue;
        };
        let esc = fq.replace('\\', "\\\\");
        if let Some(rel) = path.strip_prefix("vendor/") {
            let _ = writeln!(map, "    '{esc}' => $vendorDir . '/{rel}',");
            let _ = writeln!(stat, "        '{esc}' => __DIR__ . '/..' . '/{rel}',");
        } else {
            let _ = writeln!(map, "    '{esc}' => $baseDir . '/{path}',");
            let _ = writeln!(stat, "        '{esc}' => __DIR__ . '/../..' . '/{path}',");
        }
    }
    map.push_str(");\n");
    stat.push_str("    );\n}\n");
    c.put_text("vendor/composer/autoload_classmap.php".into(), map);
    c.put_text("vendor/composer/autoload_static.php".into(), stat);
}

/// Where a class recorded as (package root, FQCN) lives. Package namespaces have two parts
/// (`Vendor\Package\Sub\Class` → `ROOT/src/Sub/Class.php`); app classes one (`App\...`).
fn class_path(root: &str, fq: &str) -> Option<String> {
    let parts: Vec<&str> = fq.split('\\').collect();
    if root == "src" {
        Some(format!("src/{}.php", parts.get(1..)?.join("/")))
    } else {
        Some(format!("{root}/src/{}.php", parts.get(2..)?.join("/")))
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations

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
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Initial,
        Scenario::Patch,
        Scenario::Minor,
        Scenario::Vendor,
        Scenario::Noop,
        Scenario::FreshCi,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Initial => "initial",
            Scenario::Patch => "patch",
            Scenario::Minor => "minor",
            Scenario::Vendor => "vendor",
            Scenario::Noop => "noop",
            Scenario::FreshCi => "fresh-ci",
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

fn is_text(path: &str) -> bool {
    [".php", ".twig", ".yaml", ".xlf", ".xml", ".md", ".json"]
        .iter()
        .any(|e| path.ends_with(e))
        && !path.starts_with("vendor/composer/")
}

fn is_minified(path: &str) -> bool {
    path.ends_with(".js") || path.ends_with(".css")
}

/// Edits `ops` lines of a text file: a word replaced, a line duplicated with a change, or a
/// line removed, at random places — what a small code change looks like to a delta algorithm.
fn edit_text(rng: &mut Rng, data: &[u8], ops: usize) -> Vec<u8> {
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
fn mutate_line(rng: &mut Rng, line: &str) -> String {
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
    let new = *rng.pick(WORDS);
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
        capitalize(rng.word(WORDS), &mut w);
    }
    format!("{}{}{}", &line[..s], w, &line[e..])
}

/// Scattered small changes through a minified asset (a rebuilt bundle: new module ids, a few
/// changed functions), `spots` of them.
fn edit_minified(rng: &mut Rng, data: &[u8], spots: usize) -> Vec<u8> {
    let mut out = data.to_vec();
    let vocab = Vocab {
        words: WORDS.to_vec(),
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
    fn paths_where(&self, f: impl Fn(&str) -> bool) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(p, n)| matches!(n, Node::File { .. }) && f(p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Picks `n` distinct paths from `pool` (fewer if the pool is smaller).
    fn sample(rng: &mut Rng, pool: &[String], n: usize) -> Vec<String> {
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

    fn edit(&mut self, rng: &mut Rng, path: &str, ops: usize, ch: &mut Change) {
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

    fn remove(&mut self, path: &str, ch: &mut Change) {
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

    /// Applies the scenario's changes to the tree (deterministic for `seed`).
    pub fn mutate(&mut self, scenario: Scenario, seed: u64) -> Change {
        let mut ch = Change::default();
        let mut rng = Rng::derive(seed, scenario.name());
        let files = self.entries.len().max(1);
        let scale = files as f64 / 12_000.0;
        let k = |n: f64| ((n * scale).round() as usize).max(1);
        let app_text = |p: &str| {
            is_text(p)
                && (p.starts_with("src/")
                    || p.starts_with("templates/")
                    || p.starts_with("config/")
                    || p.starts_with("translations/")
                    || p.starts_with("tests/"))
        };
        match scenario {
            Scenario::Initial | Scenario::Noop | Scenario::FreshCi => {}
            Scenario::Patch => {
                // ~50 files: mostly app code, a handful in one vendor package (a patch bump).
                let app = self.paths_where(app_text);
                for p in Corpus::sample(&mut rng, &app, k(42.0)) {
                    let ops = rng.range(1, 4);
                    self.edit(&mut rng, &p, ops, &mut ch);
                }
                let vendor = self.paths_where(|p| {
                    p.starts_with("vendor/")
                        && p.ends_with(".php")
                        && !p.starts_with("vendor/composer/")
                });
                if let Some(first) = vendor.get(rng.below(vendor.len().max(1))) {
                    let pkg: String = first.split('/').take(3).collect::<Vec<_>>().join("/");
                    let in_pkg: Vec<String> = vendor
                        .iter()
                        .filter(|p| p.starts_with(&format!("{pkg}/")))
                        .cloned()
                        .collect();
                    for p in Corpus::sample(&mut rng, &in_pkg, k(6.0)) {
                        let ops = rng.range(1, 3);
                        self.edit(&mut rng, &p, ops, &mut ch);
                    }
                }
                self.edit(&mut rng, "composer.lock", 2, &mut ch);
                self.edit(&mut rng, "vendor/composer/installed.json", 2, &mut ch);
            }
            Scenario::Minor => {
                let app = self.paths_where(app_text);
                let targets = Corpus::sample(&mut rng, &app, k(290.0) + k(30.0));
                let (renames, edits) = targets.split_at(k(30.0).min(targets.len()));
                for p in edits {
                    let ops = 1 + rng.skewed(30);
                    self.edit(&mut rng, p, ops, &mut ch);
                }
                // 30 renames: two thirds moved as they are, one third moved and edited (a
                // class moved to another namespace changes its `namespace` line).
                let new_dir = format!("src/{}", pascal(&[*rng.pick(WORDS), *rng.pick(WORDS)]));
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
                        self.edit(&mut rng, &new, 1, &mut ch);
                        ch.changed.remove(&new);
                    }
                    ch.renamed.push((old.clone(), new));
                }
                // 20 removed.
                let app = self.paths_where(|p| app_text(p) && !ch.changed.contains(p));
                for p in Corpus::sample(&mut rng, &app, k(20.0)) {
                    self.remove(&p, &mut ch);
                }
                // 50 added: new classes and templates.
                let vocab = Vocab::new(&mut rng, 60);
                let mut added = 0;
                while added < k(50.0) {
                    let (path, text) = if rng.chance(0.75) {
                        let class = vocab.class(&mut rng);
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
                        let size = text_size(&mut rng);
                        (
                            format!("src/{dir}/{class}.php"),
                            php_class(&mut rng, &f, size),
                        )
                    } else {
                        let size = rng.lognormal(2500.0, 0.8, 200.0, 40_000.0);
                        (
                            format!(
                                "templates/{}/{}.html.twig",
                                vocab.word(&mut rng),
                                vocab.snake(&mut rng)
                            ),
                            twig_template(&mut rng, &vocab, size),
                        )
                    };
                    if self.entries.contains_key(&path) {
                        continue;
                    }
                    self.put_text(path.clone(), text);
                    ch.added.insert(path);
                    added += 1;
                }
                // The front-end bundle is rebuilt: one asset gets a new content hash in its
                // name and scattered changes, another changes in place; two images replaced.
                let assets = self.paths_where(|p| p.starts_with("public/build/"));
                if let Some(old) = assets.first() {
                    let Some(Node::File { data, mode }) = self.entries.remove(old) else {
                        unreachable!()
                    };
                    let data = edit_minified(&mut rng, &data, 40);
                    let (stem, ext) = old.rsplit_once('.').unwrap_or((old, "js"));
                    let stem = stem.rsplit_once('.').map_or(stem, |(s, _)| s);
                    let new = format!("{stem}.{:08x}.{ext}", rng.next_u64() as u32);
                    self.entries.insert(new.clone(), Node::File { data, mode });
                    ch.removed.insert(old.clone());
                    ch.added.insert(new);
                }
                if let Some(p) = assets.get(1) {
                    self.edit(&mut rng, p, 25, &mut ch);
                }
                let images =
                    self.paths_where(|p| p.starts_with("public/images/") && !p.ends_with(".svg"));
                for p in Corpus::sample(&mut rng, &images, 2) {
                    if let Some(Node::File { data, .. }) = self.entries.get_mut(&p) {
                        let ext = p.rsplit('.').next().unwrap_or("png").to_string();
                        *data = image(&mut rng, &ext, data.len());
                        ch.changed.insert(p);
                    }
                }
                self.edit(&mut rng, "composer.lock", 4, &mut ch);
                self.refresh_autoload(&mut ch);
            }
            Scenario::Vendor => {
                // Upgrade whole packages until about a third of vendor/ has changed.
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
                    let vocab = Vocab::new(&mut rng, 40);
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
                        self.edit(&mut rng, p, ops, &mut ch);
                        changed += 1;
                    }
                    // A release adds and drops a few files too.
                    for _ in 0..rng.range(0, 3) {
                        let class = vocab.class(&mut rng);
                        let path = format!("{pkg}/src/{class}.php");
                        if self.entries.contains_key(&path) {
                            continue;
                        }
                        let f = PhpFile {
                            vocab: &vocab,
                            namespace: pkg.trim_start_matches("vendor/").replace('/', "\\"),
                            class,
                            uses: vec![],
                            header: "",
                        };
                        let size = text_size(&mut rng);
                        self.put_text(path.clone(), php_class(&mut rng, &f, size));
                        ch.added.insert(path);
                    }
                    if rng.chance(0.5) && files.len() > 10 {
                        let victim = files[rng.below(files.len())].clone();
                        if self.entries.contains_key(&victim) && victim.ends_with(".php") {
                            self.remove(&victim, &mut ch);
                        }
                    }
                }
                self.edit(&mut rng, "composer.lock", k(60.0), &mut ch);
                self.edit(&mut rng, "vendor/composer/installed.json", k(60.0), &mut ch);
                self.refresh_autoload(&mut ch);
            }
        }
        ch
    }

    fn refresh_autoload(&mut self, ch: &mut Change) {
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

// ---------------------------------------------------------------------------------------------
// On disk

fn write_node(root: &Path, path: &str, node: &Node, mtime: SystemTime) -> io::Result<()> {
    let full = root.join(path);
    if let Some(parent) = full.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::symlink_metadata(&full) {
        Ok(_) => fs::remove_file(&full)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match node {
        Node::File { data, mode } => {
            let f = fs::File::create(&full)?;
            io::Write::write_all(&mut &f, data)?;
            f.set_permissions(fs::Permissions::from_mode(*mode))?;
            f.set_modified(mtime)?;
        }
        Node::Symlink(target) => symlink(target, &full)?,
    }
    Ok(())
}

/// Writes the whole tree into `root` (which must not exist or be empty); every file gets `mtime`.
pub fn materialize(c: &Corpus, root: &Path, mtime: SystemTime) -> io::Result<()> {
    fs::create_dir_all(root)?;
    for (path, node) in &c.entries {
        write_node(root, path, node, mtime)?;
    }
    Ok(())
}

/// Applies a change made by [`Corpus::mutate`] to the tree on disk: new and changed files are
/// (re)written with `mtime`, removed ones deleted, and directories left empty removed.
pub fn apply(c: &Corpus, ch: &Change, root: &Path, mtime: SystemTime) -> io::Result<()> {
    for p in &ch.removed {
        if c.entries.contains_key(p) {
            continue;
        }
        fs::remove_file(root.join(p))?;
        let mut dir = root.join(p);
        while dir.pop() && dir != root {
            if fs::remove_dir(&dir).is_err() {
                break;
            }
        }
    }
    for p in ch.writes() {
        if let Some(node) = c.entries.get(p) {
            write_node(root, p, node, mtime)?;
        }
    }
    Ok(())
}
