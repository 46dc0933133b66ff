//! Recording fakes of the OVS backend's seams: [`FakeOvsdb`] (an in-memory `Open_vSwitch`
//! database), [`FakeSwitch`] (a flow table behind OpenFlow connections) and [`FakeHost`]
//! (the node's kernel).

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Map, Value, json};

use crate::dataplane::ovs::host::NodeKernel;
use crate::dataplane::ovs::openflow::codec::{
    FlowModCommand, GROUP_ALL, GroupModCommand, TABLE_ALL,
};
use crate::dataplane::ovs::openflow::{
    BundleMsg, ConnError, FlowMod, FlowStats, GroupMod, Instruction, OpenFlow, OpenFlowConnector,
};
use crate::dataplane::ovs::ovsdb::{Ovsdb, OvsdbError, parse_map};
use crate::dataplane::{DataplaneError, NodeNetwork};
use crate::kernel::routes::NodeRoute;
use crate::kernel::sysctl::SysctlError;

type Row = Map<String, Value>;

/// One transaction the backend sent.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// The name the backend gave it.
    pub op: &'static str,
    /// Its operations, as sent.
    pub ops: Vec<Value>,
    /// Whether it committed.
    pub committed: bool,
}

#[derive(Default)]
struct Db {
    tables: BTreeMap<String, Vec<Row>>,
    next_uuid: u64,
    next_ofport: i64,
}

/// An in-memory `Open_vSwitch` database speaking the subset of RFC 7047 the backend uses
/// (`select`, `insert`, `update`, `mutate`, `wait` with timeout 0 and `==`/`includes`
/// conditions), all-or-nothing per transaction, with the garbage collection of unreferenced
/// `Bridge`, `Port` and `Interface` rows. It plays vswitchd too: an inserted interface gets
/// `ofport` at once (its `ofport_request`, else the next free number from 1).
#[derive(Default)]
pub struct FakeOvsdb {
    db: Mutex<Db>,
    /// Every transaction, in order (failed ones with `committed: false`).
    pub log: Mutex<Vec<Transaction>>,
}

impl FakeOvsdb {
    /// The rows of `table` now.
    pub fn rows(&self, table: &str) -> Vec<Row> {
        self.db
            .lock()
            .unwrap()
            .tables
            .get(table)
            .cloned()
            .unwrap_or_default()
    }

    /// The row of `table` named `name`.
    pub fn row(&self, table: &str, name: &str) -> Option<Row> {
        self.rows(table)
            .into_iter()
            .find(|r| r.get("name").and_then(Value::as_str) == Some(name))
    }

    /// `external_ids` of the row of `table` named `name`.
    pub fn external_ids(&self, table: &str, name: &str) -> Option<BTreeMap<String, String>> {
        let r = self.row(table, name)?;
        Some(
            parse_map(r.get("external_ids").unwrap_or(&Value::Null))
                .into_iter()
                .collect(),
        )
    }

    /// Names of the committed transactions, in order.
    pub fn committed(&self) -> Vec<&'static str> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.committed)
            .map(|t| t.op)
            .collect()
    }
}

fn atoms(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) if a.first() == Some(&json!("set")) => a
            .get(1)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Value::Null => Vec::new(),
        v => vec![v.clone()],
    }
}

fn pairs(v: &Value) -> Vec<(Value, Value)> {
    v.get(1)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p.get(0)?.clone(), p.get(1)?.clone())))
        .collect()
}

fn is_map(v: &Value) -> bool {
    v.get(0) == Some(&json!("map"))
}

fn resolve(v: &Value, named: &BTreeMap<String, String>) -> Value {
    match v {
        Value::Array(a) if a.len() == 2 && a[0] == json!("named-uuid") => {
            let n = a[1].as_str().unwrap_or_default();
            json!([
                "uuid",
                named.get(n).cloned().unwrap_or_else(|| n.to_owned())
            ])
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| resolve(x, named)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), resolve(x, named)))
                .collect(),
        ),
        v => v.clone(),
    }
}

fn matches(row: &Row, conds: &Value) -> bool {
    conds.as_array().into_iter().flatten().all(|c| {
        let col = c[0].as_str().unwrap_or_default();
        let have = row.get(col).cloned().unwrap_or(Value::Null);
        match c[1].as_str() {
            Some("==") => have == c[2],
            Some("includes") if is_map(&c[2]) => {
                let h = pairs(&have);
                pairs(&c[2]).iter().all(|p| h.contains(p))
            }
            Some("includes") => {
                let h = atoms(&have);
                atoms(&c[2]).iter().all(|a| h.contains(a))
            }
            _ => false,
        }
    })
}

fn project(row: &Row, columns: &Value) -> Row {
    match columns.as_array() {
        Some(cols) => cols
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|c| Some((c.to_owned(), row.get(c)?.clone())))
            .collect(),
        None => row.clone(),
    }
}

fn mutate(have: Option<&Value>, mutator: &str, arg: &Value) -> Value {
    let have = have.cloned().unwrap_or(Value::Null);
    if is_map(&have) || is_map(arg) {
        let mut m = pairs(&have);
        match mutator {
            "insert" => {
                for (k, v) in pairs(arg) {
                    if !m.iter().any(|(hk, _)| *hk == k) {
                        m.push((k, v));
                    }
                }
            }
            "delete" if is_map(arg) => {
                let del = pairs(arg);
                m.retain(|p| !del.contains(p));
            }
            "delete" => {
                let del = atoms(arg);
                m.retain(|(k, _)| !del.contains(k));
            }
            _ => {}
        }
        return json!([
            "map",
            m.into_iter()
                .map(|(k, v)| json!([k, v]))
                .collect::<Vec<_>>()
        ]);
    }
    let mut s = atoms(&have);
    match mutator {
        "insert" => {
            for a in atoms(arg) {
                if !s.contains(&a) {
                    s.push(a);
                }
            }
        }
        "delete" => {
            let del = atoms(arg);
            s.retain(|a| !del.contains(a));
        }
        _ => {}
    }
    json!(["set", s])
}

/// Removes `Bridge`, `Port` and `Interface` rows no other row refers to (RFC 7047 non-root
/// tables), until none is left.
fn collect_garbage(tables: &mut BTreeMap<String, Vec<Row>>) {
    fn refs(v: &Value, out: &mut HashSet<String>) {
        match v {
            Value::Array(a) if a.len() == 2 && a[0] == json!("uuid") => {
                out.extend(a[1].as_str().map(str::to_owned));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            Value::Object(o) => o.values().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    loop {
        let mut live = HashSet::new();
        for rows in tables.values() {
            for r in rows {
                for (k, v) in r {
                    if k != "_uuid" {
                        refs(v, &mut live);
                    }
                }
            }
        }
        let mut removed = false;
        for t in ["Bridge", "Port", "Interface"] {
            if let Some(rows) = tables.get_mut(t) {
                let n = rows.len();
                rows.retain(|r| {
                    r.get("_uuid")
                        .and_then(|u| u.get(1))
                        .and_then(Value::as_str)
                        .is_some_and(|u| live.contains(u))
                });
                removed |= rows.len() != n;
            }
        }
        if !removed {
            return;
        }
    }
}

fn run(db: &mut Db, op: &'static str, ops: &[Value]) -> Result<Vec<Value>, OvsdbError> {
    let mut named = BTreeMap::new();
    let mut out = Vec::new();
    for (index, o) in ops.iter().enumerate() {
        let table = o["table"].as_str().unwrap_or_default().to_owned();
        let fail = |error: &str| OvsdbError::OpFailed {
            op,
            index,
            what: format!("{} {table}", o["op"].as_str().unwrap_or("?")),
            error: error.to_owned(),
            details: "fake".into(),
        };
        let rows = db.tables.entry(table.clone()).or_default();
        match o["op"].as_str() {
            Some("select") => {
                let sel: Vec<Value> = rows
                    .iter()
                    .filter(|r| matches(r, &o["where"]))
                    .map(|r| Value::Object(project(r, &o["columns"])))
                    .collect();
                out.push(json!({ "rows": sel }));
            }
            Some("wait") => {
                let sel: Vec<Value> = rows
                    .iter()
                    .filter(|r| matches(r, &o["where"]))
                    .map(|r| Value::Object(project(r, &o["columns"])))
                    .collect();
                let equal = Value::Array(sel) == o["rows"];
                if equal != (o["until"].as_str() == Some("==")) {
                    return Err(fail("timed out"));
                }
                out.push(json!({}));
            }
            Some("insert") => {
                let _ = rows;
                db.next_uuid += 1;
                let uuid = format!("{:08x}-0000-4000-8000-000000000000", db.next_uuid);
                if let Some(n) = o["uuid-name"].as_str() {
                    named.insert(n.to_owned(), uuid.clone());
                }
                let Value::Object(mut row) = resolve(&o["row"], &named) else {
                    return Err(fail("row is not an object"));
                };
                row.insert("_uuid".into(), json!(["uuid", uuid]));
                if table == "Interface" {
                    let port = match row.get("ofport_request").and_then(Value::as_i64) {
                        Some(p) => p,
                        None => {
                            db.next_ofport += 1;
                            db.next_ofport
                        }
                    };
                    row.insert("ofport".into(), json!(port));
                }
                db.tables.entry(table).or_default().push(row);
                out.push(json!({ "uuid": ["uuid", uuid] }));
            }
            Some("update") => {
                let Value::Object(new) = resolve(&o["row"], &named) else {
                    return Err(fail("row is not an object"));
                };
                let mut count = 0;
                for r in rows.iter_mut().filter(|r| matches(r, &o["where"])) {
                    r.extend(new.clone());
                    count += 1;
                }
                out.push(json!({ "count": count }));
            }
            Some("mutate") => {
                let muts = resolve(&o["mutations"], &named);
                let mut count = 0;
                for r in rows.iter_mut().filter(|r| matches(r, &o["where"])) {
                    for m in muts.as_array().into_iter().flatten() {
                        let col = m[0].as_str().unwrap_or_default().to_owned();
                        let v = mutate(r.get(&col), m[1].as_str().unwrap_or_default(), &m[2]);
                        r.insert(col, v);
                    }
                    count += 1;
                }
                out.push(json!({ "count": count }));
            }
            _ => return Err(fail("not supported by the fake")),
        }
    }
    collect_garbage(&mut db.tables);
    Ok(out)
}

#[async_trait]
impl Ovsdb for FakeOvsdb {
    async fn transact(&self, op: &'static str, ops: Vec<Value>) -> Result<Vec<Value>, OvsdbError> {
        let mut db = self.db.lock().unwrap();
        // All or nothing: work on a copy and keep it only if every operation succeeded.
        let mut work = Db {
            tables: db.tables.clone(),
            next_uuid: db.next_uuid,
            next_ofport: db.next_ofport,
        };
        let r = run(&mut work, op, &ops);
        if r.is_ok() {
            *db = work;
        }
        self.log.lock().unwrap().push(Transaction {
            op,
            ops,
            committed: r.is_ok(),
        });
        r
    }
}

/// One flow in a [`FakeSwitch`]'s table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeFlow {
    /// The add that installed it.
    pub flow: FlowMod,
    /// Packets counted (set by tests).
    pub packets: u64,
    /// Bytes counted (set by tests).
    pub bytes: u64,
}

#[derive(Default)]
struct SwitchState {
    flows: Vec<FakeFlow>,
    groups: BTreeMap<u32, GroupMod>,
    bundles: Vec<(&'static str, Vec<FlowMod>)>,
    connects: u32,
    conn: Option<Arc<FakeConn>>,
}

/// A switch with one flow table shared by every connection it hands out. Bundles apply
/// atomically with OpenFlow's semantics: an add replaces the flow of the same table,
/// priority and match (keeping its counters), a non-strict delete removes every flow whose
/// cookie matches under the mask.
#[derive(Default)]
pub struct FakeSwitch {
    state: Arc<Mutex<SwitchState>>,
}

impl FakeSwitch {
    /// The flows installed now.
    pub fn flows(&self) -> Vec<FakeFlow> {
        self.state.lock().unwrap().flows.clone()
    }

    /// The installed flows whose cookie matches `cookie` under `mask`, in `ovs-ofctl` syntax
    /// (sorted).
    pub fn flows_text(&self, cookie: u64, mask: u64) -> Vec<String> {
        let mut v: Vec<String> = self
            .flows()
            .iter()
            .filter(|f| f.flow.cookie & mask == cookie & mask)
            .map(|f| f.flow.to_ofctl())
            .collect();
        v.sort();
        v
    }

    /// The groups installed now, by id.
    pub fn groups(&self) -> BTreeMap<u32, GroupMod> {
        self.state.lock().unwrap().groups.clone()
    }

    /// Every bundle committed, in order: its name and flow mods.
    pub fn bundles(&self) -> Vec<(&'static str, Vec<FlowMod>)> {
        self.state.lock().unwrap().bundles.clone()
    }

    /// How many connections were opened.
    pub fn connects(&self) -> u32 {
        self.state.lock().unwrap().connects
    }

    /// Sets the counters of every flow whose cookie matches exactly.
    pub fn count(&self, cookie: u64, packets: u64, bytes: u64) {
        for f in self.state.lock().unwrap().flows.iter_mut() {
            if f.flow.cookie == cookie {
                f.packets = packets;
                f.bytes = bytes;
            }
        }
    }

    /// Plays an ovs-vswitchd restart: the open connection breaks and the flows are gone.
    pub fn restart(&self) {
        let mut st = self.state.lock().unwrap();
        st.flows.clear();
        st.groups.clear();
        if let Some(c) = st.conn.take() {
            c.closed.store(true, Ordering::Release);
        }
    }
}

/// A connection of a [`FakeSwitch`].
pub struct FakeConn {
    state: Arc<Mutex<SwitchState>>,
    closed: AtomicBool,
}

fn apply(flows: &mut Vec<FakeFlow>, m: &FlowMod) {
    match m.command {
        FlowModCommand::Add => {
            let same = |f: &FakeFlow| {
                f.flow.table == m.table
                    && f.flow.priority == m.priority
                    && f.flow.matches == m.matches
            };
            match flows.iter_mut().find(|f| same(f)) {
                Some(f) => f.flow = m.clone(),
                None => flows.push(FakeFlow {
                    flow: m.clone(),
                    packets: 0,
                    bytes: 0,
                }),
            }
        }
        FlowModCommand::Delete => flows.retain(|f| {
            let table = m.table == TABLE_ALL || f.flow.table == m.table;
            !(table && f.flow.cookie & m.cookie_mask == m.cookie & m.cookie_mask)
        }),
        FlowModCommand::DeleteStrict => flows.retain(|f| {
            !(f.flow.table == m.table
                && f.flow.priority == m.priority
                && f.flow.matches == m.matches
                && f.flow.cookie & m.cookie_mask == m.cookie & m.cookie_mask)
        }),
    }
}

/// Applies a group-mod with OpenFlow's semantics: deleting a group deletes the flows that
/// refer to it; adding an existing id is refused.
fn apply_group(st: &mut SwitchState, g: &GroupMod) -> Result<(), String> {
    match g.command {
        GroupModCommand::Add => {
            if st.groups.contains_key(&g.group_id) {
                return Err(format!("group {} exists", g.group_id));
            }
            st.groups.insert(g.group_id, g.clone());
        }
        GroupModCommand::Delete => {
            let gone: Vec<u32> = if g.group_id == GROUP_ALL {
                std::mem::take(&mut st.groups).into_keys().collect()
            } else {
                st.groups
                    .remove(&g.group_id)
                    .map(|_| g.group_id)
                    .into_iter()
                    .collect()
            };
            st.flows.retain(|f| {
                !f.flow.instructions.iter().any(|i| match i {
                    Instruction::ApplyActions(a) => {
                        GroupMod::referenced(a).any(|id| gone.contains(&id))
                    }
                    _ => false,
                })
            });
        }
    }
    Ok(())
}

#[async_trait]
impl OpenFlow for FakeConn {
    async fn bundle_msgs(&self, op: &'static str, msgs: &[BundleMsg]) -> Result<(), ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed { op });
        }
        if msgs.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap();
        // All or nothing: work on a copy.
        let mut next = SwitchState {
            flows: st.flows.clone(),
            groups: st.groups.clone(),
            ..Default::default()
        };
        for m in msgs {
            match m {
                BundleMsg::Flow(f) => {
                    let missing = f.instructions.iter().find_map(|i| match i {
                        Instruction::ApplyActions(a) => {
                            GroupMod::referenced(a).find(|g| !next.groups.contains_key(g))
                        }
                        _ => None,
                    });
                    assert!(
                        missing.is_none(),
                        "{op}: flow refers to missing group {missing:?}: {}",
                        f.to_ofctl()
                    );
                    apply(&mut next.flows, f);
                }
                BundleMsg::Group(g) => {
                    if let Err(e) = apply_group(&mut next, g) {
                        panic!("{op}: {e}");
                    }
                }
            }
        }
        st.flows = next.flows;
        st.groups = next.groups;
        let flows = msgs
            .iter()
            .filter_map(|m| match m {
                BundleMsg::Flow(f) => Some(f.clone()),
                BundleMsg::Group(_) => None,
            })
            .collect();
        st.bundles.push((op, flows));
        Ok(())
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    async fn echo(&self) -> Result<(), ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed { op: "echo" });
        }
        Ok(())
    }
    async fn bundle(&self, op: &'static str, mods: &[FlowMod]) -> Result<(), ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed { op });
        }
        if mods.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap();
        for m in mods {
            apply(&mut st.flows, m);
        }
        st.bundles.push((op, mods.to_vec()));
        Ok(())
    }
    async fn dump_flows(
        &self,
        table: u8,
        cookie: u64,
        mask: u64,
    ) -> Result<Vec<FlowStats>, ConnError> {
        if self.is_closed() {
            return Err(ConnError::Closed { op: "dump flows" });
        }
        let st = self.state.lock().unwrap();
        Ok(st
            .flows
            .iter()
            .filter(|f| table == TABLE_ALL || f.flow.table == table)
            .filter(|f| f.flow.cookie & mask == cookie & mask)
            .map(|f| FlowStats {
                table: f.flow.table,
                priority: f.flow.priority,
                cookie: f.flow.cookie,
                packets: f.packets,
                bytes: f.bytes,
                matches: f.flow.matches.to_ofctl(),
                actions: f
                    .flow
                    .to_ofctl()
                    .split(",actions=")
                    .nth(1)
                    .unwrap_or("drop")
                    .to_owned(),
            })
            .collect())
    }
}

#[async_trait]
impl OpenFlowConnector for FakeSwitch {
    async fn connect(&self) -> Result<Arc<dyn OpenFlow>, ConnError> {
        let c = Arc::new(FakeConn {
            state: self.state.clone(),
            closed: AtomicBool::new(false),
        });
        let mut st = self.state.lock().unwrap();
        st.connects += 1;
        st.conn = Some(c.clone());
        Ok(c)
    }
}

/// The node's kernel for the OVS backend, recorded.
#[derive(Default)]
pub struct FakeHost {
    /// Every gateway configuration: (gateway, prefix, TX checksum off).
    pub gateway: Mutex<Vec<(Ipv4Addr, u8, bool)>>,
    /// Pod ports isolated from the node's stack, in order.
    pub isolated: Mutex<Vec<String>>,
    /// The last set of node routes synced.
    pub routes: Mutex<Vec<NodeRoute>>,
    /// Addresses probed.
    pub probed: Mutex<Vec<Ipv4Addr>>,
}

#[async_trait]
impl NodeKernel for FakeHost {
    async fn configure_gateway(
        &self,
        node: &NodeNetwork,
        tx_checksum_off: bool,
    ) -> Result<(), DataplaneError> {
        self.gateway
            .lock()
            .unwrap()
            .push((node.gateway, node.pod_cidr.prefix(), tx_checksum_off));
        Ok(())
    }
    fn ifindex(&self, name: &str) -> Result<u32, nix::errno::Errno> {
        match name {
            crate::dataplane::GATEWAY_IFNAME => Ok(3),
            _ => Err(nix::errno::Errno::ENODEV),
        }
    }
    fn isolate_port(&self, ifname: &str) -> Result<(), SysctlError> {
        self.isolated.lock().unwrap().push(ifname.to_owned());
        Ok(())
    }
    async fn sync_routes(&self, want: &[NodeRoute]) -> Result<usize, DataplaneError> {
        let mut r = self.routes.lock().unwrap();
        let removed = r
            .iter()
            .filter(|o| !want.iter().any(|w| w.dst == o.dst))
            .count();
        *r = want.to_vec();
        Ok(removed)
    }
    fn resolve_neighbours(&self, ips: &[Ipv4Addr]) {
        self.probed.lock().unwrap().extend_from_slice(ips);
    }
}
