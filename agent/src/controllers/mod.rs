//! The controllers: each turns the desired state (and the node's pod attachments) into side
//! effects through traits, driven by the one reconcile runner ([`runner`]).
//!
//! - [`node`], the other nodes for the dataplane, and its upkeep.
//! - [`npl`], NodePortLocal.
//! - [`egress`], Egress IPs.
//!
//! A new controller (NetworkPolicy, the service proxy) is a folder here with a
//! [`runner::Reconciler`] and the traits of the side effects it needs.

pub mod egress;
pub mod node;
pub mod npl;
pub mod runner;
pub mod services;
