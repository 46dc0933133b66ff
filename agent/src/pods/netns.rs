//! Opening a pod's network namespace by its CNI_NETNS path, and saying what the path really is
//! when it is not a network namespace.
//!
//! The runtime names the namespace by a path (`/run/netns/<id>`, `/proc/<pid>/ns/net`). The
//! agent opens it in its own mount namespace, which need not be the runtime's: a namespace
//! bind-mounted in another mount namespace without propagation shows up here as the empty
//! regular file the mount was made on. Every open goes through [`open_netns`], which checks the
//! opened descriptor (`fstatfs`: the nsfs magic, and the namespace type `/proc/self/fd/<fd>`
//! names), so the descriptor that was checked is the one later handed to `setns` and to
//! netlink, and an error names the path and what it is instead of a bare `EINVAL`.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use nix::sys::statfs::{FsType, fstatfs};

use crate::pods::podnet::PodNetError;

/// Opens `netns` and checks that it is a network namespace.
///
/// Errors: [`PodNetError::NotNetns`] when the path does not exist or is something else (a
/// regular file, a directory, a device, another kind of namespace), naming what it is;
/// [`PodNetError::Netns`] when it cannot be opened or examined for another reason (permissions).
pub fn open_netns(netns: &str) -> Result<File, PodNetError> {
    let not_netns = |what: String| PodNetError::NotNetns {
        netns: netns.to_owned(),
        what,
    };
    let io_err = |source: std::io::Error| PodNetError::Netns {
        netns: netns.to_owned(),
        source,
    };
    if netns.is_empty() {
        return Err(not_netns("is empty".into()));
    }
    // O_NONBLOCK: a FIFO at the path must not block the open; O_NOCTTY: a terminal must not
    // become the agent's. Neither matters for an nsfs file.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(netns)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(not_netns(
                "does not exist (in ferrea-agent's mount namespace)".into(),
            ));
        }
        // A unix socket cannot be opened (ENXIO); say what it is when the path can be examined.
        Err(e) => {
            return Err(match std::fs::metadata(netns) {
                Ok(m) if m.file_type().is_socket() => not_netns(format!(
                    "is a unix socket{}, not a network namespace",
                    on_fs_of_path(netns)
                )),
                _ => io_err(e),
            });
        }
    };
    let fs = fstatfs(&file).map_err(|e| io_err(e.into()))?;
    if fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC {
        return match namespace_kind(&file) {
            Some(kind) if kind != "net" => Err(not_netns(format!(
                "is a {} namespace, not a network namespace",
                kind_name(&kind)
            ))),
            // `net`, or /proc is not there to tell: an nsfs file is accepted, and setns with
            // CLONE_NEWNET refuses any other kind anyway.
            _ => Ok(file),
        };
    }
    let meta = file.metadata().map_err(io_err)?;
    let fs_name = fs_type_name(fs.filesystem_type());
    let ft = meta.file_type();
    let what = if ft.is_file() && meta.len() == 0 {
        format!(
            "is an empty regular file on {fs_name}, not a network namespace (a bind mount made in another mount namespace that did not propagate to ferrea-agent's?)"
        )
    } else if ft.is_file() {
        format!(
            "is a regular file of {} bytes on {fs_name}, not a network namespace",
            meta.len()
        )
    } else if ft.is_dir() {
        format!("is a directory on {fs_name}, not a network namespace")
    } else if ft.is_char_device() {
        format!(
            "is a character device ({}:{}) on {fs_name}, not a network namespace",
            major(meta.rdev()),
            minor(meta.rdev())
        )
    } else if ft.is_block_device() {
        format!("is a block device on {fs_name}, not a network namespace")
    } else if ft.is_fifo() {
        format!("is a FIFO on {fs_name}, not a network namespace")
    } else {
        format!(
            "is not a network namespace (file mode {:o} on {fs_name})",
            meta.mode()
        )
    };
    Err(not_netns(what))
}

/// Whether `netns` names a network namespace now (for reconciliation: a pod whose path became
/// anything else is gone).
pub fn is_netns(netns: &str) -> bool {
    open_netns(netns).is_ok()
}

/// The namespace type of an nsfs descriptor as `/proc/self/fd/<fd>` names it (`net`, `mnt`,
/// `pid`, ...), or `None` if /proc cannot tell.
fn namespace_kind(file: &File) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let link = link.to_str()?;
    let (kind, rest) = link.split_once(':')?;
    rest.starts_with('[').then(|| kind.to_owned())
}

/// A namespace type as people say it.
fn kind_name(kind: &str) -> &str {
    match kind {
        "mnt" => "mount",
        "pid" | "pid_for_children" => "PID",
        "uts" => "UTS",
        "ipc" => "IPC",
        "user" => "user",
        "cgroup" => "cgroup",
        "time" | "time_for_children" => "time",
        other => other,
    }
}

/// " on <fs>" for the file system holding `path`, or nothing if it cannot be examined.
fn on_fs_of_path(path: &str) -> String {
    nix::sys::statfs::statfs(path)
        .map(|s| format!(" on {}", fs_type_name(s.filesystem_type())))
        .unwrap_or_default()
}

/// The name of a file system type from its `statfs` magic number.
fn fs_type_name(t: FsType) -> String {
    use nix::sys::statfs as s;
    let known: &[(FsType, &str)] = &[
        (s::TMPFS_MAGIC, "tmpfs"),
        (s::PROC_SUPER_MAGIC, "proc"),
        (s::SYSFS_MAGIC, "sysfs"),
        (s::EXT4_SUPER_MAGIC, "ext4"),
        (s::XFS_SUPER_MAGIC, "xfs"),
        (s::BTRFS_SUPER_MAGIC, "btrfs"),
        (s::OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (s::NFS_SUPER_MAGIC, "nfs"),
        (s::CGROUP2_SUPER_MAGIC, "cgroup2"),
        (s::BPF_FS_MAGIC, "bpffs"),
        (s::DEVPTS_SUPER_MAGIC, "devpts"),
        (s::NSFS_MAGIC, "nsfs"),
    ];
    known
        .iter()
        .find(|(m, _)| *m == t)
        .map(|(_, n)| (*n).to_owned())
        .unwrap_or_else(|| format!("a file system of type {:#x}", t.0))
}

fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what(path: &str) -> String {
        match open_netns(path) {
            Err(PodNetError::NotNetns { what, .. }) => what,
            Err(e) => panic!("{path}: expected NotNetns, got {e}"),
            Ok(_) => panic!("{path}: accepted as a network namespace"),
        }
    }

    #[test]
    fn the_own_network_namespace_is_one() {
        // Any process may open its own namespaces.
        assert!(open_netns("/proc/self/ns/net").is_ok());
        assert!(is_netns("/proc/self/ns/net"));
    }

    #[test]
    fn other_things_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let w = what(empty.to_str().unwrap());
        assert!(
            w.starts_with("is an empty regular file on ") && w.contains("another mount namespace"),
            "{w}"
        );
        let full = dir.path().join("full");
        std::fs::write(&full, b"12345").unwrap();
        assert!(
            what(full.to_str().unwrap()).starts_with("is a regular file of 5 bytes on "),
            "{}",
            what(full.to_str().unwrap())
        );
        assert!(what(dir.path().to_str().unwrap()).starts_with("is a directory on "));
        let missing = dir.path().join("missing");
        assert!(what(missing.to_str().unwrap()).starts_with("does not exist"));
        assert_eq!(what(""), "is empty");
        assert!(
            what("/proc/self/status").starts_with("is a regular file")
                || what("/proc/self/status").starts_with("is an empty regular file on proc"),
            "{}",
            what("/proc/self/status")
        );
        assert!(what("/proc/self/status").contains(" on proc"));
        assert_eq!(
            what("/proc/self/ns/mnt"),
            "is a mount namespace, not a network namespace"
        );
        assert!(
            what("/dev/null").starts_with("is a character device (1:3)"),
            "{}",
            what("/dev/null")
        );
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(what(fifo.to_str().unwrap()).starts_with("is a FIFO on "));
        let sock = dir.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(
            what(sock.to_str().unwrap()).starts_with("is a unix socket"),
            "{}",
            what(sock.to_str().unwrap())
        );
        // The error names the path.
        let e = open_netns(empty.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("CNI_NETNS {} is an empty", empty.display())),
            "{e}"
        );
    }
}
