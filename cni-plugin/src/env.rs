//! The `CNI_*` environment a runtime sets before it executes the plugin.
//!
//! Which variables each command needs follows the CNI spec 1.1 ("Parameters") and libcni's `skel`
//! package: an empty variable counts as missing, the container ID and the interface name are
//! checked for the characters the spec allows, and `CNI_ARGS` and `CNI_PATH` are optional here
//! because the plugin delegates to no other plugin.

use crate::error::CniError;

/// The CNI verb in `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach a container; idempotent.
    Del,
    /// Check that an attachment is still as ADD left it (cniVersion >= 0.4.0).
    Check,
    /// Is the plugin ready to serve ADD (cniVersion >= 1.1.0)?
    Status,
    /// Remove everything that no attachment in `cni.dev/valid-attachments` owns (cniVersion >= 1.1.0).
    Gc,
    /// Report the supported versions; answered locally.
    Version,
}

impl Command {
    /// Parses the value of `CNI_COMMAND`.
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND: {other:?}"
                )));
            }
        })
    }

    /// The verb as the runtime spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// The oldest configuration `cniVersion` in which the spec defines this verb.
    pub fn min_version(self) -> &'static str {
        match self {
            Self::Add | Self::Del | Self::Version => "0.3.0",
            Self::Check => "0.4.0",
            Self::Status | Self::Gc => "1.1.0",
        }
    }

    /// Variables this verb cannot do without.
    fn required(self) -> &'static [&'static str] {
        match self {
            Self::Add | Self::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            Self::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Self::Status | Self::Gc | Self::Version => &[],
        }
    }
}

/// The `CNI_*` variables, validated for one command. Unset optional variables are empty strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: a path such as `/run/netns/x` or `/proc/<pid>/ns/net`.
    pub netns: String,
    /// `CNI_IFNAME`: the interface to create inside the container.
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K=V`, passed to the agent unparsed.
    pub args: String,
    /// `CNI_PATH`: where the runtime looks for plugins.
    pub path: String,
}

impl CniEnv {
    /// Reads the variables through `get` (`std::env::var` in the binary, a map in tests) and
    /// checks that the command has what it needs (code 4, `INVALID_ENVIRONMENT_VARIABLES`,
    /// naming the variable, if not).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        // The spec treats an empty variable like an unset one (as libcni's skel does).
        let var = |name: &str| get(name).filter(|v| !v.is_empty()).unwrap_or_default();
        let command = var("CNI_COMMAND");
        if command.is_empty() {
            return Err(CniError::invalid_env(
                "required environment variable CNI_COMMAND is not set",
            ));
        }
        let command = Command::parse(&command)?;
        let env = Self {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        };
        for name in command.required() {
            let value = match *name {
                "CNI_CONTAINERID" => &env.container_id,
                "CNI_NETNS" => &env.netns,
                _ => &env.ifname,
            };
            if value.is_empty() {
                return Err(CniError::invalid_env(format!(
                    "required environment variable {name} is not set for {}",
                    command.as_str()
                )));
            }
        }
        // Only the verbs that act on one attachment check the identifiers' syntax (as skel does);
        // every such verb requires both, so both are set here.
        if !command.required().is_empty() {
            validate_container_id(&env.container_id)?;
            validate_ifname(&env.ifname)?;
        }
        Ok(env)
    }

    /// Reads the process environment.
    pub fn from_process() -> Result<Self, CniError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }
}

/// The spec: "MUST have at least one character, start with an alphanumeric character, and only
/// contain alphanumeric characters, underscores, periods and hyphens".
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(CniError::invalid_env(format!(
            "invalid characters in CNI_CONTAINERID {id:?}"
        )));
    }
    Ok(())
}

/// What Linux accepts as an interface name (the kernel's `dev_valid_name`): 1-15 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if bad {
        return Err(CniError::invalid_env(format!(
            "invalid CNI_IFNAME {name:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| map.get(k).cloned())
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/p1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAME=p"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn with_cmd(cmd: &'static str, drop: &str) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = FULL.iter().copied().filter(|(k, _)| *k != drop).collect();
        v.push(("CNI_COMMAND", cmd));
        v
    }

    #[test]
    fn add_reads_every_variable() {
        let e = env(&with_cmd("ADD", "")).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns, "/run/netns/p1");
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.args, "K8S_POD_NAME=p");
        assert_eq!(e.path, "/opt/cni/bin");
    }

    #[test]
    fn missing_command_or_unknown_command_is_code_4() {
        let e = env(&[]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        let e = env(&[("CNI_COMMAND", "FROB")]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("FROB"));
    }

    #[test]
    fn each_command_names_the_missing_variable() {
        for (cmd, var) in [
            ("ADD", "CNI_CONTAINERID"),
            ("ADD", "CNI_NETNS"),
            ("ADD", "CNI_IFNAME"),
            ("CHECK", "CNI_CONTAINERID"),
            ("CHECK", "CNI_NETNS"),
            ("CHECK", "CNI_IFNAME"),
            ("DEL", "CNI_CONTAINERID"),
            ("DEL", "CNI_IFNAME"),
        ] {
            let e = env(&with_cmd(cmd, var)).unwrap_err();
            assert_eq!(e.code, 4, "{cmd} without {var}");
            assert!(e.msg.contains(var), "{cmd} without {var}: {}", e.msg);
        }
    }

    #[test]
    fn del_status_gc_version_need_less() {
        assert!(env(&with_cmd("DEL", "CNI_NETNS")).is_ok());
        for cmd in ["STATUS", "GC", "VERSION"] {
            assert!(env(&[("CNI_COMMAND", cmd)]).is_ok(), "{cmd}");
            // Identifiers these verbs do not use are not validated either.
            assert!(
                env(&[("CNI_COMMAND", cmd), ("CNI_IFNAME", "a/b")]).is_ok(),
                "{cmd}"
            );
        }
    }

    #[test]
    fn empty_counts_as_missing() {
        let mut v = with_cmd("ADD", "CNI_NETNS");
        v.push(("CNI_NETNS", ""));
        assert_eq!(env(&v).unwrap_err().code, 4);
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        for id in ["-abc", "a/b", "a b", "_x"] {
            let mut v = with_cmd("ADD", "CNI_CONTAINERID");
            v.push(("CNI_CONTAINERID", id));
            assert_eq!(env(&v).unwrap_err().code, 4, "{id}");
        }
        for name in ["a/b", "eth:0", "..", "sixteen-chars-xx", "e th0"] {
            let mut v = with_cmd("ADD", "CNI_IFNAME");
            v.push(("CNI_IFNAME", name));
            assert_eq!(env(&v).unwrap_err().code, 4, "{name}");
        }
        let mut v = with_cmd("ADD", "CNI_CONTAINERID");
        v.push(("CNI_CONTAINERID", "a1_b.c-d"));
        assert!(env(&v).is_ok());
    }
}
