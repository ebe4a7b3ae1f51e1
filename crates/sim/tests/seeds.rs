//! The simulator in CI: a fixed set of seeds must pass every checker, a seed
//! must replay exactly, and deliberately injected bugs must be caught.

use cellpay_server::cross_cell::Step;
use cellpay_server::world::Bug;
use cellpay_sim::gateway::GatewayCounts;
use cellpay_sim::{run, SimConfig};

/// The CI seed set: a few minutes on two cores.
fn ci_seeds() -> std::ops::RangeInclusive<u64> {
    1..=200
}
const CI_STEPS: u64 = 30_000;

#[test]
fn the_ci_seeds_pass_every_checker() {
    let started = std::time::Instant::now();
    // What the seeds put the cluster through, all together.
    let mut covered = [0u64; 9];
    let (mut acknowledged, mut cross_cell) = (0, 0);
    // Crashes right after each step of the cross-cell protocol, by step.
    let mut step_crashes = [0u64; Step::ALL.len()];
    let mut gateways = GatewayCounts::default();
    for seed in ci_seeds() {
        let config = SimConfig::new(seed, CI_STEPS);
        let report = run(config.clone());
        assert!(report.passed(), "seed {seed} failed: {:#?}\nreplay: {}", report.failures, config.command());
        assert!(report.transfers_acknowledged > 0, "seed {seed}: the workload made progress");
        acknowledged += report.transfers_acknowledged;
        cross_cell += report.transfers_acknowledged_cross_cell;
        let counts = [
            report.crashes,
            report.torn_writes,
            report.region_cuts,
            report.connection_drops,
            report.snapshots_installed,
            report.damage_caught,
            report.disks_replaced,
            report.fault_points.iter().sum(),
            report.shards_moved,
        ];
        for (total, count) in covered.iter_mut().zip(counts) {
            *total += count;
        }
        for (total, count) in step_crashes.iter_mut().zip(report.step_crashes) {
            *total += count;
        }
        gateways.add(&report.gateways);
    }
    let seeds = ci_seeds().count();
    println!("{seeds} seeds of {CI_STEPS} steps in {:?}", started.elapsed());
    let names = [
        "crashes",
        "torn writes",
        "region cuts",
        "connections dropped",
        "snapshots installed",
        "damaged logs caught",
        "disks replaced",
        "fault points taken",
        "shards moved",
    ];
    for (name, total) in names.iter().zip(covered) {
        println!("{name}: {total}");
        assert!(total > 0, "the CI seeds never exercised: {name}");
    }
    for (step, total) in Step::ALL.iter().zip(step_crashes) {
        println!("crashes right after a leader applied step {}: {total}", step.name());
        assert!(total > 0, "the CI seeds never crashed a node right after step {}", step.name());
    }
    // Gateways with a stale table sent parts to a shard's old owner, which
    // refused them; they were split again (or waited for the move) and
    // resent, and the requests answered in full. The checkers above say
    // that every acknowledged transfer was applied once, in all its cells.
    println!("gateways: {gateways:?}");
    assert!(gateways.parts_misrouted > 0, "no gateway sent a part to the wrong cell");
    assert!(gateways.parts_rerouted > 0, "no misrouted part was sent again");
    assert!(gateways.misroute_pauses > 0, "no misroute met a shard between its release and acquisition");
    assert!(gateways.misroutes_corrected > 0, "no request with a misrouted part was answered in full");
    assert!(gateways.restarts > 0, "no gateway restarted");
    // Transfers acknowledged between accounts of two cells (chains' local
    // events aside): at least 30% of the workload.
    let share = cross_cell as f64 / acknowledged as f64;
    println!("cross-cell transfers acknowledged: {cross_cell} of {acknowledged} ({:.0}%)", share * 100.0);
    assert!(share >= 0.30, "the workload sent too few cross-cell transfers: {share:.2}");
}

#[test]
fn a_seed_replays_exactly() {
    let first = run(SimConfig::new(7, 10_000));
    let second = run(SimConfig::new(7, 10_000));
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.transfers_acknowledged, second.transfers_acknowledged);
    let other = run(SimConfig::new(8, 10_000));
    assert_ne!(first.trace_hash, other.trace_hash, "another seed, another run");
}

/// The first CI seed on which one of the `expected` checkers catches `bug`,
/// and every checker that failed on it. Earlier seeds may fail by other
/// checkers first (with the bug on, an acknowledged write lost can also
/// stall a shard move: `liveness`), or stop on an assertion of the engine
/// or of raft-rs (a vote the bug lost can make raft-rs panic); they are
/// printed.
fn caught(bug: Bug, expected: &[&str]) -> Option<(u64, Vec<&'static str>)> {
    caught_or_asserted(bug, expected, None)
}

/// As [`caught`], or the first CI seed that stops on an engine assertion
/// whose message contains `assertion` (the engine caught the bug itself,
/// before the run's end, where the checkers look); its checkers: `["assertion"]`.
fn caught_or_asserted(bug: Bug, expected: &[&str], assertion: Option<&str>) -> Option<(u64, Vec<&'static str>)> {
    ci_seeds().find_map(|seed| {
        let config = SimConfig { bugs: vec![bug], ..SimConfig::new(seed, CI_STEPS) };
        let report = match std::panic::catch_unwind(|| run(config)) {
            Ok(report) => report,
            Err(panic) => {
                let message = panic.downcast_ref::<String>().map(String::as_str).unwrap_or("a panic");
                if assertion.is_some_and(|assertion| message.contains(assertion)) {
                    println!("{bug:?}: seed {seed} stopped on the expected assertion: {message}");
                    return Some((seed, vec!["assertion"]));
                }
                println!("{bug:?}: seed {seed} stopped on an assertion first: {message}");
                return None;
            }
        };
        let checkers: Vec<&'static str> = report.failures.iter().map(|f| f.checker).collect();
        if checkers.iter().any(|checker| expected.contains(checker)) {
            return Some((seed, checkers));
        }
        if !checkers.is_empty() {
            println!("{bug:?}: seed {seed} failed by other checkers first: {checkers:?}");
        }
        None
    })
}

#[test]
fn acknowledging_before_the_fsync_is_caught() {
    let (seed, checkers) =
        caught(Bug::AckBeforeFsync, &["acknowledged", "replicas"]).expect("a CI seed catches the bug");
    println!("ack-before-fsync: seed {seed}: {checkers:?}");
}

#[test]
fn applying_with_a_followers_clock_is_caught() {
    let (seed, checkers) = caught(Bug::FollowerClock, &["replicas"]).expect("a CI seed catches the bug");
    println!("follower-clock: seed {seed}: {checkers:?}");
}

/// Caught by the atomicity checker, or, once a confirmed pending transfer
/// across cells is posted, voided or expired, by the participant's
/// assertion that the release of a leg it holds applies: it never tried it.
#[test]
fn confirming_a_cross_cell_transfer_without_its_credit_try_is_caught() {
    let release_refused = "was refused: pending_transfer_not_found";
    let (seed, checkers) = caught_or_asserted(Bug::ConfirmWithoutTry, &["atomicity"], Some(release_refused))
        .expect("a CI seed catches the bug");
    println!("confirm-without-try: seed {seed}: {checkers:?}");
}

#[test]
fn acknowledging_before_the_commit_is_caught() {
    let (seed, checkers) = caught(Bug::AckBeforeCommit, &["acknowledged"]).expect("a CI seed catches the bug");
    println!("ack-before-commit: seed {seed}: {checkers:?}");
}
