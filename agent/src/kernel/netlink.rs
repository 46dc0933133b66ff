//! What the rtnetlink-backed traits ([`super::links`], [`super::addresses`], [`super::tables`],
//! [`super::rules`]) share: their error type, and the errno a caller may branch on.

/// A netlink request that failed: what was being done, to which object, and the kernel's
/// answer (an errno where the kernel gave one).
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}")]
pub struct NetlinkError {
    /// What was being done (`creating VLAN device`, `adding route`, ...).
    pub op: &'static str,
    /// The object: an interface, an address, a route or rule in words.
    pub object: String,
    /// The kernel's answer; [`std::io::Error::raw_os_error`] is its errno when it sent one.
    #[source]
    pub source: std::io::Error,
}

impl NetlinkError {
    /// An error for `op` on `object` with the kernel's `errno`.
    pub fn errno(op: &'static str, object: impl Into<String>, errno: i32) -> Self {
        Self {
            op,
            object: object.into(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Whether the kernel answered `errno`.
    pub fn is(&self, errno: i32) -> bool {
        self.source.raw_os_error() == Some(errno)
    }

    /// Whether the kernel does not support what was asked (`EOPNOTSUPP`): a link kind its
    /// modules do not provide, say.
    pub fn is_not_supported(&self) -> bool {
        self.is(libc::EOPNOTSUPP)
    }

    /// Converts an rtnetlink error: a netlink error message becomes its errno.
    pub(crate) fn from_rtnetlink(
        op: &'static str,
        object: impl Into<String>,
        e: rtnetlink::Error,
    ) -> Self {
        let source = match &e {
            rtnetlink::Error::NetlinkError(m) if m.raw_code() < 0 => {
                std::io::Error::from_raw_os_error(-m.raw_code())
            }
            _ => std::io::Error::other(e.to_string()),
        };
        Self {
            op,
            object: object.into(),
            source,
        }
    }
}

/// Whether an rtnetlink error is the kernel's `errno`.
pub(crate) fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}
