//! A byte-counting TCP relay: listens on 127.0.0.1, forwards every connection to a backend port
//! (the private sshd) and counts the bytes in each direction. Every tool's SSH connections go
//! through it, so wire bytes are measured the same way for all of them: TCP payload as it
//! crosses the connection, SSH encryption, handshakes and framing included.

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

/// The relay. Its accept thread lives as long as the process (it holds no resources worth
/// freeing earlier).
pub struct Relay {
    port: u16,
    counters: Arc<Counters>,
}

impl Relay {
    /// Starts relaying `127.0.0.1:<new port>` → `127.0.0.1:backend`.
    pub fn start(backend: u16) -> io::Result<Relay> {
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
                            let _ = serve(client, backend, &c);
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

fn serve(client: TcpStream, backend: u16, c: &Arc<Counters>) -> io::Result<()> {
    let server = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], backend)))?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c_read, s_write) = (client.try_clone()?, server.try_clone()?);
    let counters = Arc::clone(c);
    let upstream = thread::Builder::new()
        .name("relay-up".into())
        .spawn(move || pump(c_read, s_write, &counters.up))?;
    pump(server, client, &c.down);
    let _ = upstream.join();
    Ok(())
}

/// Copies until EOF or error, counting; then half-closes the writer so the peer sees EOF.
fn pump(mut from: TcpStream, mut to: TcpStream, count: &AtomicU64) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
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
