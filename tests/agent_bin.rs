//! The agent-only binary `flip-agent` (src/agent_main.rs), which flip uploads to a server that
//! has no flip, against `flip` itself: each command line the client sends to a server gets the
//! same answer, output and exit status from both.

mod common;

use common::*;
use flip_wire::{FrameReader, FrameWriter, Holder, Request, Response, MAGIC, PROTOCOL};
use std::fs;
use std::io::Write;
use std::process::{Command, Output, Stdio};

/// `BIN ARGS...` with `stdin` as its standard input, to the end.
fn run(bin: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// `flip ARGS...` and `flip-agent ARGS...`: the same exit status and the same output; returns
/// flip's.
#[track_caller]
fn same(args: &[&str], stdin: &[u8]) -> Output {
    let flip = run(FLIP, args, stdin);
    let agent = run(FLIP_AGENT, args, stdin);
    assert_eq!(
        (agent.status.code(), &agent.stdout, &agent.stderr),
        (flip.status.code(), &flip.stdout, &flip.stderr),
        "flip-agent {args:?} (left) and flip {args:?} (right) differ"
    );
    flip
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The launcher on a server runs an agent only if `--version` says exactly `flip VERSION`.
#[test]
fn flip_agent_says_the_version_flip_says() {
    let out = same(&["--version"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!("flip {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `blake3 FILE` is the upload's check on a server without b3sum: the same lines, and the same
/// error for a file that cannot be read.
#[test]
fn flip_agent_hashes_files_as_flip_does() {
    let fx = Fx::new();
    let file = fx.path("f");
    fs::write(&file, b"agent").unwrap();
    let f = file.to_str().unwrap();
    let out = same(&["blake3", f, f], b"");
    assert_eq!(out.status.code(), Some(0));
    let line = format!("{}  {f}\n", blake3::hash(b"agent").to_hex());
    assert_eq!(text(&out.stdout), line.repeat(2));

    let missing = fx.path("missing");
    let out = same(&["blake3", missing.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "flip: error: cannot read {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}

/// A session: the agent answers the handshake and takes the lock, and a client that closes
/// the connection then ends it with exit status 0 and the lock released, from either binary.
#[test]
fn flip_agent_serves_a_session_as_flip_does() {
    let fx = Fx::new();
    let src = fx.src("src");
    site_v1(&src);
    fx.deploy(&src, &[]);
    for bin in [FLIP_AGENT, FLIP] {
        let mut agent = Command::new(bin)
            .args(["agent", "--root", fx.root_str(), "--idle-timeout", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut tx = FrameWriter::new(Box::new(agent.stdin.take().unwrap()));
        let mut rx = FrameReader::new(Box::new(agent.stdout.take().unwrap()));
        tx.send(&Request::Hello {
            magic: MAGIC,
            protocol: PROTOCOL,
            version: "test".into(),
            compress: 0,
        })
        .unwrap();
        tx.flush().unwrap();
        assert!(matches!(answer(&mut rx), Response::Welcome { .. }), "{bin}");
        tx.send(&Request::Lock {
            wait: false,
            holder: Holder {
                pid: 1,
                host: "test-host".into(),
                user: "tester".into(),
                since: 0,
                what: flip_wire::Purpose::Deploy,
                run: String::new(),
            },
        })
        .unwrap();
        tx.flush().unwrap();
        assert_eq!(answer(&mut rx), Response::Locked, "{bin}");
        drop(tx);
        let out = agent.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{bin}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "{bin}");
        // The lock went with the session: the next deploy runs.
        fx.deploy(&src, &[]);
    }
}

/// What a client never sends is refused the same way: a stranger's bytes (exit 1, answered
/// with an error frame), a client that sends nothing within the idle timeout (exit 6, said on stderr).
#[test]
fn flip_agent_fails_as_flip_does() {
    let fx = Fx::new();
    let root = fx.root_str();
    let out = same(
        &["agent", "--root", root],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // Told over the protocol, as an error frame: the client reports it.
    assert!(
        text(&out.stdout).contains("the client does not speak flip's protocol"),
        "{out:?}"
    );

    // Silent with stdin open: both give up after the idle timeout.
    for bin in [FLIP_AGENT, FLIP] {
        let mut agent = Command::new(bin)
            .args(["agent", "--root", root, "--idle-timeout", "1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = agent.stdin.take();
        let out = agent.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(out.status.code(), Some(6), "{bin}");
        assert_eq!(
            text(&out.stderr),
            "flip agent: no request from the client for 1 s; gave up (staging removed, lock released)\n",
            "{bin}"
        );
    }

    // A command line with no --root is a usage error (exit 2) for both.
    for bin in [FLIP_AGENT, FLIP] {
        let out = run(bin, &["agent"], b"");
        assert_eq!(out.status.code(), Some(2), "{bin}");
        assert!(text(&out.stderr).contains("--root"), "{bin}");
    }
}

/// The next answer of the agent, past the notices it may send before one.
fn answer(rx: &mut FrameReader) -> Response {
    loop {
        match rx.recv().unwrap() {
            Response::Notices { .. } => continue,
            r => return r,
        }
    }
}
