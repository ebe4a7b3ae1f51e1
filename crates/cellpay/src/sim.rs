//! `cellpay sim`: runs the deterministic simulator (crate `cellpay-sim`) for
//! one seed, or a range of seeds, and prints what each run did and found.

use anyhow::Result;
use cellpay_server::cross_cell::Step;
use cellpay_sim::{bug_from_name, run, SimConfig};

#[derive(clap::Args)]
pub struct SimArgs {
    /// The seed to run (every run of a seed is the same run).
    #[arg(long)]
    seed: u64,
    /// Run this many seeds, from `--seed` on.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Events of the chaos phase.
    #[arg(long, default_value_t = 30_000)]
    steps: u64,
    /// Switch on a deliberate bug: ack-before-fsync, follower-clock or ack-before-commit.
    #[arg(long)]
    bug: Vec<String>,
}

/// Exit status: non-zero if any run failed a checker.
pub fn main(args: SimArgs) -> Result<bool> {
    let mut bugs = Vec::new();
    for name in &args.bug {
        bugs.push(bug_from_name(name).ok_or_else(|| anyhow::anyhow!("no bug named {name:?}"))?);
    }
    anyhow::ensure!(args.seeds >= 1, "--seeds must be at least 1");
    let mut all_passed = true;
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let config = SimConfig { bugs: bugs.clone(), ..SimConfig::new(seed, args.steps) };
        let started = std::time::Instant::now();
        let report = run(config.clone());
        let [slow_fsyncs, late_ticks, step_downs, connections_dropped] = report.fault_points;
        println!(
            "seed {seed}: {} · trace {:016x} · {} steps, {:.1} s simulated in {:.2} s · {} transfers acknowledged ({} cross-cell), {} retries · {} crashes ({} torn writes), {} cuts ({} regions), {} connections dropped, {} logs damaged ({} caught, {} cut as torn, {} disks replaced), {} of {} messages lost, {} duplicated · {} snapshots installed, {} shards moved · fault points: {slow_fsyncs} slow fsyncs, {late_ticks} late ticks, {step_downs} step-downs, {connections_dropped} connections dropped",
            if report.passed() { "ok" } else { "FAILED" },
            report.trace_hash,
            report.steps,
            report.virtual_seconds,
            started.elapsed().as_secs_f64(),
            report.transfers_acknowledged,
            report.transfers_acknowledged_cross_cell,
            report.retries,
            report.crashes,
            report.torn_writes,
            report.link_cuts,
            report.region_cuts,
            report.connection_drops,
            report.damaged_logs,
            report.damage_caught,
            report.damage_cut_as_torn,
            report.disks_replaced,
            report.messages_lost,
            report.messages_sent,
            report.messages_duplicated,
            report.snapshots_installed,
            report.shards_moved,
        );
        let steps: Vec<String> = Step::ALL
            .iter()
            .enumerate()
            .map(|(index, step)| {
                format!("{} {} ({} crashed)", report.cross_cell_steps[index], step.name(), report.step_crashes[index])
            })
            .collect();
        println!("  cross-cell steps applied by leaders: {}", steps.join(", "));
        let g = &report.gateways;
        println!(
            "  gateways: {} requests in {} parts ({} calls, {} redirects), {} parts misrouted, {} rerouted ({} after a pause), {} requests corrected, {} table updates, {} restarts",
            g.requests,
            g.parts,
            g.calls,
            g.redirects,
            g.parts_misrouted,
            g.parts_rerouted,
            g.misroute_pauses,
            g.misroutes_corrected,
            g.table_updates,
            g.restarts,
        );
        if !report.passed() {
            all_passed = false;
            for failure in &report.failures {
                println!("  {}: {}", failure.checker, failure.detail);
            }
            println!("  replay: {}", config.command());
        }
    }
    Ok(all_passed)
}
