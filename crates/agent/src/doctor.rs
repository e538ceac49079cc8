//! The agent's side of `flip doctor` ([`flip_wire::Request::Doctor`]): the target's findings on
//! disk ([`flip_release::doctor`]: read-only, never waiting for the lock, bounded), plus, when `php` is on the
//! agent's PATH, the OPcache and realpath cache settings that decide whether PHP serves the
//! new release after a swap (the README's "OPcache and the realpath cache").

use flip_release::doctor::{DoctorOptions, Finding as RelFinding, Severity as RelSeverity};
use flip_wire::{Finding, Response, Severity};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `php` may take to print its settings before it is killed.
pub const PHP_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of `php`'s output read.
const PHP_OUTPUT_MAX: u64 = 64 * 1024;

/// The settings printed, one `key=value` line each (`-` for a directive PHP does not know,
/// e.g. OPcache's when the extension is not loaded).
const PHP_CODE: &str = r#"echo "version=", PHP_VERSION, "\n"; echo "ini=", (string) php_ini_loaded_file(), "\n"; echo "opcache=", extension_loaded("Zend OPcache") ? "1" : "0", "\n"; foreach (["opcache.enable", "opcache.enable_cli", "opcache.validate_timestamps", "opcache.revalidate_freq", "opcache.revalidate_path", "realpath_cache_size", "realpath_cache_ttl"] as $k) { $v = ini_get($k); echo $k, "=", $v === false ? "-" : $v, "\n"; }"#;

/// The answer to `Doctor` for the target at `root`: the findings of
/// [`flip_release::doctor::doctor`] (with the agent's stage-space margin), then PHP's.
///
/// # Errors
///
/// What [`flip_release::doctor::doctor`] returns: `root` missing, not a directory or not a
/// flip target (a bad layout is a finding, not an error).
pub fn answer(root: &Path) -> Result<Response, flip_release::Error> {
    let opts = DoctorOptions {
        space_margin: crate::SPACE_MARGIN,
        ..DoctorOptions::default()
    };
    let mut findings: Vec<Finding> = flip_release::doctor::doctor(root, &opts)?
        .into_iter()
        .map(wire)
        .collect();
    findings.extend(startup());
    findings.extend(php());
    Ok(Response::Findings {
        time_ms: now_ms(),
        findings,
    })
}

fn wire(f: RelFinding) -> Finding {
    Finding {
        check: f.check.to_string(),
        severity: match f.severity {
            RelSeverity::Ok => Severity::Ok,
            RelSeverity::Note => Severity::Note,
            RelSeverity::Warning => Severity::Warning,
            RelSeverity::Problem => Severity::Problem,
        },
        message: f.message,
        fix: f.fix,
    }
}

/// This host's clock, Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A start of the agent's command this long or longer is a note (seconds): over SSH, each
/// deploy waits that long before its first answer.
pub const SLOW_START: f64 = 0.1;

/// How long after its command started the agent began to serve, measured once by
/// [`note_start`] (`None`: not measured, or not known).
static STARTED_AFTER: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();

/// Notes how long ago the command this agent serves was started: called as the agent begins
/// to serve over its standard input and output. Over SSH (`SSH_CONNECTION` set) that is the
/// session's process, which `sshd` made a session leader to run the login shell: the time the
/// shell took (with the startup files it reads even to run one command), `sshd`'s rc files,
/// the launcher and the agent's own start, whether the shell `exec`ed the agent or forked it.
/// Otherwise (a local target) this process's own start. From `/proc/PID/stat`'s start time,
/// in clock ticks since boot, against `CLOCK_BOOTTIME`: to 1/100 s.
pub fn note_start() {
    STARTED_AFTER.get_or_init(|| {
        let ssh = std::env::var_os("SSH_CONNECTION").is_some();
        // SAFETY: getsid(0) has no preconditions.
        let leader = if ssh { unsafe { libc::getsid(0) } } else { -1 };
        let age = match leader {
            sid if sid > 0 => process_age(&sid.to_string()),
            _ => process_age("self"),
        };
        // A session leader that is not this deploy's (an agent started from a terminal
        // multiplexer that kept an old login's environment) says nothing about this start.
        age.filter(|a| *a < Duration::from_secs(60))
    });
}

/// The age of process `pid` (a number, or `self`); `None` when `/proc` or the clock does not
/// say.
// Any error only means the age is not known (never reported): no path to name.
#[allow(clippy::disallowed_methods)]
fn process_age(pid: &str) -> Option<Duration> {
    // Untrusted text all the same: the command name (field 2) may hold spaces and parentheses,
    // so the fields are counted from after its last ')'.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 22 (starttime) is the 20th after the name.
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    if hz == 0 || unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return None;
    }
    let now = Duration::new(u64::try_from(now.tv_sec).ok()?, now.tv_nsec as u32);
    now.checked_sub(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// The `startup` finding: how long the command took to begin serving (see [`note_start`]); a
/// note from [`SLOW_START`] on, with what usually makes it slow.
fn startup() -> Option<Finding> {
    let age = (*STARTED_AFTER.get()?)?.as_secs_f64();
    let (severity, message, fix) = if age >= SLOW_START {
        (
            Severity::Note,
            format!(
                "the agent began {age:.2} s after its command started: every deploy over SSH waits this long before its first answer, mostly for the login shell, which reads its startup files (e.g. ~/.bashrc) even to run one command (sshd's ~/.ssh/rc and flip's launcher count too)"
            ),
            Some(
                "make the deploy user's shell startup files return at once when not interactive: for bash, `case $- in *i*) ;; *) return;; esac` at the top of ~/.bashrc (before slow lines such as `eval \"$(pyenv init -)\"`)"
                    .to_string(),
            ),
        )
    } else {
        (
            Severity::Ok,
            format!("the agent began {age:.2} s after its command started"),
            None,
        )
    };
    Some(Finding {
        check: "startup".into(),
        severity,
        message,
        fix,
    })
}

fn finding(severity: Severity, message: String, fix: Option<String>) -> Finding {
    Finding {
        check: "php".into(),
        severity,
        message,
        fix,
    }
}

/// `php` on PATH asked for its settings (bounded in time and output); nothing when there is
/// no `php`.
fn php() -> Vec<Finding> {
    let Some(php) = on_path("php") else {
        return vec![finding(
            Severity::Note,
            "no php on the agent's PATH: OPcache and realpath cache settings not checked".into(),
            None,
        )];
    };
    match run_bounded(&php, PHP_TIMEOUT) {
        Ok(out) => php_findings(&php, &out),
        Err(e) => vec![finding(
            Severity::Note,
            format!(
                "{} did not print its settings: {e}; OPcache not checked",
                php.display()
            ),
            None,
        )],
    }
}

/// The first executable `name` in `$PATH`.
// A yes/no check (never reported) that follows symlinks on purpose: `$PATH` entries are often
// links to the interpreter.
#[allow(clippy::disallowed_methods)]
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `php -r PHP_CODE` and returns its output, killing it after `timeout`.
fn run_bounded(php: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(php)
        .arg("-r")
        .arg(PHP_CODE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // A group of its own: a wrapper script's children are killed with it at the timeout.
        .process_group(0)
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.take(PHP_OUTPUT_MAX).read_to_end(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                // SAFETY: kill(2) of the process group of the child spawned above (its pid).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s (killed)", timeout.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    // The child is gone; a grandchild holding the pipe open must not hold us: the reader is
    // only waited for a moment.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !reader.is_finished() {
        return Err("its output did not end".into());
    }
    let out = reader.join().unwrap_or_default();
    if out.len() as u64 >= PHP_OUTPUT_MAX {
        return Err(format!("it printed more than {PHP_OUTPUT_MAX} bytes"));
    }
    if !status.success() {
        return Err(format!("it exited with {status}"));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What `php`'s settings (`out`, `key=value` lines) mean for a symlink deploy.
pub fn php_findings(php: &Path, out: &str) -> Vec<Finding> {
    let get = |k: &str| {
        out.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| key.trim() == k)
            .map(|(_, v)| v.trim().to_string())
    };
    let on = |k: &str| {
        get(k)
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "true" | "yes"))
    };
    let version = get("version").unwrap_or_else(|| "?".into());
    let minor = version.split('.').take(2).collect::<Vec<_>>().join(".");
    let ini = get("ini").filter(|i| !i.is_empty());
    // Debian's names: the binary php-fpm8.3, the service php8.3-fpm.
    let fpm = format!("php-fpm{minor}");
    let service = format!("php{minor}-fpm");
    let socket = format!("/run/php/php{minor}-fpm.sock");
    let mut out = vec![finding(
        Severity::Note,
        format!(
            "{} is PHP {version}; these are its CLI settings ({}): PHP-FPM reads its own php.ini (e.g. /etc/php/{minor}/fpm/php.ini), which may differ",
            php.display(),
            ini.map_or("no php.ini loaded".to_string(), |i| format!("php.ini {i}"))
        ),
        Some(format!("{fpm} -i | grep -E '^(opcache|realpath_cache)'")),
    )];
    let opcache = get("opcache").as_deref() == Some("1") && on("opcache.enable");
    if !opcache {
        out.push(finding(
            Severity::Ok,
            "OPcache is off (opcache.enable is not 1): no compiled script outlives a swap".into(),
            None,
        ));
    } else if !on("opcache.validate_timestamps") {
        out.push(finding(
            Severity::Warning,
            "opcache.enable=1 with opcache.validate_timestamps=0: OPcache never looks at a cached script's file again, so after a swap PHP keeps running the old release's code for every path it reaches through current/ (OPcache keys scripts by resolved path), and old releases stay cached, until OPcache is reset or FPM reloaded".into(),
            Some(format!(
                "after_activate = [\"cachetool opcache:reset --fcgi={socket}\"] in flip.toml (or \"sudo systemctl reload {service}\"), and nginx: fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name; fastcgi_param DOCUMENT_ROOT $realpath_root;"
            )),
        ));
    } else {
        let freq = get("opcache.revalidate_freq").unwrap_or_else(|| "2".into());
        let path = if on("opcache.revalidate_path") {
            "opcache.revalidate_path=1"
        } else {
            "opcache.revalidate_path=0: a script is found again by the path PHP resolved"
        };
        out.push(finding(
            Severity::Note,
            format!(
                "opcache.validate_timestamps=1, opcache.revalidate_freq={freq}: a changed file is noticed within {freq} s, but a swapped symlink changes no file ({path}); without $realpath_root PHP may run the old release until its realpath cache entry expires"
            ),
            Some("nginx: fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name; fastcgi_param DOCUMENT_ROOT $realpath_root;".into()),
        ));
    }
    let size = get("realpath_cache_size").unwrap_or_default();
    let ttl = get("realpath_cache_ttl")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(0);
    if ttl > 0 && !matches!(size.as_str(), "0" | "0K" | "0k" | "") {
        out.push(finding(
            Severity::Note,
            format!(
                "realpath_cache_size={size}, realpath_cache_ttl={ttl}: each PHP process keeps what current/... resolved to for up to {ttl} s after a swap; unless the web server passes the resolved path ($realpath_root), requests meanwhile mix the old release's files with the new one's"
            ),
            Some("nginx: fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name; fastcgi_param DOCUMENT_ROOT $realpath_root;".into()),
        ));
    }
    out
}

#[cfg(test)]
// The tests write fake `php` scripts on purpose.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn run(out: &str) -> Vec<Finding> {
        php_findings(Path::new("/usr/bin/php"), out)
    }

    #[test]
    fn timestamps_off_is_a_warning_with_a_reset_hook() {
        let f = run("version=8.3.1\nini=/etc/php/8.3/cli/php.ini\nopcache=1\nopcache.enable=1\nopcache.validate_timestamps=0\nrealpath_cache_size=4096K\nrealpath_cache_ttl=120\n");
        assert!(f[0].message.contains("CLI settings"), "{f:?}");
        assert!(f[0].message.contains("/etc/php/8.3/fpm/php.ini"), "{f:?}");
        let w: Vec<_> = f
            .iter()
            .filter(|f| f.severity == Severity::Warning)
            .collect();
        assert_eq!(w.len(), 1, "{f:?}");
        assert!(w[0].message.contains("validate_timestamps=0"));
        let fix = w[0].fix.as_deref().unwrap();
        assert!(fix.contains("--fcgi=/run/php/php8.3-fpm.sock"), "{fix}");
        assert!(fix.contains("systemctl reload php8.3-fpm"), "{fix}");
        assert!(f
            .iter()
            .any(|f| f.message.contains("realpath_cache_ttl=120")));
    }

    #[test]
    fn opcache_off_and_no_realpath_cache_are_fine() {
        let f = run("version=8.2.0\nini=\nopcache=0\nopcache.enable=-\nrealpath_cache_size=0\nrealpath_cache_ttl=120\n");
        assert!(f.iter().all(|f| f.severity <= Severity::Note), "{f:?}");
        assert!(f.iter().any(|f| f.message.contains("OPcache is off")));
        assert!(f[0].message.contains("no php.ini loaded"));
        assert!(!f.iter().any(|f| f.message.contains("realpath_cache_ttl")));
    }

    #[test]
    fn a_php_that_hangs_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let php = dir.path().join("php");
        std::fs::write(&php, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&php, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let started = Instant::now();
        let e = run_bounded(&php, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_php_wrapper_that_hangs_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let php = dir.path().join("php");
        let pidfile = dir.path().join("child.pid");
        std::fs::write(
            &php,
            format!(
                "#!/bin/sh
sleep 30 &
echo $! > {}
wait
",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&php, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = run_bounded(&php, Duration::from_millis(500)).unwrap_err();
        assert!(e.contains("killed"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let started = Instant::now();
        // SAFETY: kill(pid, 0) only asks whether the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A zombie until its new parent reaps it: gone or a zombie is dead.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().to_string());
        assert!(
            state.is_none_or(|r| r.starts_with('Z')),
            "the wrapper's child outlived the timeout: {stat}"
        );
    }

    #[test]
    fn a_php_printing_megabytes_is_cut_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let php = dir.path().join("php");
        std::fs::write(
            &php,
            "#!/bin/sh
head -c 50000000 /dev/zero
",
        )
        .unwrap();
        std::fs::set_permissions(&php, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = run_bounded(&php, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("printed more than"), "{e}");
    }
}
