//! faultvisor's campaign engine, as a library: what a fault-injection campaign needs
//! besides running VMs.
//!
//! - [`run`]: the campaign file format and the runner (each run one `faultvisor run`
//!   process, its fault plan driven through the control API), `merge` of shards;
//! - [`sweep`]: parameter lists and ranges expanded into the cross product of runs,
//!   each with a stable run ID;
//! - [`outcome`]: the facts a run's console yields ([`outcome::Watcher`], fed as the
//!   console arrives, so that "no progress for T seconds" and the first guest reaction
//!   are timed), and their classification against the configuration's fault-free
//!   golden run: masked, detected, recovered, degraded, hang, crash or silent data
//!   corruption;
//! - [`stats`]: outcome rates with Wilson 95 % confidence intervals, latency
//!   percentiles;
//! - [`report`]: the per-configuration outcome tables (Markdown) and JUnit XML;
//! - [`html`]: the self-contained HTML report with its plots.
//!
//! Classification happens when the report is written, from the recorded facts of every
//! run: a sharded campaign merged afterwards gets exactly the report of an unsharded
//! one. `faultvisor campaign` (the `cli` crate) is a thin command line over it.

pub mod html;
pub mod outcome;
pub mod report;
pub mod run;
pub mod stats;
pub mod sweep;
