//! A recording fake of [`Nftables`].

use std::sync::Mutex;

use async_trait::async_trait;

use crate::kernel::nftables::{NatError, Nftables};

/// Records every script loaded; fails the next `fail` loads with `Rejected`.
#[derive(Default)]
pub struct FakeNftables {
    /// Every script loaded, in order (failed loads are not recorded).
    pub loaded: Mutex<Vec<String>>,
    /// How many of the next loads fail.
    pub fail: Mutex<u32>,
}

impl FakeNftables {
    /// The last script loaded.
    pub fn last(&self) -> Option<String> {
        self.loaded.lock().unwrap().last().cloned()
    }
}

#[async_trait]
impl Nftables for FakeNftables {
    async fn load(&self, table: &str, script: &str) -> Result<(), NatError> {
        let mut f = self.fail.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(NatError::Rejected {
                table: table.to_owned(),
                stderr: "fake: rejected on purpose".into(),
            });
        }
        self.loaded.lock().unwrap().push(script.to_owned());
        Ok(())
    }
}
