//! TC attachment of BPF classifiers through netlink (cls_bpf on `clsact`), shared by the eBPF
//! dataplane's pod programs and the VLAN tagger ([`crate::kernel::vlan`]), each in a slot
//! (priority, handle) of its own.
//!
//! The filters are deliberately leaked from the process: dropping aya's netlink link would
//! delete the filter, and the filter must outlive the agent (it is what keeps pods connected,
//! and VLANs tagged, while the agent is down or being upgraded).

use aya::programs::SchedClassifier;
use aya::programs::TcAttachType;
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};

/// Errors of a TC attachment.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    /// Neither a fresh attach nor the in-place replacement of the filter in the slot worked.
    #[error(
        "attaching a classifier at {direction:?} of {ifname} (slot {priority}/{handle:?}): {first}; replacing the filter in the slot: {source}"
    )]
    Attach {
        /// The interface.
        ifname: String,
        /// Ingress or egress.
        direction: TcAttachType,
        /// The filter's priority.
        priority: u16,
        /// The filter's handle.
        handle: TcHandle,
        /// Why the fresh attach failed.
        first: Box<aya::programs::ProgramError>,
        /// Why the replacement failed (boxed, as `first`: aya's errors are large).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// aya gave no link for an attachment it reported done (a bug).
    #[error("taking the link of a classifier on {ifname}: {source}")]
    Link {
        /// The interface.
        ifname: String,
        /// What aya said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
}

/// Attaches `prog` at `t` of `ifname` as the cls_bpf filter `priority`/`handle`, or, when a
/// filter is there already (a re-add, or another build's or process's), replaces its program
/// in place, which cls_bpf does atomically. Idempotent; the filter outlives this process. The
/// interface needs a `clsact` qdisc (the callers add it).
pub fn attach_filter(
    prog: &mut SchedClassifier,
    ifname: &str,
    t: TcAttachType,
    priority: u16,
    handle: TcHandle,
) -> Result<(), TcError> {
    let opts = NlOptions {
        priority,
        handle,
        classid: None,
    };
    let id = match prog.attach_with_options(ifname, t, TcAttachOptions::Netlink(opts)) {
        Ok(id) => id,
        Err(first) => {
            let replaced = SchedClassifierLink::attached(ifname, t, priority, handle, None)
                .map_err(aya::programs::ProgramError::from)
                .and_then(|old| prog.attach_to_link(old));
            replaced.map_err(|source| TcError::Attach {
                ifname: ifname.to_owned(),
                direction: t,
                priority,
                handle,
                first: Box::new(first),
                source: Box::new(source),
            })?
        }
    };
    let link = prog.take_link(id).map_err(|source| TcError::Link {
        ifname: ifname.to_owned(),
        source: Box::new(source),
    })?;
    // The value holds only integers (ifindex, priority, handle), so forgetting it leaks
    // nothing but keeps the filter installed.
    std::mem::forget(link);
    Ok(())
}
