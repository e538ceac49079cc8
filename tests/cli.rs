//! The command line itself through the real binary: help, completions and the manual page,
//! `--json` on usage errors, verbosity (`-q`, `-v`, `-vv`), progress and color only on a
//! terminal, a closed stdout, the target directory's creation (`--mkpath`), and the answers
//! of `rollback` and `activate` that must agree.

mod common;

use common::*;
use std::fs;
use std::process::{Command, Stdio};

/// Runs `cmd` under a pseudo-terminal (script(1)) in the test's directory; returns what the
/// terminal showed and the exit status.
fn on_a_terminal(fx: &Fx, cmd: &str, env: &[(&str, &str)]) -> (String, i32) {
    let mut c = Command::new("script");
    c.args(["-qec", cmd, "/dev/null"])
        .current_dir(fx.path(""))
        .env("HOME", &fx.home)
        .env("XDG_CACHE_HOME", fx.home.join(".cache"))
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("script(1) from util-linux");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Whether `text` holds an SGR (color or style) escape sequence: ESC [ digits/semicolons m.
fn has_sgr(text: &str) -> bool {
    text.split('\x1b').skip(1).any(|rest| {
        let Some(body) = rest.strip_prefix('[') else {
            return false;
        };
        let end = body.find(|c: char| !(c.is_ascii_digit() || c == ';'));
        matches!(end, Some(i) if body[i..].starts_with('m'))
    })
}

#[test]
fn help_lists_the_exit_codes_of_the_readme() {
    let fx = Fx::new();
    let r = fx.flip(&["--help"]).success();
    for needle in [
        "Exit codes: 0 success, 1 internal error, 2 usage error, 3 locked",
        "10 an environment command failed on some targets, 11 `flip doctor` found a problem, 12 a hook failed, 13 stdout could not be written.",
    ] {
        assert!(r.stdout.contains(needle), "{needle}: {}", r.stdout);
    }
}

/// `deploy --help` and `flip config ENV` name the levels the adaptive compression really moves
/// between (both said 1-9 after the range grew to 12).
#[test]
fn help_and_config_name_the_adaptive_levels_of_the_wire() {
    use flip_wire::adapt::{MAX_LEVEL, MIN_LEVEL};
    let fx = Fx::new();
    let levels = format!("levels {MIN_LEVEL}-{MAX_LEVEL}");
    let help = fx.flip(&["deploy", "--help"]).success().stdout;
    assert!(help.contains(&format!("adaptive ({levels},")), "{help}");
    fs::write(
        fx.path("flip.toml"),
        "source = \".\"\n[env.prod]\ntargets = [\"deploy@web1:/srv/app\"]\n",
    )
    .unwrap();
    let text = fx.flip(&["config", "prod"]).success().stdout;
    assert!(
        text.contains(&format!(
            "# compress_level: default (adaptive over SSH, {levels}; off locally)"
        )),
        "{text}"
    );
}
#[test]
fn every_command_documents_its_target_id_and_json() {
    let fx = Fx::new();
    for cmd in [
        "releases", "rollback", "activate", "prune", "verify", "diff",
    ] {
        let r = fx.flip(&[cmd, "--help"]).success();
        let json = r
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with("--json"))
            .unwrap_or_else(|| panic!("{cmd}: no --json line: {}", r.stdout));
        assert!(
            json.contains("JSON"),
            "{cmd}: --json without help: {json:?}"
        );
        for arg in ["<TARGET>", "<ID>", "<OLD>", "<NEW>"] {
            if let Some(line) = r.stdout.lines().find(|l| l.trim_start().starts_with(arg)) {
                assert!(
                    line.trim().len() > arg.len() + 4,
                    "{cmd}: {arg} without help: {line:?}"
                );
            }
        }
    }
    let r = fx.flip(&["deploy", "--help"]).success();
    let exclude = r
        .stdout
        .lines()
        .skip_while(|l| !l.contains("--exclude"))
        .take(3)
        .collect::<String>();
    assert!(exclude.contains("never written"), "{exclude}");
    assert!(!exclude.contains("added to .flipignore"), "{exclude}");
}

#[test]
fn bash_completion_parses_and_offers_every_command() {
    let fx = Fx::new();
    let r = fx.flip(&["completions", "bash"]).success();
    let path = fx.path("flip.bash");
    fs::write(&path, &r.stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    // Sourced, it completes the commands after `flip `.
    let script = format!(
        ". {}; COMP_WORDS=(flip ''); COMP_CWORD=1; COMP_LINE='flip '; COMP_POINT=5; _flip flip '' flip; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "deploy",
        "releases",
        "rollback",
        "activate",
        "prune",
        "verify",
        "diff",
        "init",
        "config",
        "completions",
        "man",
    ] {
        assert!(
            words.lines().any(|w| w == cmd),
            "{cmd} not completed: {words}"
        );
    }
    assert!(!words.lines().any(|w| w == "agent"), "hidden agent offered");
}

#[test]
fn zsh_and_fish_completions_name_every_command() {
    let fx = Fx::new();
    let zsh = fx.flip(&["completions", "zsh"]).success().stdout;
    assert!(zsh.starts_with("#compdef flip"), "{}", &zsh[..80]);
    let fish = fx.flip(&["completions", "fish"]).success().stdout;
    for cmd in [
        "deploy", "releases", "rollback", "activate", "prune", "verify",
    ] {
        assert!(zsh.contains(&format!("'{cmd}:")), "zsh: {cmd}");
        assert!(fish.contains(&format!("-a \"{cmd}\"")), "fish: {cmd}");
    }
    fx.flip(&["completions", "tcsh"]).code(2);
}

#[test]
fn man_page_is_roff_with_every_command() {
    let fx = Fx::new();
    let page = fx.flip(&["man"]).success().stdout;
    assert!(page.contains(".TH flip 1"), "{}", &page[..200]);
    assert!(page.contains(".SH COMMANDS"), "no COMMANDS section");
    // One page: each command's options are on it, and no other page is referred to.
    for cmd in [
        "deploy",
        "releases",
        "rollback",
        "activate",
        "prune",
        "verify",
        "diff",
        "init",
        "config",
        "doctor",
        "completions",
    ] {
        assert!(page.contains(&format!(".SS \"flip {cmd}\"")), "man: {cmd}");
        assert!(
            !page.contains(&format!("flip\\-{cmd}(1)")),
            "man refers to flip-{cmd}(1)"
        );
    }
    for flag in ["\\-\\-mkpath", "\\-\\-strict", "\\-\\-force\\-release"] {
        assert!(page.contains(flag), "man: {flag}");
    }
    assert!(!page.contains("flip agent"), "hidden commands stay hidden");
    assert!(page.contains("Exit codes: 0 success"), "no exit codes");
}

/// A label is one line of text an operator can read back and type (`flip activate ENV
/// LABEL`): empty, spaces at either end, control characters, characters that show as nothing
/// or more than 200 characters are usage errors (exit 2) before anything is touched, and the
/// error does not repeat the value (an escape sequence in it would reach the terminal).
#[test]
fn a_label_that_is_not_one_line_of_text_is_a_usage_error() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let long = "x".repeat(201);
    for (label, why) in [
        ("", "a label is some text, not empty"),
        ("  ", "a label is some text, not empty"),
        ("v1 ", "a label has no space at its start or end"),
        (
            "v1\nv2",
            "a label is one line of text that shows as it is; this one holds \\n",
        ),
        (
            "\u{1b}[2J",
            "a label is one line of text that shows as it is; this one holds \\x1b",
        ),
        (
            "v1\u{200b}",
            "a label is one line of text that shows as it is; this one holds \\u{200b}",
        ),
        (
            "v1\u{2028}v2",
            "a label is one line of text that shows as it is; this one holds \\u{2028}",
        ),
        (&long, "a label is at most 200 characters; this one has 201"),
    ] {
        let r = fx
            .flip(&["deploy", "--label", label, src.s(), fx.root_str()])
            .code(2)
            .stderr_has(&format!("error: --label: {why}"));
        assert!(!r.stderr.contains('\u{1b}'), "{:?}", r.stderr);
        let j = fx
            .flip(&["deploy", "--json", "--label", label, src.s(), fx.root_str()])
            .code(2)
            .json();
        assert_eq!(
            j["error"]["message"],
            format!("--label: {why}"),
            "{label:?}"
        );
    }
    assert!(!fx.root.exists(), "nothing made");
    let ok = "x".repeat(200);
    fx.flip(&[
        "deploy",
        "--label",
        &format!("release 1.2 ({ok})")[..200],
        src.s(),
        fx.root_str(),
    ])
    .success();
    let list = fx.flip(&["releases", fx.root_str()]).success();
    assert!(list.stdout.contains("release 1.2 (xxx"), "{}", list.stdout);
}

#[test]
fn usage_errors_are_json_with_json() {
    let fx = Fx::new();
    // A missing argument: clap's text on stderr, the error as JSON on stdout, exit 2.
    let r = fx.flip(&["releases", "--json"]).code(2);
    assert!(r.stderr.contains("<TARGET>"), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["error"]["code"], 2, "{j}");
    assert_eq!(
        j["error"]["message"],
        "the following required arguments were not provided: <TARGET>"
    );
    // An unknown flag, a value out of range.
    let j = fx.flip(&["prune", "--json", "--bogus", "x"]).code(2).json();
    assert_eq!(j["error"]["code"], 2);
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("unexpected argument '--bogus' found"),
        "{j}"
    );
    let j = fx
        .flip(&["deploy", "a", "b", "--json", "--compress-level", "42"])
        .code(2)
        .json();
    assert_eq!(
        j["error"]["message"],
        "invalid value '42' for '--compress-level <N>': 42 is not in 0..=19"
    );
    // A negative number is a value out of range, not an unknown flag (whose tip, `-- -1`,
    // would make it an argument).
    for (args, message) in [
        (
            ["diff", "--bound-level", "-1", "a", "b"],
            "invalid value '-1' for '--bound-level <N>': -1 is not in 0..=19",
        ),
        (
            ["deploy", "--compress-level", "-3", "a", "b"],
            "invalid value '-3' for '--compress-level <N>': -3 is not in 0..=19",
        ),
        (
            ["prune", "--keep", "-1", "a", "b"],
            "invalid value '-1' for '--keep <N>': -1 is not in 0..=4294967295",
        ),
    ] {
        let mut args = args.to_vec();
        args.push("--json");
        let j = fx.flip(&args).code(2).json();
        assert_eq!(j["error"]["message"], message, "{args:?}");
    }
    // Without --json: text only, stdout empty.
    let r = fx.flip(&["releases"]).code(2);
    assert_eq!(r.stdout, "");
    // After `--`, `--json` is an argument, not the flag.
    let r = fx.flip(&["releases", "--bogus", "--", "--json"]).code(2);
    assert_eq!(r.stdout, "");
}

#[test]
fn errors_of_commands_are_json_with_the_exit_code() {
    let fx = Fx::new();
    let afile = fx.path("afile");
    fs::write(&afile, "x").unwrap();
    let r = fx.flip(&["releases", "--json", s(&afile)]).code(5);
    let j = r.json();
    assert_eq!(j["error"]["code"], 5);
    assert_eq!(
        j["error"]["message"],
        format!("{} is not a directory", afile.display())
    );
    // The help and README say the one-line text stays on stderr.
    assert_eq!(
        r.stderr,
        format!("flip: error: {} is not a directory\n", afile.display())
    );
    // diff of a tree that is not there says so (exit 4: a source problem).
    let gone = fx.path("gone");
    let j = fx
        .flip(&["diff", "--json", s(&afile), s(&gone)])
        .code(4)
        .json();
    assert_eq!(
        j["error"]["message"],
        format!("{} is not a directory", afile.display())
    );
    let src = fx.src("src");
    let j = fx
        .flip(&["diff", "--json", src.s(), s(&gone)])
        .code(4)
        .json();
    assert_eq!(
        j["error"]["message"],
        format!("{} does not exist", gone.display())
    );
}

#[test]
fn an_error_names_its_path_once() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let afile = fx.path("afile");
    fs::write(&afile, "x").unwrap();
    let a = afile.display().to_string();
    for args in [
        vec!["deploy", src.s(), &a],
        vec!["releases", &a],
        vec!["verify", &a],
        vec!["rollback", &a],
        vec!["prune", &a],
    ] {
        let r = fx.flip(&args).code(5);
        assert_eq!(
            r.stderr,
            format!("flip: error: {a} is not a directory\n"),
            "{args:?}"
        );
    }
}

/// A target named through a symlink to a directory that is not there (a disk not mounted, a
/// path not made yet) is refused, saying so: "does not exist" or "is not a directory" of a
/// name `ls` shows sent the reader after a typo. Nothing is made through the symlink.
#[test]
fn a_target_that_is_a_symlink_to_nothing_is_named_as_such_and_nothing_is_made() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let link = fx.path("app");
    std::os::unix::fs::symlink("/nonexistent-flip-disk/app", &link).unwrap();
    let l = link.display().to_string();
    for args in [
        vec!["deploy", src.s(), &l],
        vec!["deploy", "--mkpath", src.s(), &l],
        vec!["deploy", "--dry-run", src.s(), &l],
        vec!["releases", &l],
        vec!["verify", &l],
    ] {
        let r = fx.flip(&args).code(5);
        assert_eq!(
            r.stderr,
            format!("flip: error: {l} is a symlink to /nonexistent-flip-disk/app, which does not exist\n"),
            "{args:?}"
        );
    }
    assert!(!std::path::Path::new("/nonexistent-flip-disk").exists());
    assert_eq!(
        fs::read_link(&link).unwrap(),
        std::path::Path::new("/nonexistent-flip-disk/app")
    );
    // A symlink to that symlink names both hops; a target below a dangling symlink names it.
    let outer = fx.path("www");
    std::os::unix::fs::symlink("app", &outer).unwrap();
    let o = outer.display().to_string();
    let below = format!("{o}/site");
    // (The target is named first: it is not the symlink.)
    let made = format!("{below}: ");
    for (args, first) in [
        (vec!["deploy", src.s(), &o], ""),
        (vec!["releases", &o], ""),
        (vec!["deploy", "--mkpath", src.s(), &below], &made),
        (vec!["releases", &below], &made),
        (vec!["doctor", &below], &made),
    ] {
        let r = fx.flip(&args).code(5);
        assert_eq!(
            r.stderr,
            format!("flip: error: {first}{o} is a symlink to app, a symlink to /nonexistent-flip-disk/app, which does not exist\n"),
            "{args:?}"
        );
    }
    assert!(!std::path::Path::new("/nonexistent-flip-disk").exists());
}

#[test]
fn releases_of_a_directory_that_is_no_target_gives_no_deploy_advice() {
    let fx = Fx::new();
    let other = fx.src("other");
    other.file("index.php", "<?php", 0o644);
    let r = fx.flip(&["releases", other.s()]).code(5);
    assert_eq!(
        r.stderr,
        format!(
            "flip: error: {} is not a flip target (no .flip/ inside)\n",
            other.s()
        )
    );
    // A deploy into it is told what a target must be.
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", src.s(), other.s()])
        .code(5)
        .stderr_has("deploy into a new or empty directory");
}

#[test]
fn a_closed_stdout_ends_quietly_with_the_commands_own_code() {
    let fx = Fx::new();
    let src = fx.src("src");
    for i in 0..3 {
        src.file("v.txt", format!("{i}"), 0o644);
        fx.deploy(&src, &["--keep", "10"]);
    }
    // stdout is a pipe whose reader is gone before flip writes.
    for args in [
        vec!["releases", fx.root_str()],
        vec!["releases", "--json", fx.root_str()],
        vec!["man"],
        vec!["completions", "bash"],
    ] {
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let out = Command::new(FLIP)
            .args(&args)
            .env("HOME", &fx.home)
            .env("XDG_CACHE_HOME", fx.home.join(".cache"))
            .stdout(w)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
    }
    // The same through a shell pipe into `head -1`.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("'{FLIP}' releases '{}' | head -1", fx.root_str()),
        ])
        .env("HOME", &fx.home)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("    ID"));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

/// A stdout that cannot be written (a full disk: `/dev/full`) is not a closed pipe: the output
/// is lost, so the command says so and exits 13 when it succeeded otherwise (a CI job that
/// keeps `--json` in a file saw exit 0 and an empty file); its own failure code still wins.
#[test]
fn a_stdout_that_cannot_be_written_fails_the_command_with_code_13() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let run = |args: &[&str]| {
        let out = Command::new(FLIP)
            .args(args)
            .env("HOME", &fx.home)
            .env("XDG_CACHE_HOME", fx.home.join(".cache"))
            .stdout(fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&["deploy", "--json", src.s(), fx.root_str()]);
    assert_eq!(code, Some(13), "{err}");
    assert_eq!(
        err.matches("flip: error: cannot write to stdout: No space left on device")
            .count(),
        1,
        "{err}"
    );
    // The deploy itself is done.
    assert_eq!(fx.current_link(), "releases/1");
    for args in [vec!["releases", fx.root_str()], vec!["man"]] {
        let (code, err) = run(&args);
        assert_eq!(code, Some(13), "{args:?}: {err}");
    }
    // A command that fails keeps its own code.
    let (code, _) = run(&["rollback", "--json", fx.root_str()]);
    assert_eq!(code, Some(5));
}

#[test]
fn quiet_prints_only_errors() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let r = fx.flip(&["deploy", "-q", src.s(), fx.root_str()]).success();
    assert_eq!(r.stderr, "", "-q deploy");
    assert_eq!(r.stdout, "");
    let r = fx.flip(&["rollback", "-q", fx.root_str()]).code(5);
    assert!(r.stderr.starts_with("flip: error: "), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    let r = fx.flip(&["prune", "-q", fx.root_str()]).success();
    assert_eq!(r.stderr, "");
    let r = fx.flip(&["verify", "-q", fx.root_str()]).success();
    assert_eq!(r.stderr, "");
    // -q and -v together make no sense.
    fx.flip(&["deploy", "-q", "-v", src.s(), fx.root_str()])
        .code(2);
}

#[test]
fn verbose_adds_phase_timings_and_very_verbose_each_path() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    let r = fx.flip(&["deploy", "-v", src.s(), fx.root_str()]).success();
    let scanned = r
        .stderr
        .lines()
        .find(|l| l.starts_with("flip: scanned "))
        .unwrap_or_else(|| panic!("no scan timing: {}", r.stderr));
    assert!(scanned.ends_with(" s"), "{scanned}");
    let timing = r
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("flip: {}: connecting ", fx.root_str())))
        .unwrap_or_else(|| panic!("no phase timings: {}", r.stderr));
    // In order; waiting for the target's answers (and its agent's start) is not the scan's.
    let mut at = 0;
    for phase in [
        "waiting for the scan ",
        "checking the target ",
        "staging and sending ",
        "activating ",
    ] {
        let found = timing[at..].find(phase);
        assert!(found.is_some(), "{phase}: {timing}");
        at += found.unwrap_or(0);
    }
    assert!(timing.ends_with(", live"), "{timing}");
    // Not a terminal: no progress lines all the same.
    assert!(!r.stderr.contains("scanning:"), "{}", r.stderr);
    assert_eq!(r.stdout, "", "-v lists no paths");

    site_v2(&src);
    let r = fx
        .flip(&["deploy", "-vv", src.s(), fx.root_str()])
        .success();
    let itemized: Vec<&str> = r.stdout.lines().collect();
    assert!(!itemized.is_empty(), "-vv lists the changed paths");
    assert!(
        itemized
            .iter()
            .all(|l| l.starts_with(['+', '~', 'm', '>', '-', '='])),
        "{}",
        r.stdout
    );
    // --json is never changed by -v.
    src.file("more.txt", "more", 0o644);
    let r = fx
        .flip(&["deploy", "-vv", "--json", src.s(), fx.root_str()])
        .success();
    let j = r.json();
    assert!(j.get("items").is_none(), "{j}");
}

#[test]
fn progress_and_color_only_on_a_terminal_and_never_with_no_color() {
    let fx = Fx::new();
    let src = fx.src("src");
    for i in 0..40 {
        src.file(&format!("f{i}.bin"), noise(i, 200_000), 0o644);
    }
    // A pipe: no progress lines, no escape sequences.
    let r = fx.flip(&["deploy", src.s(), fx.root_str()]).success();
    assert!(!r.stderr.contains('\x1b'), "{:?}", r.stderr);
    assert!(!r.stderr.contains("scanning"), "{}", r.stderr);

    // A terminal: the scan line and the target's line.
    src.file("f0.bin", noise(99, 200_000), 0o644);
    let (text, code) = on_a_terminal(
        &fx,
        &format!("{FLIP} deploy {} {}", src.s(), fx.root_str()),
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("scanned 40 files"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(fx.root_str()) && l.contains("live")),
        "{text}"
    );
    // With -q: nothing at all.
    src.file("f1.bin", noise(98, 200_000), 0o644);
    let (text, code) = on_a_terminal(
        &fx,
        &format!("{FLIP} deploy -q {} {}", src.s(), fx.root_str()),
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(text, "", "-q on a terminal");

    // Color: clap's help is styled on a terminal, and not with NO_COLOR.
    let (text, _) = on_a_terminal(&fx, &format!("{FLIP} deploy --help"), &[]);
    assert!(has_sgr(&text), "no style on a terminal: {text:?}");
    let (text, _) = on_a_terminal(&fx, &format!("{FLIP} deploy --help"), &[("NO_COLOR", "1")]);
    assert!(!has_sgr(&text), "styled despite NO_COLOR: {text:?}");
    src.file("f2.bin", noise(97, 200_000), 0o644);
    let (text, code) = on_a_terminal(
        &fx,
        &format!("{FLIP} deploy {} {}", src.s(), fx.root_str()),
        &[("NO_COLOR", "1")],
    );
    assert_eq!(code, 0, "{text}");
    assert!(!has_sgr(&text), "colored despite NO_COLOR: {text:?}");
}

#[test]
fn the_target_directory_is_created_only_when_its_parent_exists() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    // A typo'd path two levels deep: refused, nothing created.
    let deep = fx.path("srv/app/current-typo");
    let r = fx.flip(&["deploy", src.s(), s(&deep)]).code(5);
    assert_eq!(
        r.stderr,
        format!(
            "flip: error: cannot create the target {}: {} does not exist (--mkpath creates missing parents)\n",
            deep.display(),
            fx.path("srv").display()
        )
    );
    assert!(!fx.path("srv").exists());
    // A dry run says so too, and creates nothing either.
    let r = fx.flip(&["deploy", "--dry-run", src.s(), s(&deep)]).code(5);
    assert!(
        r.stderr
            .ends_with("does not exist (--mkpath creates missing parents)\n"),
        "{}",
        r.stderr
    );
    fx.flip(&["deploy", "--dry-run", "--mkpath", src.s(), s(&deep)])
        .success();
    assert!(!fx.path("srv").exists());
    // A dry run against a file is refused as the deploy is.
    let afile = fx.path("afile");
    fs::write(&afile, "x").unwrap();
    fx.flip(&["deploy", "--dry-run", src.s(), s(&afile)])
        .code(5)
        .stderr_has("is not a directory");
    // --mkpath creates them.
    let j = fx
        .flip(&["deploy", "--json", "--mkpath", src.s(), s(&deep)])
        .success()
        .json();
    assert_eq!(j["release"], 1);
    assert_eq!(
        fs::read_link(deep.join("current")).unwrap().to_str(),
        Some("releases/1")
    );
    // The target itself, under an existing parent: created as rsync does.
    fx.flip(&["deploy", src.s(), fx.root_str()]).success();
    assert_eq!(fx.current_link(), "releases/1");
    // A failed deploy with --mkpath leaves no parents behind.
    let other = fx.path("a/b/c");
    let missing = fx.path("no-source");
    fx.flip(&["deploy", "--mkpath", s(&missing), s(&other)])
        .code(4);
    assert!(!fx.path("a").exists());
}

#[test]
fn activate_and_rollback_to_the_live_release_answer_alike() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    fx.deploy(&src, &[]);
    let root = fx.root_str();
    let said = format!("flip: release 2 of {root} is already live; nothing changed\n");
    let a = fx.flip(&["activate", root, "2"]).success();
    let b = fx.flip(&["rollback", "--to", "2", root]).success();
    assert_eq!(a.stderr, said);
    assert_eq!(b.stderr, said);
    let a = fx.flip(&["activate", "--json", root, "2"]).success().json();
    let b = fx
        .flip(&["rollback", "--json", "--to", "2", root])
        .success()
        .json();
    assert_eq!(a, b);
    assert_eq!(
        a,
        serde_json::json!({"target": root, "release": 2, "previous": 2, "changed": false, "round_trips": 1})
    );
    assert_eq!(fx.current_link(), "releases/2");

    // Back to 1, then `rollback --to 2` moves forward: not called a rollback.
    let r = fx.flip(&["rollback", root]).success();
    assert_eq!(
        r.stderr,
        format!("flip: rolled back {root}: current -> releases/1 (was 2)\n")
    );
    let r = fx.flip(&["rollback", "--to", "2", root]).success();
    assert_eq!(
        r.stderr,
        format!("flip: activated {root}: current -> releases/2 (was 1)\n")
    );
    let j = fx
        .flip(&["rollback", "--json", "--to", "1", root])
        .success()
        .json();
    assert_eq!(j["changed"], true);
}

#[test]
fn deploy_and_prune_name_pruned_releases_alike() {
    let fx = Fx::new();
    let src = fx.src("src");
    for i in 0..4 {
        src.file("v.txt", format!("{i}"), 0o644);
        fx.deploy(&src, &["--keep", "10"]);
    }
    src.file("v.txt", "4", 0o644);
    let j = fx.deploy(&src, &["--keep", "4"]);
    assert_eq!(j["pruned"], serde_json::json!([1]));
    let j = fx
        .flip(&["prune", "--json", "--keep", "2", fx.root_str()])
        .success()
        .json();
    assert_eq!(j["pruned"], serde_json::json!([2, 3]));
    assert!(j.get("removed").is_none(), "{j}");
}

#[test]
fn activating_the_live_label_of_an_environment_changes_nothing_and_says_so() {
    let fx = Fx::new();
    let roots: Vec<String> = (1..=2)
        .map(|i| s(&fx.path(&format!("t{i}"))).to_string())
        .collect();
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\n[env.prod]\ntargets = [{:?}, {:?}]\n",
            roots[0], roots[1]
        ),
    )
    .unwrap();
    let src = fx.src("src");
    site_v1(&src);
    fx.flip(&["deploy", "prod", "--label", "v1"]).success();
    let r = fx.flip(&["activate", "prod", "v1"]).success();
    let expected: String = roots
        .iter()
        .map(|t| format!("flip: release 1 of {t} is already live; nothing changed\n"))
        .collect();
    assert_eq!(r.stderr, expected);
    for t in &roots {
        assert_eq!(
            fs::read_link(std::path::Path::new(t).join("current"))
                .unwrap()
                .to_str(),
            Some("releases/1")
        );
    }
}
