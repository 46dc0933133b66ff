//! Proof at the receiver: what arrived, from which source.
//!
//! - [`TcpPeers`]: a TCP listener inside a namespace that records each peer address and
//!   writes it back to the client ("you are 172.18.0.11:40000"), so both sides can assert on
//!   the source the receiver saw (masquerade tests).
//! - [`Tcpdump`]: a `tcpdump` process inside a namespace, started and stopped by PID, whose
//!   matching packets are collected as text lines (spoofing tests: "nothing arrived").

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::netns::NetNs;

/// A TCP listener in a namespace recording its peers; stops on drop.
#[derive(Debug)]
pub struct TcpPeers {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpPeers {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Self> {
        Self::start_tagged(ns, addr, None)
    }

    /// [`TcpPeers::start`] answering `"<tag> <peer>"` instead, so that the client also learns
    /// which listener it reached (a Service's backends, say).
    pub fn start_tagged(ns: &NetNs, addr: SocketAddr, tag: Option<&str>) -> anyhow::Result<Self> {
        let prefix = tag.map(|t| format!("{t} ")).unwrap_or_default();
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (s, p) = (stop.clone(), peers.clone());
        let thread = ns.spawn(move || {
            let l = match TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        p.lock().expect("peers lock").push(peer);
                        let _ = c.set_nonblocking(false);
                        let _ = writeln!(c, "{prefix}{peer}");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        rx.recv()
            .context("listener thread died")?
            .with_context(|| format!("listening on {addr} in {}", ns.name()))?;
        Ok(TcpPeers {
            addr,
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// The address listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers seen so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }
}

impl Drop for TcpPeers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from inside `ns` to a [`TcpPeers`] listener at `addr` and returns the source
/// address the listener reported seeing.
pub fn tcp_seen_source(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let s = tcp_answer(ns, addr, Duration::from_secs(3))?;
    s.parse()
        .with_context(|| format!("listener answered {s:?}"))
}

/// Connects from inside `ns` to `addr` (`timeout` to connect and to read) and returns what
/// the listener wrote before closing, trimmed.
pub fn tcp_answer(ns: &NetNs, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    ns.run(move || -> anyhow::Result<String> {
        let mut c = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        c.set_read_timeout(Some(timeout))?;
        let mut s = String::new();
        c.read_to_string(&mut s)
            .with_context(|| format!("reading from {addr}"))?;
        Ok(s.trim().to_owned())
    })
}

/// A tcpdump process inside a namespace; killed by PID on drop.
#[derive(Debug)]
pub struct Tcpdump {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Tcpdump {
    /// Starts `tcpdump -i <iface> -nn -l <filter>` in `ns` and waits until it is capturing.
    pub fn start(ns: &NetNs, iface: &str, filter: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, iface, &[], filter)
    }

    /// Like [`Tcpdump::start`] with the link-level header on each line (`-e`: MACs and VLAN
    /// tags, e.g. `vlan 100`).
    pub fn start_link_level(ns: &NetNs, iface: &str, filter: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, iface, &["-e"], filter)
    }

    /// Like [`Tcpdump::start`], with extra tcpdump options (`-e` for link-level headers).
    pub fn start_with(
        ns: &NetNs,
        iface: &str,
        opts: &[&str],
        filter: &str,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "-nn", "-l", "-Q", "in", "-Z", "root"])
            .args(opts)
            .args(filter.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::netns::enter_on_spawn(&mut cmd, ns.name())?;
        let mut child = cmd.spawn().context("spawning tcpdump")?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let reader = std::thread::spawn(move || {
            // tcpdump ends its output with an empty line when interrupted; keep packets only.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim().is_empty() {
                    continue;
                }
                l.lock().expect("lines lock").push(line);
            }
        });
        let mut t = Tcpdump {
            child: Some(child),
            lines,
            reader: Some(reader),
        };
        // tcpdump prints "listening on <if>" on stderr once the capture is attached (after a
        // line about verbose output). EOF before that means it failed.
        let mut err = BufReader::new(stderr);
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if err.read_line(&mut line)? == 0 {
                t.stop();
                bail!("tcpdump in {} failed: {seen}", ns.name());
            }
            seen.push_str(&line);
            if line.contains("listening on") {
                break;
            }
        }
        // Drain the rest of stderr so tcpdump never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        Ok(t)
    }

    /// The packet lines printed so far (tcpdump keeps running).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Stops tcpdump (SIGINT by PID) and returns the packet lines it printed.
    pub fn stop(&mut self) -> Vec<String> {
        if let Some(mut c) = self.child.take() {
            // Give the kernel a moment to hand over packets still in flight.
            std::thread::sleep(Duration::from_millis(200));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.lines.lock().expect("lines lock").clone()
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The IP of a socket address, for comparisons.
pub fn ip_of(a: SocketAddr) -> IpAddr {
    a.ip()
}
