//! The bpffs pin directory: where it is mounted and how objects are named under it.
//!
//! bpffs holds only BPF objects and directories (no regular files), so the build digest of the
//! loaded programs is encoded in a directory name rather than stored in a file.

use std::path::{Path, PathBuf};

/// `statfs` magic of a bpffs (`BPF_FS_MAGIC` in linux/magic.h).
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Which hook of a pod's host veth a program attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// TC ingress of the host veth: frames the pod sends ([`ferrea_common::PROG_FROM_POD`]).
    Ingress,
    /// TC egress of the host veth: frames delivered to the pod ([`ferrea_common::PROG_TO_POD`]).
    Egress,
}

impl Direction {
    /// The program attached at this hook.
    pub fn program(self) -> &'static str {
        match self {
            Direction::Ingress => ferrea_common::PROG_FROM_POD,
            Direction::Egress => ferrea_common::PROG_TO_POD,
        }
    }
}

/// Names of everything ferrea pins under its pin path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root` (the configured `bpfPinPath`).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The pin path itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps, pinned by their names.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Parent of one directory per build of the programs.
    pub fn progs_root(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Programs of the build with this digest.
    pub fn progs_dir(&self, digest: &str) -> PathBuf {
        self.progs_root().join(digest)
    }
}

/// Removes the program pins of every build but `keep`. Programs still attached somewhere stay
/// loaded (the filters hold them); the others are unloaded by the kernel.
pub fn remove_other_prog_dirs(l: &PinLayout, keep: &str) {
    let Ok(rd) = std::fs::read_dir(l.progs_root()) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        if e.file_name() != keep {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// True if `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> std::io::Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Makes sure `path` exists and is on a bpffs: if the nearest existing ancestor is on one, the
/// directories are simply created; otherwise a bpffs is mounted on `path` itself (nodes without
/// a bpffs at /sys/fs/bpf, and tests with a private one per simulated node).
pub fn ensure_bpffs(path: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    if is_bpffs(path)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let l = PinLayout::new("/p".into());
        assert_eq!(l.maps_dir(), Path::new("/p/maps"));
        assert_eq!(l.progs_dir("abcd"), Path::new("/p/progs/abcd"));
        assert_eq!(Direction::Ingress.program(), "ferrea_from_pod");
        assert_eq!(Direction::Egress.program(), "ferrea_to_pod");
    }

    #[test]
    fn prune_old_builds_in_a_plain_directory() {
        // The naming logic does not need a bpffs; a tempdir stands in.
        let dir = tempfile::tempdir().unwrap();
        let l = PinLayout::new(dir.path().to_owned());
        std::fs::create_dir_all(l.progs_dir("old")).unwrap();
        std::fs::create_dir_all(l.progs_dir("new")).unwrap();
        remove_other_prog_dirs(&l, "new");
        assert!(!l.progs_dir("old").exists());
        assert!(l.progs_dir("new").exists());
    }
}
