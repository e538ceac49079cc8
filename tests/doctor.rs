//! `flip doctor` through the real binary: a healthy target passes every check (exit 0), and each
//! problem it detects is named with its fix and makes it exit 11: `current` dangling or at an
//! incomplete release, a release without its manifest, what the deploy user may not write or
//! remove (doctor run as `nobody`), a filesystem too small for one more release, risky OPcache
//! settings of the `php` on PATH (a warning: exit 11 with --strict only), and a deploy holding
//! the lock (a note: doctor neither waits for it nor takes it). One environment over a real sshd.

mod common;

use common::*;
use flip_testkit::Sshd;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// exit::UNHEALTHY
const UNHEALTHY: i32 = 11;

fn am_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A target with two releases of the test site, 2 live.
fn deployed(fx: &Fx) -> Src {
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    site_v2(&src);
    fx.deploy(&src, &[]);
    src
}

/// A directory for fake programs, first on the PATH the command runs with.
fn path_with(dir: &Path) -> String {
    format!("{}:/usr/bin:/bin", dir.display())
}

fn doctor_json(fx: &Fx, env: &[(&str, &str)], code: i32, extra: &[&str]) -> Value {
    let mut args = vec!["doctor", "--json", fx.root_str()];
    args.extend_from_slice(extra);
    fx.flip_env(env, &args).code(code).json()
}

/// The findings of the one target of `j`.
fn findings(j: &Value) -> &Vec<Value> {
    j["hosts"][0]["findings"].as_array().expect("findings")
}

/// The findings of `check` with `severity`.
fn of<'a>(j: &'a Value, check: &str, severity: &str) -> Vec<&'a Value> {
    findings(j)
        .iter()
        .filter(|f| f["check"] == check && f["severity"] == severity)
        .collect()
}

/// The one finding of `check` with `severity`, whose message contains `text`.
#[track_caller]
fn one<'a>(j: &'a Value, check: &str, severity: &str, text: &str) -> &'a Value {
    let found: Vec<&Value> = of(j, check, severity)
        .into_iter()
        .filter(|f| f["message"].as_str().unwrap().contains(text))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {severity} {check} finding with {text:?} in {j:#}"
    );
    found[0]
}

/// The seconds a `startup` finding gives ("the agent began 0.12 s after ...").
#[track_caller]
fn startup_secs(f: &Value) -> f64 {
    let m = f["message"].as_str().unwrap();
    m.strip_prefix("the agent began ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no time in {m:?}"))
}

fn fix(f: &Value) -> &str {
    f["fix"].as_str().unwrap_or_else(|| panic!("no fix in {f}"))
}

/// No php on the PATH the agent runs with (a bin dir holding nothing else).
fn no_php(fx: &Fx) -> String {
    let bin = fx.path("emptybin");
    fs::create_dir_all(&bin).unwrap();
    format!("{}", bin.display())
}

#[test]
fn a_healthy_target_passes_every_check_and_exits_0() {
    let fx = Fx::new();
    deployed(&fx);
    let path = no_php(&fx);
    let j = doctor_json(&fx, &[("PATH", &path)], 0, &[]);
    for check in [
        "current",
        "releases",
        "writable",
        "leftovers",
        "space",
        "lock",
        "clock",
    ] {
        assert_eq!(of(&j, check, "ok").len(), 1, "{check} is ok: {j:#}");
    }
    assert!(
        findings(&j)
            .iter()
            .all(|f| f["severity"] == "ok" || f["severity"] == "note"),
        "{j:#}"
    );
    one(&j, "current", "ok", "current -> releases/2: committed");
    one(&j, "php", "note", "no php on the agent's PATH");
    assert_eq!(j["hosts"][0]["healthy"], true);
    assert_eq!(j["summary"]["healthy"], 1);
    assert_eq!(j["summary"]["problems"], 0);

    // The human output names the target on every line.
    let r = fx
        .flip_env(&[("PATH", &path)], &["doctor", fx.root_str()])
        .success();
    let prefix = format!("{}: ", fx.root.display());
    assert!(r.stdout.lines().count() >= 8, "{}", r.stdout);
    for line in r.stdout.lines() {
        assert!(line.starts_with(&prefix), "{line:?} names the target");
    }
    assert!(
        r.stderr.contains("1 of 1 target(s) healthy"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dangling_current_and_one_at_an_incomplete_release_are_problems() {
    let fx = Fx::new();
    deployed(&fx);
    let path = no_php(&fx);
    let current = fx.current();
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("releases/7", &current).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], UNHEALTHY, &[]);
    let f = one(
        &j,
        "current",
        "problem",
        "current -> releases/7, which does not exist",
    );
    assert!(
        fix(f).contains(&format!("flip activate {} ID", fx.root.display())),
        "{f}"
    );
    assert_eq!(j["hosts"][0]["healthy"], false);
    assert_eq!(j["summary"]["unhealthy"], 1);

    // current at a directory under releases/ that flip never committed.
    fs::create_dir(fx.root.join("releases/9")).unwrap();
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("releases/9", &current).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], UNHEALTHY, &[]);
    one(
        &j,
        "current",
        "problem",
        "releases/9, which is not a complete release",
    );
    // The live directory is never offered for removal.
    assert!(
        !findings(&j).iter().any(
            |f| f["fix"].as_str().is_some_and(|x| x.contains("releases/9"))
                && f["check"] == "releases"
        ),
        "{j:#}"
    );

    // And at something that is not a release at all.
    fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink("/etc", &current).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], UNHEALTHY, &[]);
    one(&j, "current", "problem", "not a release flip made");
    // Nothing was changed by looking.
    assert_eq!(fx.current_link(), "/etc");
}

#[test]
fn a_release_without_its_manifest_is_named_with_its_removal() {
    let fx = Fx::new();
    deployed(&fx);
    let path = no_php(&fx);
    fs::remove_file(fx.root.join(".flip/releases/1.manifest")).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], UNHEALTHY, &[]);
    let f = one(
        &j,
        "releases",
        "problem",
        "releases/1 is not a complete release",
    );
    assert!(f["message"]
        .as_str()
        .unwrap()
        .contains("never lists, rolls back to or prunes it"));
    assert_eq!(fix(f), format!("rm -rf {}", fx.release(1).display()));
    one(&j, "current", "ok", "releases/2");
    assert!(fx.release(1).is_dir(), "doctor removes nothing");
}

/// What an interrupted deploy or prune left (a staging or trash directory) is a note naming
/// each, in one sentence; the next deploy removes them, and the doctor does not.
#[test]
fn what_an_interrupted_run_left_is_named_in_a_note() {
    let fx = Fx::new();
    let src = deployed(&fx);
    let path = no_php(&fx);
    fs::create_dir(fx.root.join("releases/.staging-9")).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], 0, &[]);
    let f = one(&j, "releases", "note", "releases/.staging-9");
    assert_eq!(
        f["message"],
        "releases/.staging-9 is what is left of a deploy or prune that was interrupted or is running; the next deploy or prune removes it (what it cannot is named under leftovers)"
    );
    fs::create_dir(fx.root.join("releases/.trash-1")).unwrap();
    let j = doctor_json(&fx, &[("PATH", &path)], 0, &[]);
    let f = one(&j, "releases", "note", "releases/.staging-9");
    assert_eq!(
        f["message"],
        "releases/.staging-9, releases/.trash-1 are what is left of a deploy or prune that was interrupted or is running; the next deploy or prune removes them (what it cannot is named under leftovers)"
    );
    assert!(
        fx.root.join("releases/.trash-1").is_dir(),
        "doctor removes nothing"
    );
    src.file("index.php", "v3\n", 0o644);
    fx.deploy(&src, &[]);
    assert!(fx.release_leftovers().is_empty());
}

/// Runs `flip doctor --json ROOT` as `nobody` (the deploy user of these tests).
fn doctor_as_nobody(fx: &Fx, code: i32) -> Value {
    // Found before PATH is narrowed to a directory without php.
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("setpriv (util-linux) is installed");
    doctor_under(
        fx,
        &[setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"],
        code,
    )
}

/// `flip doctor --json` of the fixture's target run by `wrapper` (a command that runs the rest
/// of its arguments: `setpriv ...`, `unshare ...`), with a HOME of its own; its exit code is
/// `code`.
fn doctor_under(fx: &Fx, wrapper: &[&str], code: i32) -> Value {
    let home = fx.path("nobody-home");
    fs::create_dir_all(&home).unwrap();
    let out = Command::new(wrapper[0])
        .args(&wrapper[1..])
        .args([FLIP, "doctor", "--json", fx.root_str()])
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("PATH", no_php(fx))
        .output()
        .expect("run the wrapper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(code),
        "doctor under {wrapper:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("JSON")
}

/// `chown -R nobody:nogroup PATH`, and the fixture's temp dir searchable by nobody.
fn give_to_nobody(fx: &Fx, path: &Path) {
    fs::set_permissions(fx.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn what_the_deploy_user_cannot_remove_is_named_and_root_is_not_fooled() {
    if !am_root() {
        eprintln!("skipped: needs root to give files to nobody and to another user (CI is root)");
        return;
    }
    let fx = Fx::new();
    deployed(&fx);
    fs::create_dir(fx.release(1).join("var")).unwrap();
    give_to_nobody(&fx, &fx.root);
    // The web server (root here) wrote a cache into the old release, in a directory of its own.
    let cache = fx.release(1).join("var/cache");
    fs::create_dir(&cache).unwrap();
    fs::write(cache.join("compiled.php"), "<?php // cache").unwrap();
    fs::create_dir_all(cache.join("views")).unwrap();
    fs::write(cache.join("views/a.php"), "<?php").unwrap();

    let j = doctor_as_nobody(&fx, UNHEALTHY);
    let f = one(&j, "leftovers", "problem", "releases/1/var/cache/");
    let m = f["message"].as_str().unwrap();
    assert!(m.contains("2 entries"), "{m}");
    assert!(m.contains("cannot be removed by nobody"), "{m}");
    assert!(m.contains("owned by root:root, mode 755"), "{m}");
    assert!(m.contains("a prune will leave it behind"), "{m}");
    assert!(
        fix(f).starts_with(&format!("sudo chown -R nobody {}", cache.display())),
        "{f}"
    );
    // One finding for the subtree: views/ below it is covered by the same chown.
    assert_eq!(of(&j, "leftovers", "problem").len(), 1, "{j:#}");
    one(&j, "writable", "ok", "nobody may write");
    one(&j, "current", "ok", "releases/2");

    // root may remove all of it: no leftover for root.
    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], 0, &[]);
    one(&j, "leftovers", "ok", "root can remove everything");
}

#[test]
fn directories_the_deploy_user_cannot_write_are_named_with_the_chown() {
    if !am_root() {
        eprintln!("skipped: needs root to give files to nobody (CI is root)");
        return;
    }
    let fx = Fx::new();
    deployed(&fx);
    give_to_nobody(&fx, &fx.root);
    // releases/ and an old release directory taken back by root (a deploy once run as root).
    let st = Command::new("chown")
        .arg("0:0")
        .arg(fx.root.join("releases"))
        .arg(fx.release(1))
        .status()
        .unwrap();
    assert!(st.success());

    let j = doctor_as_nobody(&fx, UNHEALTHY);
    let f = one(
        &j,
        "writable",
        "problem",
        "releases (releases/) is not writable by nobody",
    );
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("owned by root:root"),
        "{f}"
    );
    assert_eq!(
        fix(f),
        format!("sudo chown nobody {}", fx.root.join("releases").display())
    );
    let f = one(&j, "leftovers", "problem", "releases/1/:");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("not writable by nobody"),
        "{f}"
    );
    assert!(fix(f).contains(&format!("chown -R nobody {}", fx.release(1).display())));
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_filesystem_too_small_for_one_more_release_is_a_problem() {
    if !am_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let fx = Fx::new();
    fs::create_dir(&fx.root).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs", fx.root_str()])
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs failed");
    let _mount = Mount(fx.root.clone());
    let src = fx.src("src");
    src.file("public/index.php", "<?php echo 1;", 0o644);
    src.file("media/big.bin", noise(7, 1200 << 10), 0o644);
    fx.deploy(&src, &[]);

    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], UNHEALTHY, &[]);
    let f = one(
        &j,
        "space",
        "problem",
        "a release as large as the live one (1.2 MiB",
    );
    assert!(f["message"]
        .as_str()
        .unwrap()
        .contains("free on the target's filesystem"));
    assert!(fix(f).contains(&format!("flip prune {} --keep 2", fx.root.display())));
}

#[test]
fn a_target_on_a_filesystem_mounted_read_only_is_a_problem() {
    if !am_root() {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    }
    let fx = Fx::new();
    fs::create_dir(&fx.root).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs", fx.root_str()])
        .status()
        .expect("run mount");
    assert!(st.success(), "mount tmpfs failed");
    let _mount = Mount(fx.root.clone());
    let src = deployed(&fx);
    let remount = |how: &str| {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{how}"), fx.root_str()])
            .status()
            .expect("run mount");
        assert!(st.success(), "remount {how} failed");
    };
    remount("ro");

    // Modes and owners say root may write everything; the mount says nothing can be.
    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], UNHEALTHY, &[]);
    let f = one(&j, "writable", "problem", "mounted read-only");
    assert!(
        f["message"].as_str().unwrap().contains(fx.root_str()),
        "{f}"
    );
    assert!(fix(f).contains("remount,rw"), "{f}");
    assert!(of(&j, "writable", "ok").is_empty(), "{j:#}");
    // What doctor foretells: a deploy fails on the target (exit 5) and release 2 stays live.
    src.file("public/new.php", "<?php echo 3;", 0o644);
    fx.flip(&["deploy", src.s(), fx.root_str()])
        .code(5)
        .stderr_has("Read-only file system");
    assert_eq!(fx.current_link(), "releases/2");

    remount("rw");
    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], 0, &[]);
    one(&j, "writable", "ok", "may write");
}

#[test]
fn risky_opcache_settings_of_the_php_on_path_are_warned_about_with_their_fix() {
    let fx = Fx::new();
    deployed(&fx);
    let bin = fx.path("fakebin");
    fs::create_dir_all(&bin).unwrap();
    let php = bin.join("php");
    fs::write(
        &php,
        "#!/bin/sh\ncat <<'EOF'\nversion=8.3.7\nini=/etc/php/8.3/cli/php.ini\nopcache=1\n\
         opcache.enable=1\nopcache.enable_cli=0\nopcache.validate_timestamps=0\n\
         opcache.revalidate_freq=2\nopcache.revalidate_path=0\nrealpath_cache_size=4096K\n\
         realpath_cache_ttl=600\nEOF\n",
    )
    .unwrap();
    fs::set_permissions(&php, fs::Permissions::from_mode(0o755)).unwrap();
    let path = path_with(&bin);

    // A warning: the target still counts as healthy (what nginx does is out of sight)...
    let j = doctor_json(&fx, &[("PATH", &path)], 0, &[]);
    let w = one(&j, "php", "warning", "opcache.validate_timestamps=0");
    assert!(w["message"]
        .as_str()
        .unwrap()
        .contains("keeps running the old release's code"));
    let f = fix(w);
    assert!(
        f.contains(
            "after_activate = [\"cachetool opcache:reset --fcgi=/run/php/php8.3-fpm.sock\"]"
        ),
        "{f}"
    );
    assert!(
        f.contains("fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;"),
        "{f}"
    );
    let n = one(&j, "php", "note", "these are its CLI settings");
    assert!(
        n["message"]
            .as_str()
            .unwrap()
            .contains("/etc/php/8.3/fpm/php.ini"),
        "{n}"
    );
    assert!(fix(n).contains("php-fpm8.3 -i"), "{n}");
    one(&j, "php", "note", "realpath_cache_ttl=600");
    assert_eq!(j["summary"]["warnings"], 1, "{j:#}");

    // ... unless --strict.
    let j = doctor_json(&fx, &[("PATH", &path)], UNHEALTHY, &["--strict"]);
    assert_eq!(j["hosts"][0]["healthy"], false);
    let r = fx
        .flip_env(&[("PATH", &path)], &["doctor", "--strict", fx.root_str()])
        .code(UNHEALTHY);
    assert!(
        r.stdout.contains(&format!(
            "{}: WARNING: php: opcache.enable=1 with opcache.validate_timestamps=0",
            fx.root.display()
        )),
        "{}",
        r.stdout
    );
}

/// Holds the target's lock as a deploy does (an exclusive `flock`, then the holder's
/// description `holder` in the file), until the returned file is dropped.
fn hold_lock(fx: &Fx, holder: &serde_json::Value) -> fs::File {
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fx.root.join(".flip/lock"))
        .unwrap();
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(r, 0);
    lock.set_len(0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&lock, holder.to_string().as_bytes(), 0).unwrap();
    lock
}

#[test]
fn a_running_deploys_lock_is_reported_without_waiting_for_or_taking_it() {
    let fx = Fx::new();
    deployed(&fx);
    let lock = hold_lock(
        &fx,
        &serde_json::json!({
            "pid": std::process::id(), "host": std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim(), "user": "ci",
            "since": 0, "what": "deploy from builder pid 4242",
        }),
    );

    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], 0, &[]);
    let f = one(&j, "lock", "note", "is running: locked by pid");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("deploy from builder pid 4242"),
        "{f}"
    );
    // Still ours: doctor did not take it (a non-blocking flock from another open fails).
    let other = fs::File::open(fx.root.join(".flip/lock")).unwrap();
    // SAFETY: as above.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&other),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(r, -1, "the lock is still held by the test");
    drop(lock);
    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], 0, &[]);
    one(&j, "lock", "ok", "no deploy is running");
}

/// The lock file is private (0600) to the user who deploys: another user's doctor cannot read
/// who holds it, and says so with the pid `/proc/locks` gives and whose file it is, instead of
/// "it has not written its name yet", which sends the reader looking for a process that hangs.
#[test]
fn a_lock_held_by_another_user_is_reported_with_its_pid_and_why_the_name_is_missing() {
    if !am_root() {
        eprintln!("skipped: needs root to run doctor as another user (CI is root)");
        return;
    }
    let fx = Fx::new();
    deployed(&fx);
    // Searchable by nobody down to the target, whose files stay root's.
    fs::set_permissions(fx.path(""), fs::Permissions::from_mode(0o755)).unwrap();
    let lock_path = fx.root.join(".flip/lock");
    assert_eq!(
        fs::metadata(&lock_path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the deploy left a private lock file"
    );
    let lock = hold_lock(
        &fx,
        &serde_json::json!({
            "pid": std::process::id(), "host": "builder", "user": "ci", "since": 0,
            "what": "deploy from builder pid 4242",
        }),
    );

    let j = doctor_as_nobody(&fx, UNHEALTHY);
    let f = one(&j, "lock", "note", "is running: locked by pid");
    let m = f["message"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "locked by pid {} (who it is, this user cannot read: {} is private to root)",
            std::process::id(),
            lock_path.display()
        )),
        "{m}"
    );
    assert!(!m.contains("has not written its name"), "{m}");
    // Root reads it.
    let j = doctor_json(&fx, &[("PATH", &no_php(&fx))], 0, &[]);
    let f = one(&j, "lock", "note", "is running: locked by pid");
    assert!(f["message"]
        .as_str()
        .unwrap()
        .contains("deploy from builder pid 4242"));
    drop(lock);
}

/// `/proc/locks` leaves out the locks of processes in another pid namespace: a doctor run in a
/// container (or on the host, of a deploy running in one) said "no deploy is running" while a
/// deploy held the lock. When `/proc/locks` names no holder, the doctor asks the kernel itself.
#[test]
fn a_lock_held_from_another_pid_namespace_is_still_seen() {
    let unshare = ["/usr/bin/unshare", "--pid", "--fork", "--mount-proc"];
    let can = Command::new(unshare[0])
        .args(&unshare[1..])
        .arg("true")
        .output()
        .is_ok_and(|o| o.status.success());
    if !am_root() || !can {
        eprintln!(
            "skipped: cannot make a pid namespace here (needs root with CAP_SYS_ADMIN, as CI has)"
        );
        return;
    }
    let fx = Fx::new();
    let src = deployed(&fx);
    let lock = hold_lock(
        &fx,
        &serde_json::json!({
            "pid": 4242, "host": "builder", "user": "ci", "since": 0,
            "what": "deploy from builder pid 4242",
        }),
    );
    // The namespace's /proc/locks does not show this test's lock.
    let seen = Command::new(unshare[0])
        .args(&unshare[1..])
        .args(["cat", "/proc/locks"])
        .output()
        .unwrap();
    assert!(seen.status.success());
    let ino = std::os::unix::fs::MetadataExt::ino(&lock.metadata().unwrap());
    if String::from_utf8_lossy(&seen.stdout).contains(&format!(":{ino} ")) {
        eprintln!(
            "skipped: this kernel's /proc/locks shows locks of other pid namespaces (before 4.9)"
        );
        return;
    }
    let j = doctor_under(&fx, &unshare, 0);
    let f = one(
        &j,
        "lock",
        "note",
        "is running: locked by pid 4242 on builder",
    );
    let m = f["message"].as_str().unwrap();
    assert!(
        m.contains("deploy from builder pid 4242")
            && m.contains("(a process /proc/locks does not show: it runs in another pid namespace"),
        "{m}"
    );
    assert!(of(&j, "lock", "ok").is_empty(), "{j:#}");
    // Let go: the same doctor says nobody holds it, and keeps no lock of its own (the deploy
    // after it takes the lock at once).
    drop(lock);
    let j = doctor_under(&fx, &unshare, 0);
    one(&j, "lock", "ok", "no deploy is running");
    src.file("index.php", "v3\n", 0o644);
    fx.deploy(&src, &[]);
    assert_eq!(fx.current_link(), "releases/3");
}

#[test]
fn an_environment_is_checked_on_every_target_local_and_over_ssh() {
    let fx = Fx::new();
    let sshd = Sshd::start();
    fs::create_dir_all(fx.home.join(".ssh")).unwrap();
    fs::write(
        fx.home.join(".ssh/known_hosts"),
        format!("{}\n", sshd.host_public_key_line()),
    )
    .unwrap();
    let (local, remote) = (fx.path("t-local"), fx.path("t-remote"));
    let ssh_target = format!("ssh://root@127.0.0.1:{}{}", sshd.port(), s(&remote));
    fs::write(
        fx.path("flip.toml"),
        format!(
            "source = \"src\"\n[env.prod]\ntargets = [{:?}, {:?}]\n",
            s(&local),
            ssh_target
        ),
    )
    .unwrap();
    let src = fx.src("src");
    site_v1(&src);
    let key = sshd.user_key();
    let ssh = ["-i", s(&key), "--remote-flip", FLIP];
    let mut args = vec!["deploy", "prod"];
    args.extend_from_slice(&ssh);
    fx.flip(&args).success();

    let mut args = vec!["doctor", "prod", "--json"];
    args.extend_from_slice(&ssh);
    let j = fx.flip(&args).success().json();
    let hosts = j["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2, "{j:#}");
    for h in hosts {
        assert_eq!(h["healthy"], true, "{h:#}");
    }
    assert_eq!(j["summary"]["env"], "prod");
    assert_eq!(j["summary"]["healthy"], 2);
    // Over a real sshd, the agent's start is measured from its session's (its login shell's).
    let started = hosts[1]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "startup")
        .unwrap_or_else(|| panic!("{j:#}"));
    assert!((0.0..60.0).contains(&startup_secs(started)), "{started}");

    // The server's release loses its current: only that target is unhealthy.
    fs::remove_file(remote.join("current")).unwrap();
    std::os::unix::fs::symlink("releases/5", remote.join("current")).unwrap();
    let r = fx.flip(&args).code(UNHEALTHY);
    let j = r.json();
    let hosts = j["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["healthy"], true, "{j:#}");
    assert_eq!(hosts[1]["healthy"], false, "{j:#}");
    // Shown as written, port included: pasted back, it names the same target.
    let shown = hosts[1]["target"].as_str().unwrap();
    assert_eq!(shown, ssh_target, "{j:#}");
    assert!(hosts[1]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["check"] == "current"
            && f["severity"] == "problem"
            && f["message"]
                .as_str()
                .unwrap()
                .contains("releases/5, which does not exist")));
    assert_eq!(j["summary"]["unhealthy"], 1);

    // Human lines name their target: the server's problem is on the server's line.
    let mut args = vec!["doctor", "prod"];
    args.extend_from_slice(&ssh);
    let r = fx.flip(&args).code(UNHEALTHY);
    assert!(
        r.stdout.contains(&format!(
            "{shown}: PROBLEM: current: current -> releases/5, which does not exist"
        )),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains(&format!("{}: ok: current:", local.display())),
        "{}",
        r.stdout
    );
}

/// A server whose login takes long to start the agent: `--ssh-command` is a wrapper that, as a
/// login shell reading slow startup files does, waits 0.3 s in the process that then becomes
/// the agent (by `exec`, as a login shell runs a simple command). `startup` is a note with that time and the fix; a local target's agent (no
/// shell) starts at once, and its `startup` says so.
#[test]
fn a_slow_login_shell_is_a_note_with_its_time_and_fix() {
    let fx = Fx::new();
    deployed(&fx);
    let path = no_php(&fx);
    let j = doctor_json(&fx, &[("PATH", &path)], 0, &[]);
    let local = one(&j, "startup", "ok", "s after its command started");
    assert!(startup_secs(local) < 0.1, "{local}");

    let ssh = fx.path("ssh-slow");
    fs::write(
        &ssh,
        "#!/bin/sh\nwhile [ $# -gt 0 ] && [ \"$1\" != \"--\" ]; do shift; done\n\
         /bin/sleep 0.3\nexec /bin/sh -c \"exec $3\"\n",
    )
    .unwrap();
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o755)).unwrap();
    let url = format!("root@localhost:{}", fx.root_str());
    let args = [
        "doctor",
        "--json",
        "--ssh-command",
        s(&ssh),
        "--remote-flip",
        FLIP,
        &url,
    ];
    let j = fx.flip_env(&[("PATH", &path)], &args).success().json();
    let f = one(
        &j,
        "startup",
        "note",
        "every deploy over SSH waits this long",
    );
    assert!((0.3..5.0).contains(&startup_secs(f)), "{f}");
    assert!(fix(f).contains("~/.bashrc"), "{f}");
    assert_eq!(j["hosts"][0]["healthy"], true, "a note only: {j:#}");
}
