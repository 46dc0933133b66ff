//! The agent's root-only unix sockets: the CNI socket, and the debug socket, prepared the
//! same way.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Preparing a socket failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}", path.display())]
pub struct SocketError {
    /// What was being done.
    pub op: &'static str,
    /// The socket or its directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Binds a unix socket at `path`, mode 0600 (only root may talk to the agent: its APIs act
/// on arbitrary namespaces): creates the directory, removes a socket file a killed agent
/// left (bind would fail with EADDRINUSE). `bind_op` names the bind in errors ("binding CNI
/// socket").
pub fn bind_root_only(path: &Path, bind_op: &'static str) -> Result<UnixListener, SocketError> {
    let err = |op, p: &Path| {
        let path = p.to_owned();
        move |source| SocketError { op, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err("creating", dir))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing stale socket", path)(e)),
    }
    let l = UnixListener::bind(path).map_err(err(bind_op, path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("restricting", path))?;
    Ok(l)
}
