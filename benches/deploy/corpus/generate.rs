//! The generator: a whole first release from `(files, seed)`.

use super::*;
use std::fmt::Write as _;

/// Text sizes: log-normal, median 3.4 KB, so most files are 1–30 KB.
pub(super) fn text_size(rng: &mut Rng) -> usize {
    rng.lognormal(3400.0, 0.9, 250.0, 90_000.0)
}

pub(super) struct Package {
    root: String,
    namespace: String,
    vocab: Vocab,
    header: String,
    subdirs: Vec<String>,
    files: usize,
    minified: usize,
}

pub(super) fn ns_part(word: &str) -> String {
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
        let vendor = *rng.pick(&VENDORS);
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

pub(super) fn composer_lock(rng: &mut Rng, packages: &[Package]) -> String {
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
pub(super) fn regenerate_autoload(c: &mut Corpus) {
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
pub(super) fn class_path(root: &str, fq: &str) -> Option<String> {
    let parts: Vec<&str> = fq.split('\\').collect();
    if root == "src" {
        Some(format!("src/{}.php", parts.get(1..)?.join("/")))
    } else {
        Some(format!("{root}/src/{}.php", parts.get(2..)?.join("/")))
    }
}
