//! `faultvisor campaign` and `faultvisor merge`: the command line over the campaign
//! engine (the `campaign` crate, which holds the file format, the runner and the
//! reports).

use std::path::PathBuf;

use clap::Args;

use crate::CliError;

pub use ::campaign::run::{check_text, MAX_RUNS};

pub(crate) const CAMPAIGN_EXAMPLES: &str = "\
Examples:
  faultvisor campaign resources/campaigns/probe.toml --jobs 2 --out /tmp/probe-campaign
  faultvisor campaign campaign.toml --shard 0/4 --out shard0     # slice 0 of 4
  faultvisor merge --out all shard0 shard1 shard2 shard3

Exit status: 0 when every expectation held, 1 when one failed (the report shows which),
2 when the campaign file or the options are wrong (the message names line and field).";

/// Arguments of `faultvisor campaign`.
#[derive(Debug, Args, Clone)]
pub struct CampaignArgs {
    /// The campaign file (TOML).
    pub file: PathBuf,
    /// Experiments run at once (default: the number of host CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Output directory (results.jsonl, report.md, one directory per experiment).
    #[arg(long, default_value = "campaign-out")]
    pub out: PathBuf,
    /// Run only slice I of N (0-based), e.g. 2/8: experiments whose index % N == I.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Seed for the random values ("rand:LO..HI"); overrides the file's.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Replay one run by its ID (the `run` field of results.jsonl), with its
    /// configuration's golden run so that its outcome can be classified.
    #[arg(long, value_name = "RUN-ID")]
    pub only: Option<String>,
    /// Runs per sweep point for every experiment (1 to 1000), instead of each
    /// experiment's `repeat`: a quick smoke run with 1, narrower intervals with more.
    /// Golden runs stay one per configuration.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(::campaign::run::MAX_REPEAT)))]
    pub repeat: Option<u32>,
}

/// Arguments of `faultvisor merge`.
#[derive(Debug, Args, Clone)]
pub struct MergeArgs {
    /// Where to write the merged results.jsonl and report.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Output directories of the shards.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

/// `faultvisor campaign`.
pub fn run(a: &CampaignArgs) -> Result<i32, CliError> {
    let vmm = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultvisor"));
    Ok(::campaign::run::run(&::campaign::run::RunOptions {
        file: a.file.clone(),
        jobs: a.jobs,
        out: a.out.clone(),
        shard: a.shard.clone(),
        seed: a.seed,
        only: a.only.clone(),
        repeat: a.repeat,
        vmm,
        probe_elf: crate::demo::PROBE_ELF,
        guest_dir: crate::default_guest_dir(),
    })?)
}

/// `faultvisor merge`.
pub fn merge(a: &MergeArgs) -> Result<i32, CliError> {
    Ok(::campaign::run::merge(&a.out, &a.shards)?)
}
