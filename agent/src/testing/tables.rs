//! A recording fake of [`TableRoutes`]: routes with their protocol, in any table.

use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::netlink::NetlinkError;
use crate::kernel::tables::{TableRoute, TableRoutes};

use super::events::EventLog;

/// Routes as (protocol, route). `replace` replaces the route to the same destination in the
/// same table (as the kernel's `NLM_F_REPLACE`). Logs `route replace <route>` and
/// `route del <route>`.
#[derive(Default)]
pub struct FakeTableRoutes {
    /// The routes.
    pub routes: Mutex<Vec<(u8, TableRoute)>>,
    /// The shared log.
    pub log: EventLog,
    /// How many of the next mutating calls fail with `EIO`.
    pub fail: Mutex<u32>,
}

impl FakeTableRoutes {
    /// No routes yet, logging into `log`.
    pub fn new(log: EventLog) -> Self {
        Self {
            log,
            ..Self::default()
        }
    }

    /// Adds a route without logging (what an earlier process or something else left).
    pub fn seed(&self, protocol: u8, route: TableRoute) {
        self.routes.lock().unwrap().push((protocol, route));
    }

    /// The routes of `table`, any protocol.
    pub fn in_table(&self, table: u32) -> Vec<TableRoute> {
        self.routes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.table == table)
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn failing(&self, op: &'static str, r: &TableRoute) -> Result<(), NetlinkError> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(NetlinkError::errno(op, r.to_string(), libc::EIO));
        }
        Ok(())
    }
}

#[async_trait]
impl TableRoutes for FakeTableRoutes {
    async fn list(&self, protocol: u8) -> Result<Vec<TableRoute>, NetlinkError> {
        Ok(self
            .routes
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == protocol)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn replace(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError> {
        self.failing("adding route", route)?;
        let mut rs = self.routes.lock().unwrap();
        rs.retain(|(_, r)| !(r.table == route.table && r.dst == route.dst));
        rs.push((protocol, route.clone()));
        self.log.push(format!("route replace {route}"));
        Ok(())
    }

    async fn delete(&self, protocol: u8, route: &TableRoute) -> Result<(), NetlinkError> {
        self.failing("removing route", route)?;
        let mut rs = self.routes.lock().unwrap();
        if let Some(i) = rs
            .iter()
            .position(|(p, r)| *p == protocol && r.key() == route.key())
        {
            rs.remove(i);
            self.log.push(format!("route del {route}"));
        }
        Ok(())
    }
}
