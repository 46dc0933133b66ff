//! `ferrea-cni`: the CNI plugin binary a container runtime executes (CNI spec 1.1).
//!
//! The binary is deliberately thin. It reads the `CNI_*` environment ([`env`]) and the network
//! configuration on stdin ([`config`]), answers VERSION itself, and forwards ADD, DEL, CHECK,
//! STATUS and GC to `ferrea-agent` over gRPC on a unix socket ([`client`]). The agent does all the
//! work and answers in the CNI 1.1.0 result format, which [`result`] rewrites for older
//! configuration versions. Failures print the spec's error JSON ([`error`]) and exit 1.
//!
//! What this crate must never do: write anything but the CNI result or error to stdout (the runtime
//! parses it), touch the network itself, or start threads it does not need (it sits on the pod start
//! path: a current-thread runtime is built only when the agent must be called).

pub mod client;
pub mod config;
pub mod env;
pub mod error;
pub mod result;

use std::io::{Read, Write};
use std::process::ExitCode;

use ferrea_proto::cni::v1::CniRequest;
use serde_json::{Value, json};

use crate::client::Timeouts;
use crate::config::{CURRENT_VERSION, SUPPORTED_VERSIONS};
use crate::env::{CniEnv, Command};
use crate::error::CniError;

/// What one invocation prints on stdout and whether it succeeded (exit 0) or not (exit 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The JSON document for stdout, if any (DEL, CHECK, STATUS and GC print nothing on success).
    pub stdout: Option<Value>,
    /// Whether the operation succeeded.
    pub success: bool,
}

/// Runs one CNI invocation with the variables from `get` and the bytes of stdin.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8], timeouts: Timeouts) -> Output {
    // Errors are written in the configuration's version when it names one we support, else in
    // ours (for instance when the version itself is the problem).
    let reply_version = config::peek_version(stdin).unwrap_or_else(|| CURRENT_VERSION.to_owned());
    match execute(get, stdin, timeouts) {
        Ok(stdout) => Output {
            stdout,
            success: true,
        },
        Err(e) => {
            debug(format_args!(
                "failed: code {} msg {:?} details {:?}",
                e.code, e.msg, e.details
            ));
            Output {
                stdout: Some(e.to_json(&reply_version)),
                success: false,
            }
        }
    }
}

/// The process entry point: reads the real environment and stdin, prints, returns the exit code.
pub fn run_process() -> ExitCode {
    let mut stdin = Vec::new();
    // One byte more than the limit is enough to tell an oversized configuration; the rest is
    // never read into memory.
    let limit = ferrea_proto::cni::MAX_NETWORK_CONFIG_BYTES as u64 + 1;
    let out = match std::io::stdin().take(limit).read_to_end(&mut stdin) {
        Ok(_) => run(|k| std::env::var(k).ok(), &stdin, Timeouts::default()),
        Err(e) => Output {
            stdout: Some(
                CniError::io("reading the network configuration from stdin")
                    .with_details(e.to_string())
                    .to_json(CURRENT_VERSION),
            ),
            success: false,
        },
    };
    if let Some(doc) = &out.stdout {
        // Nothing useful can be done if stdout is gone; the exit code still tells the runtime.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{doc}").and_then(|()| stdout.flush());
    }
    if out.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The VERSION answer: our versions, in the configuration's version when it names a supported one.
pub fn version_info(stdin: &[u8]) -> Value {
    let version = config::peek_version(stdin).unwrap_or_else(|| CURRENT_VERSION.to_owned());
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

fn execute(
    get: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    timeouts: Timeouts,
) -> Result<Option<Value>, CniError> {
    let env = CniEnv::from_lookup(get)?;
    debug(format_args!(
        "command={} container_id={} netns={} ifname={}",
        env.command.as_str(),
        env.container_id,
        env.netns,
        env.ifname
    ));
    if env.command == Command::Version {
        return Ok(Some(version_info(stdin)));
    }
    let max = ferrea_proto::cni::MAX_NETWORK_CONFIG_BYTES;
    if stdin.len() > max {
        return Err(CniError::invalid_config(format!(
            "the network configuration on stdin is larger than {max} bytes (1 MiB), the most ferrea-cni forwards"
        )));
    }
    let conf = config::parse(stdin)?;
    // CHECK exists since 0.4.0, STATUS and GC since 1.1.0 (libcni's skel refuses them likewise).
    if !config::version_at_least(&conf.cni_version, env.command.min_version()) {
        return Err(CniError::incompatible_version(format!(
            "config version {} does not allow {} (needs {} or later)",
            conf.cni_version,
            env.command.as_str(),
            env.command.min_version()
        )));
    }
    let req = CniRequest {
        container_id: env.container_id,
        netns: env.netns,
        ifname: env.ifname,
        args: env.args,
        path: env.path,
        network_config: stdin.to_vec(),
    };
    // Single-threaded and built only here: VERSION and config errors never pay for a runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| CniError::io("starting the async runtime").with_details(e.to_string()))?;
    let result = rt.block_on(client::forward(
        &conf.agent_socket,
        env.command,
        req,
        timeouts,
    ))?;
    match env.command {
        Command::Add => {
            if result.is_empty() {
                return Err(CniError::internal(
                    "ferrea-agent returned an empty ADD result",
                ));
            }
            result::convert(&result, &conf.cni_version).map(Some)
        }
        // CHECK reports success by exiting 0 with no output (spec 1.1, "CHECK").
        _ => Ok(None),
    }
}

/// Writes a debug line to stderr when `FERREA_CNI_DEBUG=1`; stdout belongs to the CNI result.
fn debug(args: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("FERREA_CNI_DEBUG").is_ok_and(|v| v == "1")) {
        eprintln!("ferrea-cni: {args}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> Output {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        run(
            |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            stdin.as_bytes(),
            Timeouts::default(),
        )
    }

    #[test]
    fn version_uses_the_config_version_when_supported() {
        let out = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
        assert!(out.success);
        assert_eq!(out.stdout.unwrap()["cniVersion"], "0.4.0");
        for stdin in ["", "junk", r#"{"cniVersion":"0.2.0"}"#] {
            let out = run_with(&[("CNI_COMMAND", "VERSION")], stdin);
            assert_eq!(
                out.stdout.unwrap(),
                json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
            );
        }
    }

    #[test]
    fn errors_use_the_config_version() {
        let out = run_with(
            &[("CNI_COMMAND", "ADD")],
            r#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#,
        );
        assert!(!out.success);
        let doc = out.stdout.unwrap();
        assert_eq!(doc["cniVersion"], "0.3.1");
        assert_eq!(doc["code"], 4);
    }

    #[test]
    fn an_oversized_configuration_is_code_7() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let pad = " ".repeat(ferrea_proto::cni::MAX_NETWORK_CONFIG_BYTES);
        let out = run_with(
            &vars,
            &format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"t"}}{pad}"#),
        );
        assert!(!out.success);
        let doc = out.stdout.unwrap();
        assert_eq!(doc["code"], 7);
        assert_eq!(doc["cniVersion"], "1.1.0");
        assert!(
            doc["msg"].as_str().unwrap().contains("1048576 bytes"),
            "{doc}"
        );
    }

    #[test]
    fn verbs_newer_than_the_config_are_refused() {
        let base = [
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        for (cmd, ver) in [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "0.4.0")] {
            let mut vars = base.to_vec();
            vars.push(("CNI_COMMAND", cmd));
            let out = run_with(
                &vars,
                &format!(r#"{{"cniVersion":"{ver}","name":"n","type":"t"}}"#),
            );
            let doc = out.stdout.unwrap();
            assert_eq!(doc["code"], 1, "{cmd} {ver}");
            assert!(doc["msg"].as_str().unwrap().contains(cmd));
        }
    }
}
