//! One module per command, as antctl and youki lay them out. Each turns the agent's answer
//! into JSON values and prints them through [`crate::output`].

pub mod agentinfo;
pub mod completion;
pub mod dump;
pub mod egress;
pub mod egressnode;
pub mod loglevel;
pub mod nodeportlocal;
pub mod podinterface;
pub mod remotenodes;
pub mod supportbundle;
pub mod trace;
