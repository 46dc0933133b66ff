//! ferrea's gRPC contracts. Each package carries its version in its name.
#![allow(missing_docs)]

/// `ferrea.cni.v1`: the CNI binary to agent contract.
pub mod cni {
    /// Version 1 of the CNI service.
    pub mod v1 {
        tonic::include_proto!("ferrea.cni.v1");
    }
}
