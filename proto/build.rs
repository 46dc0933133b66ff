//! Compiles the .proto files with protox (pure Rust, so no `protoc` is needed) and generates
//! the tonic client and server.
fn main() -> anyhow::Result<()> {
    let files = ["ferrea/cni/v1/cni.proto", "ferrea/debug/v1/debug.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
