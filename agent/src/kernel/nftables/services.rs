//! ferrea's service proxy in the node's stack: the part of ferrea's nftables table that
//! translates Service traffic reaching the stack (`serviceProxy: ferrea`), as kube-proxy's
//! nftables mode would.
//!
//! What reaches the stack: the node's own processes calling a Service, NodePorts and the
//! external addresses called from outside the node, and the pods' packets a dataplane did
//! not load-balance itself. One verdict-map lookup per packet finds the frontend
//! (`svc_local`, `svc_outside`: address . protocol . port; `svc_nodeports`: protocol . port on
//! the node's address); each frontend has a chain that picks an endpoint (`numgen random`,
//! after the client's affinity sets for `sessionAffinity: ClientIP`) and an endpoint chain
//! that DNATs. Masquerade is decided per frontend as kube-proxy does: traffic from outside the
//! node to a frontend without `externalTrafficPolicy: Local`, and hairpin (a pod reaching
//! itself through its Service), get the mark [`SERVICE_MASQ_MARK`] and are masqueraded in
//! `svc_postrouting`. A frontend with no endpoint rejects (ICMP port unreachable), and a
//! packet to the service CIDR that no frontend translated is dropped: no Service address
//! leaves the node untranslated.
//!
//! The table is replaced as a whole on every change (see [`super::NatTable`]); established
//! connections keep their translation in conntrack, but the affinity sets start empty again.

use std::fmt::Write;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::proxy::{Backend, ServicePlan};
use crate::source::Protocol;

/// The packet mark bit that asks `svc_postrouting` to masquerade (kube-proxy's own value; it
/// does not run where ferrea's proxy does, and ferrea's Egress marks use only the low byte).
pub const SERVICE_MASQ_MARK: u32 = 0x4000;

/// The Service part of ferrea's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRules {
    /// The node's address the NodePorts are on.
    pub node_ip: Ipv4Addr,
    /// The service CIDR: what no frontend translated there is dropped.
    pub service_cidr: Ipv4Network,
    /// What to translate.
    pub plan: ServicePlan,
}

/// One frontend as the table renders it: where it is matched and how its endpoints are
/// reached.
struct Frontend<'a> {
    /// The map element's key (`10.96.0.10 . udp . 53`, or `tcp . 30080` for a NodePort).
    key: String,
    backends: &'a [Backend],
    protocol: Protocol,
    /// Whether traffic through this frontend is masqueraded (besides hairpin).
    masquerade: bool,
    affinity_secs: Option<u32>,
    comment: String,
}

impl ServiceRules {
    /// The nft block adding the Service maps and chains to `table`. `pod_cidr` is this
    /// node's: packets from it arriving in prerouting are the pods' own.
    pub fn render(&self, table: &str, pod_cidr: Ipv4Network) -> String {
        let mut s = format!("table ip {table} {{\n");
        let proto = |p: Protocol| p.as_str();
        // Three views of the frontends: from this node (its pods, its processes), from
        // outside the node, and the node ports.
        let mut local = Vec::new();
        let mut outside = Vec::new();
        let mut node_ports = Vec::new();
        for v in &self.plan.vips {
            let key = format!(
                "{} . {} . {}",
                v.addr.ip,
                proto(v.addr.protocol),
                v.addr.port
            );
            let comment = format!("{} {}", v.name, v.kind.as_str());
            local.push(Frontend {
                key: key.clone(),
                backends: &v.backends,
                protocol: v.addr.protocol,
                masquerade: false,
                affinity_secs: v.affinity_secs,
                comment: comment.clone(),
            });
            outside.push(Frontend {
                key,
                backends: &v.external_backends,
                protocol: v.addr.protocol,
                masquerade: !v.external_local,
                affinity_secs: v.affinity_secs,
                comment,
            });
        }
        for n in &self.plan.node_ports {
            node_ports.push(Frontend {
                key: format!("{} . {}", proto(n.protocol), n.port),
                backends: &n.backends,
                protocol: n.protocol,
                masquerade: !n.external_local,
                affinity_secs: n.affinity_secs,
                comment: format!("{} NodePort", n.name),
            });
        }
        let mut chains = String::new();
        let mut no_endpoints = Vec::new();
        let mut maps = String::new();
        for (view, key_type, frontends) in [
            ("local", "ipv4_addr . inet_proto . inet_service", &local),
            ("outside", "ipv4_addr . inet_proto . inet_service", &outside),
            ("nodeports", "inet_proto . inet_service", &node_ports),
        ] {
            let mut elems = Vec::new();
            for (i, f) in frontends.iter().enumerate() {
                if f.backends.is_empty() {
                    let key = if view == "nodeports" {
                        format!("{} . {}", self.node_ip, f.key)
                    } else {
                        f.key.clone()
                    };
                    no_endpoints.push(key);
                    continue;
                }
                let chain = format!("svc_{view}_{i}");
                elems.push(format!("{} : goto {chain}", f.key));
                render_frontend(&mut chains, &chain, f);
            }
            no_endpoints.sort();
            no_endpoints.dedup();
            let _ = write!(maps, "  map svc_{view} {{\n    type {key_type} : verdict\n");
            if !elems.is_empty() {
                let _ = writeln!(maps, "    elements = {{ {} }}", elems.join(",\n      "));
            }
            maps.push_str("  }\n");
        }
        s.push_str(&maps);
        let _ = write!(
            s,
            "  map svc_no_endpoints {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n"
        );
        if !no_endpoints.is_empty() {
            let elems: Vec<String> = no_endpoints
                .iter()
                .map(|k| format!("{k} : goto svc_reject"))
                .collect();
            let _ = writeln!(s, "    elements = {{ {} }}", elems.join(",\n      "));
        }
        s.push_str("  }\n");
        let node_ip = self.node_ip;
        let cidr = self.service_cidr;
        let masq = SERVICE_MASQ_MARK;
        // `dstnat` is not accepted for the output hook by nft 1.0; -100 is its value.
        let _ = write!(
            s,
            "  chain svc_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n\
             \x20   ip saddr {pod_cidr} ip daddr . meta l4proto . th dport vmap @svc_local\n\
             \x20   ip saddr != {pod_cidr} ip daddr . meta l4proto . th dport vmap @svc_outside\n\
             \x20   ip daddr {node_ip} meta l4proto . th dport vmap @svc_nodeports\n  }}\n\
             \x20 chain svc_output {{\n    type nat hook output priority -100; policy accept;\n\
             \x20   ip daddr . meta l4proto . th dport vmap @svc_local\n\
             \x20   ip daddr {node_ip} meta l4proto . th dport vmap @svc_nodeports\n  }}\n\
             \x20 chain svc_postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
             \x20   meta mark & {masq:#x} == {masq:#x} meta mark set meta mark & {keep:#x} counter masquerade \
             comment \"ferrea: Service traffic from outside the node, and hairpin\"\n  }}\n\
             \x20 chain svc_reject {{\n    counter reject comment \"ferrea: Service without endpoints\"\n  }}\n\
             \x20 chain svc_filter_forward {{\n    type filter hook forward priority filter - 5; policy accept;\n\
             \x20   ip daddr . meta l4proto . th dport vmap @svc_no_endpoints\n\
             \x20   ip daddr {cidr} counter drop comment \"ferrea: no Service at this address\"\n  }}\n\
             \x20 chain svc_filter_output {{\n    type filter hook output priority filter - 5; policy accept;\n\
             \x20   ip daddr . meta l4proto . th dport vmap @svc_no_endpoints\n\
             \x20   ip daddr {cidr} counter drop comment \"ferrea: no Service at this address\"\n  }}\n\
             \x20 chain svc_filter_input {{\n    type filter hook input priority filter - 5; policy accept;\n\
             \x20   ip daddr . meta l4proto . th dport vmap @svc_no_endpoints\n  }}\n",
            keep = !masq,
        );
        s.push_str(&chains);
        s.push_str("}\n");
        s
    }
}

/// The frontend chain `chain` and its endpoint chains.
fn render_frontend(out: &mut String, chain: &str, f: &Frontend<'_>) {
    let masq = SERVICE_MASQ_MARK;
    let _ = writeln!(out, "  chain {chain} {{");
    if f.masquerade {
        let _ = writeln!(out, "    meta mark set meta mark | {masq:#x}");
    }
    if f.affinity_secs.is_some() {
        // A client seen within the timeout goes back to its endpoint.
        for j in 0..f.backends.len() {
            let _ = writeln!(out, "    ip saddr @{chain}_aff{j} goto {chain}_ep{j}");
        }
    }
    let n = f.backends.len();
    if n == 1 {
        let _ = writeln!(out, "    goto {chain}_ep0 comment \"{}\"", f.comment);
    } else {
        let arms: Vec<String> = (0..n)
            .map(|j| format!("{j} : goto {chain}_ep{j}"))
            .collect();
        let _ = writeln!(
            out,
            "    numgen random mod {n} vmap {{ {} }} comment \"{}\"",
            arms.join(", "),
            f.comment
        );
    }
    out.push_str("  }\n");
    for (j, b) in f.backends.iter().enumerate() {
        if let Some(t) = f.affinity_secs {
            let _ = writeln!(
                out,
                "  set {chain}_aff{j} {{\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout {t}s\n  }}"
            );
        }
        let _ = writeln!(out, "  chain {chain}_ep{j} {{");
        // Hairpin: the client is the endpoint itself.
        let _ = writeln!(
            out,
            "    ip saddr {} meta mark set meta mark | {masq:#x}",
            b.ip
        );
        if f.affinity_secs.is_some() {
            let _ = writeln!(out, "    update @{chain}_aff{j} {{ ip saddr }}");
        }
        let _ = writeln!(
            out,
            "    meta l4proto {} counter dnat ip to {}:{}\n  }}",
            f.protocol.as_str(),
            b.ip,
            b.port
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::{NodePortService, ServiceAddr, VipKind, VipService};

    fn be(ip: &str, port: u16, local: bool) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
            local,
        }
    }

    fn rules() -> ServiceRules {
        let dns = VipService {
            name: "kube-system/dns:dns".into(),
            addr: ServiceAddr {
                ip: "10.96.0.10".parse().unwrap(),
                port: 53,
                protocol: Protocol::Udp,
            },
            kind: VipKind::ClusterIp,
            backends: vec![be("10.244.1.5", 5353, true), be("10.244.2.5", 5353, false)],
            external_backends: vec![be("10.244.1.5", 5353, true), be("10.244.2.5", 5353, false)],
            external_local: false,
            affinity_secs: None,
        };
        let web_lb = VipService {
            name: "shop/web".into(),
            addr: ServiceAddr {
                ip: "192.0.2.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            kind: VipKind::LoadBalancer,
            backends: vec![be("10.244.1.7", 8080, true), be("10.244.2.7", 8080, false)],
            external_backends: vec![be("10.244.1.7", 8080, true)],
            external_local: true,
            affinity_secs: Some(60),
        };
        let empty = VipService {
            name: "shop/empty".into(),
            addr: ServiceAddr {
                ip: "10.96.0.20".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            },
            kind: VipKind::ClusterIp,
            backends: vec![],
            external_backends: vec![],
            external_local: false,
            affinity_secs: None,
        };
        ServiceRules {
            node_ip: "172.18.0.11".parse().unwrap(),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            plan: ServicePlan {
                vips: vec![dns, empty, web_lb],
                node_ports: vec![NodePortService {
                    name: "shop/web".into(),
                    port: 30080,
                    protocol: Protocol::Tcp,
                    backends: vec![be("10.244.1.7", 8080, true)],
                    external_local: true,
                    affinity_secs: None,
                }],
            },
        }
    }

    #[test]
    fn frontends_are_map_elements_with_a_chain_each() {
        let s = rules().render("ferrea", "10.244.1.0/24".parse().unwrap());
        assert!(
            s.contains("10.96.0.10 . udp . 53 : goto svc_local_0"),
            "{s}"
        );
        assert!(
            s.contains("10.96.0.10 . udp . 53 : goto svc_outside_0"),
            "{s}"
        );
        assert!(s.contains("tcp . 30080 : goto svc_nodeports_0"), "{s}");
        // Two endpoints: a random pick between two endpoint chains that DNAT.
        assert!(
            s.contains(
                "numgen random mod 2 vmap { 0 : goto svc_local_0_ep0, 1 : goto svc_local_0_ep1 }"
            ),
            "{s}"
        );
        assert!(
            s.contains("meta l4proto udp counter dnat ip to 10.244.2.5:5353"),
            "{s}"
        );
        // Pods' own traffic is told from the outside world by its source.
        assert!(
            s.contains("ip saddr 10.244.1.0/24 ip daddr . meta l4proto . th dport vmap @svc_local")
        );
        assert!(s.contains("ip daddr 172.18.0.11 meta l4proto . th dport vmap @svc_nodeports"));
    }

    #[test]
    fn masquerade_follows_the_traffic_policy_and_hairpin_always_masquerades() {
        let s = rules().render("ferrea", "10.244.1.0/24".parse().unwrap());
        let chain = |name: &str| {
            let start = s
                .find(&format!("chain {name} {{"))
                .unwrap_or_else(|| panic!("{name}: {s}"));
            s[start..s[start..].find("  }\n").unwrap() + start].to_owned()
        };
        // The ClusterIP from outside the node is masqueraded; from its pods it is not.
        assert!(chain("svc_outside_0").contains("meta mark set meta mark | 0x4000"));
        assert!(!chain("svc_local_0").contains("meta mark set meta mark | 0x4000"));
        // externalTrafficPolicy: Local keeps the client's address, and only local endpoints.
        let lb = chain("svc_outside_2");
        assert!(!lb.contains("meta mark set meta mark | 0x4000"), "{lb}");
        assert!(lb.contains("goto svc_outside_2_ep0"), "{lb}");
        assert!(!s.contains("svc_outside_2_ep1"), "{s}");
        // The endpoint chains mark hairpin.
        assert!(
            chain("svc_local_0_ep0")
                .contains("ip saddr 10.244.1.5 meta mark set meta mark | 0x4000")
        );
        assert!(s.contains(
            "meta mark & 0x4000 == 0x4000 meta mark set meta mark & 0xffffbfff counter masquerade"
        ));
    }

    #[test]
    fn affinity_uses_timed_sets_per_endpoint() {
        let s = rules().render("ferrea", "10.244.1.0/24".parse().unwrap());
        assert!(
            s.contains("ip saddr @svc_local_2_aff0 goto svc_local_2_ep0"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @svc_local_2_aff1 goto svc_local_2_ep1"),
            "{s}"
        );
        assert!(s.contains("set svc_local_2_aff1 {\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout 60s\n  }"), "{s}");
        assert!(s.contains("update @svc_local_2_aff1 { ip saddr }"), "{s}");
        // No affinity, no sets.
        assert!(!s.contains("svc_local_0_aff"), "{s}");
    }

    #[test]
    fn frontends_without_endpoints_reject_and_unknown_service_addresses_drop() {
        let s = rules().render("ferrea", "10.244.1.0/24".parse().unwrap());
        assert!(s.contains("10.96.0.20 . tcp . 80 : goto svc_reject"), "{s}");
        assert!(!s.contains("svc_local_1 "), "{s}");
        assert!(s.contains("ip daddr 10.96.0.0/12 counter drop"), "{s}");
        assert_eq!(
            s.matches("10.96.0.20 . tcp . 80 : goto svc_reject").count(),
            1,
            "{s}"
        );
    }
}
