//! Keeping the agent's resident memory to what it uses (issue: the agent's footprint).
//!
//! glibc's allocator keeps memory that was freed in its arenas (one per thread that allocated,
//! up to eight per core) rather than giving it back to the kernel, and raises its own
//! thresholds after large frees, so a burst of allocations at start (loading and pinning the
//! eBPF programs, the first full pass of every controller) stays resident for the life of the
//! process. Two settings bound that: at most [`ARENAS`] arenas, set before any thread starts,
//! and `malloc_trim(0)` once the agent has settled (two and ten seconds after it is ready)
//! and then every [`TRIM_EVERY`], which hands every free page of every arena back. A trim
//! costs well under a millisecond on an idle agent.
//!
//! No crate wraps these two calls for the system allocator (allocator crates replace it
//! instead), so they are made here through `libc`. On other C libraries they do nothing.

use std::time::Duration;

/// The arenas glibc may create: one for the main thread and one shared by the runtime's
/// threads is enough for an agent whose work is mostly waiting.
pub const ARENAS: i32 = 2;

/// How often free heap memory is handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Limits the allocator's arenas ([`ARENAS`]). Call first in `main`, before any thread.
#[cfg_attr(
    all(target_os = "linux", target_env = "gnu"),
    expect(
        unsafe_code,
        reason = "mallopt(3) has no safe wrapper in the crates used"
    )
)]
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Hands the allocator's free pages back to the kernel; returns whether any were.
#[cfg_attr(
    all(target_os = "linux", target_env = "gnu"),
    expect(
        unsafe_code,
        reason = "malloc_trim(3) has no safe wrapper in the crates used"
    )
)]
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it locks each arena in turn).
    unsafe {
        libc::malloc_trim(0) != 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Trims `first` after it is called (the agent's first passes done), again at ten seconds
/// (late starters: the source's first full sync, the membership's first rounds), then every
/// [`TRIM_EVERY`]. Runs until the task is dropped.
pub async fn trim_periodically(first: Duration) {
    tokio::time::sleep(first).await;
    let mut next = Duration::from_secs(10).saturating_sub(first);
    loop {
        let released = trim();
        tracing::debug!(released, "free heap memory handed back");
        tokio::time::sleep(next).await;
        next = TRIM_EVERY;
    }
}
