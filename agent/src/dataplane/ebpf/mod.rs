//! eBPF backend (being written).
