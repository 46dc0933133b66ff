//! Policy-routing rules (`ip rule`), told apart by their protocol (`FRA_PROTOCOL`): a caller
//! owns the rules of its protocol number and nothing else. [`Rules`] is the side effect;
//! [`NetlinkRules`] its Linux implementation over rtnetlink.

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion};

use super::netlink::{NetlinkError, is_errno};

/// One IPv4 `lookup <table>` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    /// The priority, if set.
    pub priority: Option<u32>,
    /// The fwmark it matches, if any.
    pub fwmark: Option<u32>,
    /// The mask of the fwmark, if any.
    pub fwmask: Option<u32>,
    /// The table it looks up.
    pub table: u32,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = self.priority {
            write!(f, "{p}: ")?;
        }
        match (self.fwmark, self.fwmask) {
            (Some(m), Some(k)) => write!(f, "fwmark {m:#x}/{k:#x} ")?,
            (Some(m), None) => write!(f, "fwmark {m:#x} ")?,
            _ => {}
        }
        write!(f, "lookup {}", self.table)
    }
}

/// The IPv4 rules of one protocol number in the caller's network namespace.
///
/// Contract: each call on one rule is one netlink request, all-or-nothing in the kernel;
/// calls are safe concurrently (RTNL serialises them). [`Rules::add`] is not idempotent: the
/// kernel keeps duplicates, so callers list first. [`Rules::delete`] is idempotent and removes
/// one rule equal to the given one.
#[async_trait]
pub trait Rules: Send + Sync {
    /// Every IPv4 rule with `protocol`.
    async fn list(&self, protocol: u8) -> Result<Vec<Rule>, NetlinkError>;

    /// Adds `rule` with `protocol`.
    async fn add(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError>;

    /// Deletes one rule equal to `rule` with `protocol`. None there: `Ok`.
    async fn delete(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError>;
}

/// [`Rules`] over an rtnetlink connection.
#[derive(Clone)]
pub struct NetlinkRules {
    handle: Handle,
}

impl NetlinkRules {
    /// Rules through `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    fn message(&self, protocol: u8, rule: &Rule) -> rtnetlink::RuleAddRequest<std::net::Ipv4Addr> {
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .table_id(rule.table)
            .action(RuleAction::ToTable);
        if let Some(p) = rule.priority {
            req = req.priority(p);
        }
        if let Some(m) = rule.fwmark {
            req = req.fw_mark(m);
        }
        let msg = req.message_mut();
        if let Some(k) = rule.fwmask {
            msg.attributes.push(RuleAttribute::FwMask(k));
        }
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(protocol)));
        req
    }
}

fn rule_of(m: &RuleMessage) -> Rule {
    let mut r = Rule {
        priority: None,
        fwmark: None,
        fwmask: None,
        table: u32::from(m.header.table),
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::FwMark(x) => r.fwmark = Some(*x),
            RuleAttribute::FwMask(x) => r.fwmask = Some(*x),
            RuleAttribute::Table(t) => r.table = *t,
            RuleAttribute::Priority(p) => r.priority = Some(*p),
            _ => {}
        }
    }
    r
}

#[async_trait]
impl Rules for NetlinkRules {
    async fn list(&self, protocol: u8) -> Result<Vec<Rule>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing", "rules", e))?
        {
            let ours = m.attributes.iter().any(
                |a| matches!(a, RuleAttribute::Protocol(p) if *p == RouteProtocol::Other(protocol)),
            );
            if ours {
                out.push(rule_of(&m));
            }
        }
        Ok(out)
    }

    async fn add(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError> {
        self.message(protocol, rule)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("adding rule", rule.to_string(), e))
    }

    async fn delete(&self, protocol: u8, rule: &Rule) -> Result<(), NetlinkError> {
        let mut req = self.message(protocol, rule);
        let msg = req.message_mut().clone();
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(NetlinkError::from_rtnetlink(
                "removing rule",
                rule.to_string(),
                e,
            )),
        }
    }
}
