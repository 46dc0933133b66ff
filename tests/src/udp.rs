//! UDP proof at the receiver: an echo server inside a namespace that answers each datagram
//! with a tag naming the server and the peer it saw, and a client that sends one datagram from
//! a namespace and returns the answer.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::netns::NetNs;

/// A UDP echo server in a namespace; stops on drop.
#[derive(Debug)]
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `addr` inside `ns` and answers every datagram with `"<tag> <peer>"`.
    pub fn start(ns: &NetNs, addr: SocketAddr, tag: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let tag = tag.to_owned();
        let thread = ns.spawn(move || {
            let sock = match UdpSocket::bind(addr).and_then(|u| {
                u.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(u)
            }) {
                Ok(u) => {
                    let _ = tx.send(Ok(()));
                    u
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("{tag} {peer}").as_bytes(), peer);
                }
            }
        });
        rx.recv()
            .context("UDP echo thread died")?
            .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
        Ok(UdpEcho {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one datagram from inside `ns` to `addr` (up to 3 tries, 1 s each) and returns the
/// answer of a [`UdpEcho`].
pub fn udp_ask(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<String> {
    udp_ask_from(ns, 0, addr)
}

/// Like [`udp_ask`], from source port `src_port` (0: any), so that repeated questions belong
/// to one flow (one conntrack entry).
pub fn udp_ask_from(ns: &NetNs, src_port: u16, addr: SocketAddr) -> anyhow::Result<String> {
    ns.run(move || -> anyhow::Result<String> {
        let sock = UdpSocket::bind(("0.0.0.0", src_port))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 1500];
        for _ in 0..3 {
            sock.send_to(b"ping", addr)?;
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        anyhow::bail!("no UDP answer from {addr}")
    })
}

/// Like [`udp_ask`] with a connected socket: only an answer whose source is exactly `addr` is
/// received (the kernel drops datagrams from any other source), so an answer proves that the
/// reply of a NATed request was un-NATed on its way back.
pub fn udp_ask_connected(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<String> {
    ns.run(move || -> anyhow::Result<String> {
        let sock = UdpSocket::bind(("0.0.0.0", 0))?;
        sock.connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 1500];
        for _ in 0..3 {
            sock.send(b"query")?;
            if let Ok(n) = sock.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        anyhow::bail!("no UDP answer from {addr}")
    })
}
