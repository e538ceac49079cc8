//! A byte-counting TCP relay: listens on 127.0.0.1, forwards every connection to a backend port
//! (the private sshd) and counts the bytes in each direction. Every tool's SSH connections go
//! through it, so wire bytes are measured the same way for all of them: TCP payload as it
//! crosses the connection, SSH encryption, handshakes and framing included.
//!
//! It can also shape the link ([`Link`]): a one-way delay added in each direction (so the round
//! trip grows by twice it) and a bandwidth cap per direction. Each direction is a reader that
//! timestamps what arrives and a writer that delivers it once it has crossed the modelled link
//! (serialised at the rate, then delayed); between them at most one bandwidth-delay product
//! (plus 256 KiB) is buffered, so a sender faster than the link is held back as by a real one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Counters {
    /// Client → server bytes.
    up: AtomicU64,
    /// Server → client bytes.
    down: AtomicU64,
    /// Connections accepted so far.
    connections: AtomicU64,
    /// Connections still open (either direction still copying).
    active: AtomicUsize,
}

/// Totals at one moment; subtract two to get what one deploy cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub up: u64,
    pub down: u64,
    pub connections: u64,
}

impl Snapshot {
    pub fn since(self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            up: self.up - earlier.up,
            down: self.down - earlier.down,
            connections: self.connections - earlier.connections,
        }
    }

    pub fn total(self) -> u64 {
        self.up + self.down
    }
}

/// How the relayed link behaves.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// Added to every byte's trip, in each direction.
    pub delay: Duration,
    /// Bytes per second per direction; `None`: as fast as loopback.
    pub rate: Option<u64>,
}

impl Link {
    pub fn is_shaped(&self) -> bool {
        !self.delay.is_zero() || self.rate.is_some()
    }

    /// Pieces buffered between reader and writer: a bandwidth-delay product plus 256 KiB (64 MiB
    /// of delay-only buffering when the rate is not capped).
    fn queue(&self) -> usize {
        let bytes = match self.rate {
            Some(r) => (r as f64 * self.delay.as_secs_f64() * 2.0) as usize + (256 << 10),
            None => 64 << 20,
        };
        (bytes / PIECE).max(4)
    }
}

/// The largest piece a shaped direction reads at once.
const PIECE: usize = 16 << 10;

/// The relay. Its accept thread lives as long as the process (it holds no resources worth
/// freeing earlier).
pub struct Relay {
    port: u16,
    counters: Arc<Counters>,
}

impl Relay {
    /// Starts relaying `127.0.0.1:<new port>` → `127.0.0.1:backend`.
    #[allow(dead_code)]
    pub fn start(backend: u16) -> io::Result<Relay> {
        Self::start_shaped(backend, Link::default())
    }

    /// [`Relay::start`] over a link shaped as `link` says.
    pub fn start_shaped(backend: u16, link: Link) -> io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let c = Arc::clone(&counters);
        thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    c.connections.fetch_add(1, Ordering::SeqCst);
                    c.active.fetch_add(1, Ordering::SeqCst);
                    let c = Arc::clone(&c);
                    let _ = thread::Builder::new()
                        .name("relay-conn".into())
                        .spawn(move || {
                            let _ = serve(client, backend, &c, link);
                            c.active.fetch_sub(1, Ordering::SeqCst);
                        });
                }
            })?;
        Ok(Relay { port, counters })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            up: self.counters.up.load(Ordering::SeqCst),
            down: self.counters.down.load(Ordering::SeqCst),
            connections: self.counters.connections.load(Ordering::SeqCst),
        }
    }

    /// Waits (up to `timeout`) until no connection is open, so a snapshot taken after a tool
    /// exits includes the last bytes of its connections. Returns false on timeout.
    pub fn settle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.counters.active.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

fn serve(client: TcpStream, backend: u16, c: &Arc<Counters>, link: Link) -> io::Result<()> {
    let server = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], backend)))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c_read, s_write) = (client.try_clone()?, server.try_clone()?);
    let counters = Arc::clone(c);
    let upstream = thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || pump(c_read, s_write, &counters.up, link))?;
    pump(server, client, &c.down, link);
    let _ = upstream.join();
    Ok(())
}

/// Acknowledges at once what `s` received (`TCP_QUICKACK`). The relay ends two TCP
/// connections: were its acknowledgements delayed as an endpoint's are, a server under Nagle's
/// algorithm sending two small messages in a row (`sshd`'s host keys after the authentication,
/// then a channel's confirmation) would wait for the relay's acknowledgement of the first, up
/// to 40 ms on loopback: a stall of the relay's making, for every tool. Without it, a tool
/// whose client delays its acknowledgements (OpenSSH's `ssh`, under rsync) meets that stall
/// in the relay neither, which it would on a direct link.
fn quick_ack(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt(2) with a pointer to an int we own and its size, on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Copies until EOF or error, counting; then half-closes the writer so the peer sees EOF.
fn pump(from: TcpStream, to: TcpStream, count: &AtomicU64, link: Link) {
    if link.is_shaped() {
        shaped(from, to, count, link)
    } else {
        plain(from, to, count)
    }
}

fn plain(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = from.read(&mut buf);
        quick_ack(&from);
        match read {
            Ok(0) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// [`pump`] through the modelled link: pieces are timestamped as they arrive and written when
/// they have crossed it (after the pieces before them, at the rate, plus the delay).
fn shaped(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64, link: Link) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(link.queue());
    let writer = thread::Builder::new()
        .name("relay-link".into())
        .spawn(move || {
            // When the link has finished serialising what it was given.
            let mut free = Instant::now();
            for (arrived, data) in rx {
                let start = free.max(arrived);
                let serialised = match link.rate {
                    Some(r) => Duration::from_secs_f64(data.len() as f64 / r as f64),
                    None => Duration::ZERO,
                };
                free = start + serialised;
                let due = free + link.delay;
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                if to.write_all(&data).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    let Ok(writer) = writer else { return };
    let mut buf = vec![0u8; PIECE];
    loop {
        let read = from.read(&mut buf);
        quick_ack(&from);
        match read {
            Ok(0) => break,
            Ok(n) => {
                count.fetch_add(n as u64, Ordering::SeqCst);
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}
