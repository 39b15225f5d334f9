//! Anchorage's end-to-end tests and benchmarks live in `tests/` and `benches/` of this package;
//! the harness they use (the simulated fleet, the real-binary helpers, the Prometheus parser)
//! is the `anchorage-sim` crate.
