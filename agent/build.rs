//! Builds ferrea's kernel-side programs (`../ebpf`) into one BPF object the agent embeds.
//!
//! The recipe (it needs neither nightly nor rust-src, and bpf-linker must be built against the
//! same LLVM as the rustc that compiles the bitcode: `scripts/setup.sh` does that): the `ebpf`
//! crate is compiled for the *host* target as a staticlib of LLVM bitcode (`-C linker-plugin-lto`), with
//! `panic = "abort"` from its own profile, and `bpf-linker` links that bitcode for `bpfel` with
//! BTF, keeping only the program and map symbols. No nightly and no rust-src are needed.
//!
//! The nested cargo gets a clean environment: the outer build's RUSTFLAGS, wrappers (clippy,
//! sccache) and target dir must not leak into a build whose output is BPF bitcode.
//!
//! Two objects come out of the one staticlib, each keeping only its own symbols: `ferrea.bpf.o`,
//! the dataplane (pod and tunnel programs, pinned maps), and `ferrea-vlan.bpf.o`, the VLAN
//! tagger (`agent/src/vlan.rs`) with its unpinned maps. The tagger is separate so that loading
//! it never creates or pins the dataplane's maps.
//!
//! `FERREA_BPF_OBJECT=<path>` skips the build and embeds a prebuilt object instead (for machines
//! without bpf-linker, e.g. a docs or lint-only CI job).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("agent has no parent directory")?;
    let ebpf_dir = root.join("ebpf");
    let common_dir = root.join("common");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("ferrea.bpf.o");
    let vlan_object = out_dir.join("ferrea-vlan.bpf.o");

    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-env-changed=FERREA_BPF_OBJECT");
    println!("cargo:rerun-if-env-changed=FERREA_VLAN_BPF_OBJECT");
    println!("cargo:rerun-if-env-changed=BPF_LINKER");

    if let Some(prebuilt) = env::var_os("FERREA_BPF_OBJECT") {
        // The tagger's object comes with it: FERREA_VLAN_BPF_OBJECT, else next to it.
        let vlan_prebuilt = env::var_os("FERREA_VLAN_BPF_OBJECT")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&prebuilt).with_file_name("ferrea-vlan.bpf.o"));
        for (from, to, var) in [
            (Path::new(&prebuilt), &object, "FERREA_BPF_OBJECT"),
            (
                vlan_prebuilt.as_path(),
                &vlan_object,
                "FERREA_VLAN_BPF_OBJECT",
            ),
        ] {
            std::fs::copy(from, to).with_context(|| format!("copying {var}={}", from.display()))?;
        }
        return Ok(());
    }

    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(ebpf_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Whatever the outer build was told must not reach the bitcode build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_LTO",
        "CARGO_PROFILE_RELEASE_CODEGEN_UNITS",
    ] {
        cmd.env_remove(var);
    }
    // Cargo exports these to build scripts; a nested cargo would read some of them as its own
    // configuration (CARGO_CFG_*, CARGO_FEATURE_*, TARGET...), so drop them all.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_CFG_") || k.starts_with("CARGO_FEATURE_") || k.starts_with("DEP_") {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env(
        "RUSTFLAGS",
        "-C linker-plugin-lto -C debuginfo=2 -C force-unwind-tables=no",
    );
    let status = cmd.status().context("running cargo for the ebpf crate")?;
    if !status.success() {
        bail!("building the ebpf crate failed ({status})");
    }

    let staticlib = target_dir.join("release").join("libferrea_ebpf.a");
    let exports = [
        ferrea_common::PROG_FROM_POD,
        ferrea_common::PROG_TO_POD,
        ferrea_common::PROG_TO_TUNNEL,
        ferrea_common::PROG_FROM_TUNNEL,
        ferrea_common::MAP_REMOTE_NODES,
        ferrea_common::MAP_ENDPOINTS_BY_IFINDEX,
        ferrea_common::MAP_ENDPOINTS_BY_IP,
        ferrea_common::MAP_COUNTERS,
        ferrea_common::MAP_EGRESS_STEER,
        ferrea_common::MAP_EGRESS_EXEMPT,
        ferrea_common::MAP_EGRESS_HELD,
        ferrea_common::MAP_STACK_FLOWS,
        ferrea_common::MAP_SVC_COUNTERS,
        ferrea_common::MAP_LB_SERVICES,
        ferrea_common::MAP_LB_FLOWS,
        ferrea_common::MAP_LB_AFFINITY,
        ferrea_common::MAP_LB_COUNTERS,
        ferrea_common::MAP_TRACE,
    ];
    link(&staticlib, &exports, &object)?;
    let vlan_exports = [
        ferrea_common::PROG_VLAN_RX,
        ferrea_common::PROG_VLAN_TX,
        ferrea_common::MAP_VLAN_BY_PARENT,
        ferrea_common::MAP_VLAN_BY_CHILD,
    ];
    link(&staticlib, &vlan_exports, &vlan_object)
}

/// Links the bitcode into a BPF object keeping only `exports` (and what they use).
fn link(staticlib: &Path, exports: &[&str], object: &Path) -> anyhow::Result<()> {
    let linker = env::var_os("BPF_LINKER").unwrap_or_else(|| "bpf-linker".into());
    let status = Command::new(&linker)
        .args(["--target", "bpfel", "--btf", "--export"])
        .arg(exports.join(","))
        .arg("-o")
        .arg(object)
        .arg(staticlib)
        .status()
        .with_context(|| {
            format!(
                "running {} (install it with scripts/setup.sh, or set FERREA_BPF_OBJECT)",
                Path::new(&linker).display()
            )
        })?;
    if !status.success() {
        bail!("bpf-linker failed for {} ({status})", object.display());
    }
    Ok(())
}
