//! The agent's state store under damage and a full disk, on both dataplanes.
//!
//! - A store file truncated, emptied or overwritten while the agent is down: the restarted
//!   agent says what it found, sets the file aside, rebuilds the pods' records from the notes
//!   their host veths carry, and the running pods keep their traffic and their addresses.
//! - The state directory full (a small tmpfs, filled): an ADD that cannot be recorded fails
//!   with an error naming the file and the cause and leaves nothing behind; once there is room
//!   the same agent serves ADDs again, and a restart finds everything consistent.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrea_tests::traffic::BackgroundPing;
use ferrea_tests::{Dataplane, NodeOptions, Pod, SimNode, dataplane_tests, lines_mentioning};

/// How the store file is damaged while the agent is down.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Cut to half its length.
    Truncated,
    /// Cut to 0 bytes (what redb alone would take for a new, empty database).
    Emptied,
    /// Its first 4 KiB overwritten with garbage.
    Overwritten,
    /// Removed (a wiped state directory): not damage, but the pods are rebuilt all the same.
    Removed,
}

fn damage(file: &Path, how: Damage) {
    let mut bytes = std::fs::read(file).unwrap();
    match how {
        Damage::Removed => return std::fs::remove_file(file).unwrap(),
        Damage::Truncated => bytes.truncate(bytes.len() / 2),
        Damage::Emptied => bytes.clear(),
        Damage::Overwritten => {
            let n = bytes.len().min(4096);
            for (i, b) in bytes[..n].iter_mut().enumerate() {
                *b = (i * 131 % 251) as u8;
            }
        }
    }
    std::fs::write(file, &bytes).unwrap();
}

fn damaged_copies(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("ferrea.redb.damaged-"))
        .collect()
}

dataplane_tests!(a_damaged_store_is_rebuilt_and_pods_keep_their_network);

fn a_damaged_store_is_rebuilt_and_pods_keep_their_network(dp: Dataplane) {
    let mut node = SimNode::start(NodeOptions::new(dp)).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let mut c = node.add_pod().unwrap();
    let ips = [a.ip(), b.ip(), c.ip()];
    let veths = node.pod_veths().unwrap();
    assert!(a.ping(b.ip()) && c.ping(a.ip()));
    let state = node.dir().join("state");
    let file = state.join("ferrea.redb");

    let rounds = [
        Damage::Truncated,
        Damage::Emptied,
        Damage::Overwritten,
        Damage::Removed,
    ];
    let mut copies = 0;
    for how in rounds {
        // Pings every 50 ms between two pods across the kill, the damage and the restart.
        let ping = BackgroundPing::start(
            a.name(),
            b.ip(),
            Duration::from_millis(50),
            Duration::from_secs(4),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        node.agent().kill9().unwrap();
        damage(&file, how);
        let since = node.agent_log_len();
        node.agent().restart().unwrap();
        let log = node.agent_log_since(since);
        let counts = ping.finish().unwrap();
        println!("{how:?}: pings across the restart: {counts:?}");
        assert!(
            counts.lost() <= 3,
            "{how:?}: {} of {} pings lost",
            counts.lost(),
            counts.sent
        );

        // The agent says what it found and where the file went, and rebuilt the three pods.
        let warned = log
            .lines()
            .find(|l| l.contains("the state store is damaged"));
        if matches!(how, Damage::Removed) {
            assert!(warned.is_none(), "{how:?}: {warned:?}");
        } else {
            let warned = warned.unwrap_or_else(|| panic!("{how:?}: no damage reported:\n{log}"));
            println!("{how:?}: {warned}");
            assert!(warned.contains("found="), "{how:?}: {warned}");
            if matches!(how, Damage::Emptied) {
                assert!(warned.contains("an empty file (0 bytes)"), "{warned}");
            }
        }
        let rebuilt = log
            .lines()
            .find(|l| l.contains("rebuilt from their interfaces' notes"))
            .unwrap_or_else(|| panic!("{how:?}: no rebuild reported:\n{log}"));
        println!("{how:?}: {rebuilt}");
        assert!(rebuilt.contains("rebuilt=3"), "{how:?}: {rebuilt}");
        let kinds = if matches!(how, Damage::Removed) {
            "missing"
        } else {
            "damaged"
        };
        assert!(rebuilt.contains(kinds), "{how:?}: {rebuilt}");
        // Each damaged file is kept beside the new one, for inspection.
        copies += usize::from(!matches!(how, Damage::Removed));
        assert_eq!(damaged_copies(&state).len(), copies, "{how:?}");

        // Nothing was removed or renumbered; the agent knows each pod as it was.
        assert_eq!(
            node.pod_veths().unwrap(),
            veths,
            "{how:?}: pod interfaces changed"
        );
        for (p, ip) in [&a, &b, &c].into_iter().zip(ips) {
            assert_eq!(
                p.add_again().unwrap().ip,
                ip,
                "{how:?}: a pod's address changed"
            );
            p.check()
                .unwrap()
                .expect_ok("CHECK after the rebuild")
                .unwrap();
        }
        assert!(
            a.ping(b.ip()) && b.ping(c.ip()) && c.ping(a.ip()),
            "{how:?}"
        );
    }

    // The rebuilt store is the store: a clean restart reports no damage and keeps the pods.
    let since = node.agent_log_len();
    node.agent().restart().unwrap();
    let log = node.agent_log_since(since);
    assert!(
        !log.contains("damaged"),
        "a sound store reported damaged:\n{log}"
    );
    assert_eq!(node.pod_veths().unwrap(), veths);

    // DEL of a rebuilt attachment removes everything of it and frees its address.
    let (c_ip, c_veth) = (c.ip(), c.host_ifname().to_owned());
    c.del().unwrap().expect_ok("DEL of a rebuilt pod").unwrap();
    assert!(!node.pod_veths().unwrap().contains(&c_veth));
    assert!(lines_mentioning(&node.routes().unwrap(), c_ip).is_empty());
    assert!(lines_mentioning(&node.nft_ruleset().unwrap(), c_ip).is_empty());
    // New pods never get an address a running pod has.
    let d = node.add_pod().unwrap();
    assert!(
        d.ip() != a.ip() && d.ip() != b.ip(),
        "{} given twice",
        d.ip()
    );
    assert!(d.ping(a.ip()) && a.ping(d.ip()));
}

/// A tmpfs mounted on a directory for the test; unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs at {}: {e}", dir.display()));
        Tmpfs(dir.to_owned())
    }

    /// Fills what is free with one file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x66u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

dataplane_tests!(a_full_state_directory_fails_add_cleanly_and_the_agent_recovers);

fn a_full_state_directory_fails_add_cleanly_and_the_agent_recovers(dp: Dataplane) {
    let mut opts = NodeOptions::new(dp);
    opts.start_agent = false;
    let mut node = SimNode::start(opts).unwrap();
    let tmpfs = Tmpfs::mount(&node.dir().join("state"), "16m");
    node.agent().spawn().unwrap();
    node.agent()
        .wait_ready(ferrea_tests::agent::READY_TIMEOUT)
        .unwrap();
    let first = node.add_pod().unwrap();
    let filler = tmpfs.fill();

    // ADDs until one cannot be recorded (the database must grow at some point).
    let mut pods = vec![first];
    let failed = loop {
        assert!(pods.len() < 200, "200 ADDs on a full disk all succeeded");
        match Pod::try_add(node.cni(), "full").unwrap() {
            Ok(p) => pods.push(p),
            Err(out) => break out,
        }
    };
    println!(
        "{} ADDs succeeded on the full disk; then: {failed}",
        pods.len() - 1
    );
    let msg = failed
        .json
        .as_ref()
        .map(|j| format!("{} {}", j["msg"], j["details"]))
        .unwrap_or_default();
    assert!(
        msg.contains("No space left on device") && msg.contains("ferrea.redb"),
        "the error names neither the cause nor the file: {failed}"
    );
    // Rolled back: only the recorded pods have interfaces and routes.
    let veths: HashSet<String> = node.pod_veths().unwrap().into_iter().collect();
    let want: HashSet<String> = pods.iter().map(|p| p.host_ifname().to_owned()).collect();
    assert_eq!(veths, want, "the failed ADD left an interface");
    let pod_ips: HashSet<Ipv4Addr> = pods.iter().map(Pod::ip).collect();
    let host_routes: HashSet<Ipv4Addr> = node
        .routes()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .filter(|ip: &Ipv4Addr| ip.octets()[..2] == [10, 244])
        .collect();
    assert!(
        host_routes.is_subset(&pod_ips),
        "the failed ADD left a route: {:?}",
        host_routes.difference(&pod_ips).collect::<Vec<_>>()
    );
    // No half-written file is left in the state directory.
    let tmp: Vec<_> = std::fs::read_dir(node.dir().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "half-written files: {tmp:?}");
    // The agent kept serving the pods it has.
    assert!(pods[0].ping(pods[pods.len() - 1].ip()));

    // Room again: the same agent records ADDs and DELs again.
    std::fs::remove_file(&filler).unwrap();
    let fresh = node.add_pod().unwrap();
    assert!(fresh.ping(pods[0].ip()));
    let mut last = pods.pop().unwrap();
    last.del()
        .unwrap()
        .expect_ok("DEL once there is room")
        .unwrap();

    // A restart finds the store and the kernel in agreement.
    let since = node.agent_log_len();
    node.agent().restart().unwrap();
    let log = node.agent_log_since(since);
    assert!(!log.contains("damaged"), "{log}");
    let reconciled = log
        .lines()
        .find(|l| l.contains(" reconciled kept="))
        .unwrap_or_else(|| panic!("no reconcile line:\n{log}"));
    assert!(
        reconciled.contains(&format!("kept={}", pods.len() + 1))
            && reconciled.contains("stale_records=[]")
            && reconciled.contains("orphan_links=[]"),
        "{reconciled}"
    );
    for p in pods.iter().chain([&fresh]) {
        assert_eq!(p.add_again().unwrap().ip, p.ip());
    }
    // Locals drop in reverse: the pods (DEL), the tmpfs, then the node.
}
