//! `ferrea-cni`: executed by the container runtime per the CNI spec; see the library for the logic.

fn main() -> std::process::ExitCode {
    ferrea_cni::run_process()
}
