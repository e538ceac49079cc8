//! What the tests of this crate share: a session with an agent served in this process.

use flip_transfer::Session;
use flip_transport::{AgentStream, Finish, TransportError};
use std::path::Path;

/// The agent's thread: finishing the stream waits for it.
struct Joined(Option<std::thread::JoinHandle<()>>);

impl Finish for Joined {
    fn finish(mut self: Box<Self>) -> Result<(), TransportError> {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
        Ok(())
    }
}

/// A session with an agent serving `root` on a thread, locked for a deploy.
pub fn session(root: &Path) -> Session {
    let (agent_rx, client_tx) = std::io::pipe().unwrap();
    let (client_rx, agent_tx) = std::io::pipe().unwrap();
    let root = root.to_path_buf();
    let agent = std::thread::spawn(move || {
        let _ = flip_agent::serve(Box::new(agent_rx), Box::new(agent_tx), &root);
    });
    let stream = AgentStream {
        reader: Box::new(client_rx),
        writer: Box::new(client_tx),
        handle: Box::new(Joined(Some(agent))),
        peer: "test".into(),
        seal: flip_transport::no_seal(),
        round_trip: None,
    };
    let mut s = Session::open(stream, 0).unwrap();
    let holder = flip_wire::Holder {
        pid: 1,
        host: "test".into(),
        user: "test".into(),
        since: 0,
        what: flip_wire::Purpose::Deploy,
        run: String::new(),
    };
    s.lock(holder, false, &mut |_| {}).unwrap();
    s
}
