//! Drills: cut a datacenter or a region off the rest of the cluster, measure
//! how long until every cell commits again (the RTO), heal, and audit that
//! nothing acknowledged was lost (the RPO) and that money is conserved.
//!
//! **A cut** drops all traffic to and from the target's nodes: every peer
//! link between a cut node and the rest is blocked in both directions (the
//! transport discards the messages, as a dead link would), and the cut
//! nodes' client API stops (connections are closed and refused, as a
//! firewall's reject would), so neither the gateway nor another node's
//! forwarding reaches them. The cut nodes keep running, alone: their view
//! is still on the dashboard.
//!
//! **The RTO** is measured from the cut until every cell (the global cell
//! too) commits again: a node outside the cut leads it and has committed
//! past everything the cell had committed when the cut began (a new
//! leader's first entry counts). A cell whose leader was outside the cut
//! and stays leader in the same term never stopped: its time is when that
//! is first seen (a few milliseconds).
//!
//! **Healing** unblocks the links and restarts the client APIs, then waits
//! until every replica on the healed nodes has applied what its cell had
//! committed when the heal began. **The RPO audit** then looks up, through
//! the gateway, every transfer the workload saw acknowledged from ten
//! seconds before the cut until the audit began (each must be found), and
//! checks that every cell conserves money.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cellpay_cluster::topology::{CellId, NodeId, Topology};
use cellpay_ledger::BATCH_EVENTS_MAX;
use cellpay_server::node::{Reply, Request};
use serde::Serialize;
use serde_json::{json, Value};

use super::board::Board;
use super::workload::{audit, CellAccounts};
use super::Cluster;

/// How often the RTO monitor reads the nodes' status.
const MONITOR_INTERVAL: Duration = Duration::from_millis(10);
/// How long healed replicas have to catch up before the audit says so.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the audit's lookups are retried (leaders move back to their
/// preferred datacenters right after a heal).
const LOOKUP_RETRY_DURATION: Duration = Duration::from_secs(30);
/// Events kept for the page.
const EVENTS_MAX: usize = 50;
/// Missing transfer ids listed in a report.
const MISSING_LISTED_MAX: usize = 10;

/// What a drill cuts off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Region(String),
    Datacenter(String),
}

impl Target {
    /// `region:NAME`, `datacenter:NAME`, or `region` alone: the region
    /// whose nodes lead the most cells now (the first in the file on a tie).
    pub(super) fn parse(spec: &str, cluster: &Cluster) -> Result<Target> {
        let topology = &cluster.topology;
        let regions = || topology.regions.iter().map(|region| region.name.as_str()).collect::<Vec<_>>().join(", ");
        let target = match spec.split_once(':') {
            None if spec == "region" => Target::Region(busiest_region(cluster)),
            Some(("region", name)) => Target::Region(name.to_string()),
            Some(("datacenter", name)) => Target::Datacenter(name.to_string()),
            _ => bail!("a drill target is region, region:NAME or datacenter:NAME, not {spec:?}"),
        };
        match &target {
            Target::Region(name) => {
                ensure!(!topology.region_nodes(name).is_empty(), "no region {name:?}: the regions are {}", regions())
            }
            Target::Datacenter(name) => {
                let datacenters = topology.regions.iter().flat_map(|region| &region.datacenters);
                let names: Vec<&str> = datacenters.map(|datacenter| datacenter.name.as_str()).collect();
                ensure!(
                    names.contains(&name.as_str()),
                    "no datacenter {name:?}: the datacenters are {}",
                    names.join(", ")
                )
            }
        }
        Ok(target)
    }

    pub(super) fn nodes(&self, topology: &Topology) -> Vec<NodeId> {
        match self {
            Target::Region(name) => topology.region_nodes(name),
            Target::Datacenter(name) => topology
                .regions
                .iter()
                .flat_map(|region| &region.datacenters)
                .filter(|datacenter| &datacenter.name == name)
                .flat_map(|datacenter| datacenter.nodes.iter().map(|node| node.id))
                .collect(),
        }
    }

    /// `region:NAME` or `datacenter:NAME`.
    pub(super) fn spec(&self) -> String {
        match self {
            Target::Region(name) => format!("region:{name}"),
            Target::Datacenter(name) => format!("datacenter:{name}"),
        }
    }
}

/// The region whose nodes lead the most cells (the global cell included).
fn busiest_region(cluster: &Cluster) -> String {
    let topology = &cluster.topology;
    let mut leaders: BTreeMap<&str, usize> = BTreeMap::new();
    for cell in cluster.cell_ids() {
        if let Some((node, _)) = cluster.leader(cell, |_| true) {
            if let Some(place) = topology.location(node) {
                *leaders.entry(place.region).or_default() += 1;
            }
        }
    }
    let most = leaders.values().copied().max().unwrap_or(0);
    let region = topology.regions.iter().find(|region| leaders.get(region.name.as_str()).copied().unwrap_or(0) == most);
    region.expect("a topology has regions").name.clone()
}

/// A cell when the cut began.
#[derive(Clone, Copy)]
struct Baseline {
    commit: u64,
    leader: Option<NodeId>,
    term: u64,
}

/// A cell committing again after a cut.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Recovery {
    pub cell: CellId,
    pub after_ms: f64,
    pub leader: NodeId,
    /// Its leader was outside the cut and kept leading.
    pub kept: bool,
}

struct Cut {
    target: Target,
    nodes: Vec<NodeId>,
    at: Instant,
    baseline: BTreeMap<CellId, Baseline>,
    recovered: BTreeMap<CellId, Recovery>,
    rto: Option<Duration>,
}

/// A drill's results, as the page and `--drill` show them.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Report {
    pub target: String,
    /// How long the target was cut off.
    pub cut_ms: f64,
    /// From the cut until every cell committed again (none if healed first).
    pub rto_ms: Option<f64>,
    pub cells: Vec<Recovery>,
    /// From the heal until every healed replica had caught up (none if it did not).
    pub caught_up_ms: Option<f64>,
    /// Transfers acknowledged in the ten seconds before the cut (or since the
    /// last audit, if that ended sooner), and from the cut until the audit.
    pub acknowledged_before: usize,
    pub acknowledged_during: usize,
    /// Acknowledged but not kept for the audit (over its bound): it is partial.
    pub not_kept: u64,
    pub found: usize,
    pub missing: usize,
    pub missing_ids: Vec<String>,
    /// Every cell conserves money (Σ debits = Σ credits, posted and pending).
    pub conserved: bool,
    pub audit_ms: f64,
    pub passed: bool,
    /// Why it did not pass, in words.
    pub problems: Vec<String>,
}

impl Report {
    /// The lines `--drill` prints.
    pub(super) fn lines(&self) -> Vec<String> {
        let mut lines = vec![match self.rto_ms {
            Some(rto) => format!("RTO: {:.0} ms from the cut of {} until every cell committed again", rto, self.target),
            None => format!("RTO: not measured: {} was healed before every cell committed again", self.target),
        }];
        for cell in &self.cells {
            let how = if cell.kept { "kept its leader" } else { "new leader" };
            lines.push(format!("  cell {}: {how}, node {}, after {:.0} ms", cell.cell, cell.leader, cell.after_ms));
        }
        if let Some(caught_up) = self.caught_up_ms {
            lines.push(format!(
                "healed after {:.1} s; every healed replica caught up {:.0} ms later",
                self.cut_ms / 1e3,
                caught_up
            ));
        }
        let acknowledged = self.acknowledged_before + self.acknowledged_during;
        lines.push(format!(
            "RPO audit: {} of {acknowledged} acknowledged transfers found ({} in the 10 s before the cut, {} during it \
             and until the audit), {} missing; money {} in every cell; {:.0} ms",
            self.found,
            self.acknowledged_before,
            self.acknowledged_during,
            self.missing,
            if self.conserved { "conserved" } else { "NOT CONSERVED" },
            self.audit_ms,
        ));
        lines.push(match self.passed {
            true => "RPO = 0: nothing acknowledged was lost".to_string(),
            false => format!("DRILL FAILED: {}", self.problems.join("; ")),
        });
        lines
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Phase {
    Normal,
    Cut,
    Healing,
    Auditing,
}

struct State {
    phase: Phase,
    cut: Option<Cut>,
    /// The region a switchover drained, and when.
    drained: Option<(String, Instant)>,
    last: Option<Report>,
    events: VecDeque<(f64, String)>,
}

/// The drills' controller: the dashboard's buttons and `--drill` call it.
pub(super) struct Drills {
    cluster: Arc<Cluster>,
    board: Arc<Board>,
    cells: Arc<Vec<CellAccounts>>,
    state: Mutex<State>,
}

/// A refusal of a control: the page shows it (HTTP 409).
#[derive(Debug)]
pub(super) struct Refused(pub String);

impl Drills {
    pub(super) fn new(cluster: Arc<Cluster>, board: Arc<Board>, cells: Arc<Vec<CellAccounts>>) -> Drills {
        let state = State { phase: Phase::Normal, cut: None, drained: None, last: None, events: VecDeque::new() };
        Drills { cluster, board, cells, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("drill state lock")
    }

    fn event(&self, state: &mut State, text: String) {
        println!("[{:>4}s] {text}", self.cluster.started.elapsed().as_secs());
        if state.events.len() == EVENTS_MAX {
            state.events.pop_front();
        }
        state.events.push_back((self.cluster.started.elapsed().as_secs_f64(), text));
    }

    /// Cuts the target off and starts measuring the RTO.
    pub(super) async fn cut(self: &Arc<Self>, target: Target) -> Result<(), Refused> {
        let nodes = target.nodes(&self.cluster.topology);
        {
            let mut state = self.lock();
            if state.phase != Phase::Normal {
                return Err(Refused(format!("a drill is under way ({:?}): heal first", state.phase)));
            }
            let baseline = self
                .cluster
                .cell_ids()
                .into_iter()
                .map(|cell| {
                    let commit = self.cluster.statuses(cell).map(|(_, status)| status.commit).max().unwrap_or(0);
                    let leader = self.cluster.leader(cell, |_| true);
                    let (leader, term) = leader.map_or((None, 0), |(node, status)| (Some(node), status.term));
                    (cell, Baseline { commit, leader, term })
                })
                .collect();
            self.board.keep_acked();
            let label = target.spec();
            let cut = Cut {
                target,
                nodes: nodes.clone(),
                at: Instant::now(),
                baseline,
                recovered: BTreeMap::new(),
                rto: None,
            };
            state.phase = Phase::Cut;
            state.cut = Some(cut);
            self.event(&mut state, format!("cut {label} (nodes {nodes:?}) off the cluster"));
        }
        self.cluster.cut(&nodes).await;
        let drills = self.clone();
        tokio::spawn(async move { drills.measure_rto().await });
        Ok(())
    }

    /// Watches the nodes outside the cut until every cell commits again.
    async fn measure_rto(&self) {
        let mut ticker = tokio::time::interval(MONITOR_INTERVAL);
        loop {
            ticker.tick().await;
            let mut state = self.lock();
            let Some(cut) = state.cut.as_mut().filter(|cut| cut.rto.is_none()) else { return };
            let outside = |node: NodeId| !cut.nodes.contains(&node);
            for (&cell, baseline) in &cut.baseline {
                if cut.recovered.contains_key(&cell) {
                    continue;
                }
                let Some((leader, status)) = self.cluster.leader(cell, outside) else { continue };
                let kept = baseline.leader == Some(leader) && baseline.term == status.term;
                if kept || status.commit > baseline.commit {
                    let after_ms = cut.at.elapsed().as_secs_f64() * 1e3;
                    cut.recovered.insert(cell, Recovery { cell, after_ms, leader, kept });
                }
            }
            if cut.recovered.len() == cut.baseline.len() {
                let rto = cut.recovered.values().map(|r| r.after_ms).fold(0.0, f64::max);
                cut.rto = Some(Duration::from_secs_f64(rto / 1e3));
                let label = cut.target.spec();
                self.event(&mut state, format!("RTO {rto:.0} ms: every cell commits again without {label}"));
                return;
            }
        }
    }

    /// The measured RTO of the cut under way, once every cell commits again.
    pub(super) fn rto(&self) -> Option<Duration> {
        self.lock().cut.as_ref().and_then(|cut| cut.rto)
    }

    /// Whether a heal may start now.
    pub(super) fn can_heal(&self) -> Result<(), Refused> {
        match self.lock().phase {
            Phase::Cut => Ok(()),
            phase => Err(Refused(format!("nothing is cut ({phase:?})"))),
        }
    }

    /// The demo is stopping with a cut under way: heal it, without an audit.
    pub(super) async fn heal_for_shutdown(&self) {
        let nodes = {
            let mut state = self.lock();
            if state.phase != Phase::Cut {
                return;
            }
            let cut = state.cut.take().expect("a cut under way");
            state.phase = Phase::Normal;
            self.event(&mut state, format!("healing {} to stop (no audit)", cut.target.spec()));
            cut.nodes
        };
        self.cluster.heal(&nodes).await;
    }

    /// Heals the cut, waits for the healed replicas to catch up, and audits.
    pub(super) async fn heal(&self) -> Result<Report, Refused> {
        let (nodes, target, cut_for) = {
            let mut state = self.lock();
            let Some(cut) = state.cut.as_ref().filter(|_| state.phase == Phase::Cut) else {
                return Err(Refused(format!("nothing is cut ({:?})", state.phase)));
            };
            let taken = (cut.nodes.clone(), cut.target.spec(), cut.at.elapsed());
            state.phase = Phase::Healing;
            self.event(&mut state, format!("healing {} after {:.1} s", taken.1, taken.2.as_secs_f64()));
            taken
        };
        self.cluster.heal(&nodes).await;
        let healed_at = Instant::now();
        let caught_up = self.wait_caught_up(&nodes).await;
        let caught_up_ms = caught_up.as_ref().ok().map(|()| healed_at.elapsed().as_secs_f64() * 1e3);
        {
            let mut state = self.lock();
            state.phase = Phase::Auditing;
            let text = match &caught_up {
                Ok(()) => format!("healed replicas caught up in {:.0} ms; auditing", caught_up_ms.unwrap_or(0.0)),
                Err(error) => format!("healed replicas did not catch up: {error:#}; auditing"),
            };
            self.event(&mut state, text);
        }
        let audit_started = Instant::now();
        let acked = self.board.take_acked();
        let found = self.find_transfers(&acked.ids).await;
        let conserved = audit(&self.cluster, &self.cells).await;
        let mut state = self.lock();
        let cut = state.cut.take().expect("the cut being healed");
        let mut problems = Vec::new();
        if let Err(error) = &caught_up {
            problems.push(format!("healed replicas did not catch up: {error:#}"));
        }
        let (found, missing) = match found {
            Ok(missing) => (acked.ids.len() - missing.len(), missing),
            Err(error) => {
                problems.push(format!("the lookups failed: {error:#}"));
                (0, Vec::new())
            }
        };
        if !missing.is_empty() {
            problems.push(format!("{} acknowledged transfers are missing", missing.len()));
        }
        let conserved = match conserved {
            Ok(broken) if broken.is_empty() => true,
            Ok(broken) => {
                problems.push(format!("cells {broken:?} do not conserve money"));
                false
            }
            Err(error) => {
                problems.push(format!("the conservation audit failed: {error:#}"));
                false
            }
        };
        if acked.not_kept > 0 {
            problems.push(format!(
                "{} acknowledged transfers were over the audit's bound of {} and not checked (a shorter cut checks \
                 everything)",
                acked.not_kept,
                super::board::ACKED_MAX
            ));
        }
        let report = Report {
            target,
            cut_ms: cut_for.as_secs_f64() * 1e3,
            rto_ms: cut.rto.map(|rto| rto.as_secs_f64() * 1e3),
            cells: cut.recovered.into_values().collect(),
            caught_up_ms,
            acknowledged_before: acked.before,
            acknowledged_during: acked.ids.len() - acked.before.min(acked.ids.len()),
            not_kept: acked.not_kept,
            found,
            missing: missing.len(),
            missing_ids: missing.iter().take(MISSING_LISTED_MAX).map(|id| id.to_string()).collect(),
            conserved,
            audit_ms: audit_started.elapsed().as_secs_f64() * 1e3,
            passed: problems.is_empty(),
            problems,
        };
        let verdict = match report.passed {
            true => format!("RPO audit passed: all {} acknowledged transfers found, money conserved", report.found),
            false => format!("RPO audit FAILED: {}", report.problems.join("; ")),
        };
        self.event(&mut state, verdict);
        state.phase = Phase::Normal;
        state.last = Some(report.clone());
        Ok(report)
    }

    /// Waits until every replica on `nodes` has applied what its cell had
    /// committed when the wait began (by its leader's count, the first time
    /// it has one).
    async fn wait_caught_up(&self, nodes: &[NodeId]) -> Result<()> {
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        let mut targets: BTreeMap<CellId, u64> = BTreeMap::new();
        loop {
            let mut behind = Vec::new();
            for cell in self.cluster.cell_ids() {
                // The leader in the highest term (a healed node may lead
                // again already: it is caught up by then).
                let target = match targets.get(&cell) {
                    Some(&target) => target,
                    None => match self.cluster.leader(cell, |_| true) {
                        Some((_, leader)) => *targets.entry(cell).or_insert(leader.commit),
                        None => {
                            behind.push(format!("cell {cell} has no leader"));
                            continue;
                        }
                    },
                };
                for &node in nodes {
                    let applied = self.cluster.handle(node).status().cell(cell).map(|status| status.applied);
                    if applied.is_some_and(|applied| applied < target) {
                        behind.push(format!("cell {cell} on node {node}"));
                    }
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("still behind after {} s: {}", CATCH_UP_TIMEOUT.as_secs(), behind.join(", "));
            }
            tokio::time::sleep(MONITOR_INTERVAL).await;
        }
    }

    /// Looks up every id through the gateway: the ids not found.
    async fn find_transfers(&self, ids: &[u128]) -> Result<Vec<u128>> {
        let mut missing = Vec::new();
        for chunk in ids.chunks(BATCH_EVENTS_MAX) {
            let deadline = Instant::now() + LOOKUP_RETRY_DURATION;
            let found = loop {
                match self.cluster.submit(Request::LookupTransfers(chunk.to_vec())).await {
                    Ok(Reply::Transfers(found)) => break found,
                    Ok(_) => bail!("unexpected reply to a lookup"),
                    Err(error) if Instant::now() >= deadline => return Err(error).context("looking up transfers"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let found: std::collections::BTreeSet<u128> = found.iter().map(|transfer| transfer.id).collect();
            missing.extend(chunk.iter().filter(|id| !found.contains(id)));
        }
        Ok(missing)
    }

    /// Moves every leader out of `region` (a planned switchover), or lets
    /// them back (`back`).
    pub(super) fn switchover(self: &Arc<Self>, region: &str, back: bool) -> Result<(), Refused> {
        if self.cluster.topology.region_nodes(region).is_empty() {
            return Err(Refused(format!("no region {region:?}")));
        }
        let mut state = self.lock();
        match (&state.drained, back) {
            (Some((drained, _)), false) => {
                return Err(Refused(format!("region {drained} is switched over: switch it back first")))
            }
            (Some((drained, _)), true) if drained != region => {
                return Err(Refused(format!("region {drained} is switched over, not {region}")))
            }
            (None, true) => return Err(Refused(format!("region {region} is not switched over"))),
            _ => {}
        }
        for handle in self.cluster.handles.values() {
            handle.set_region_drained(region, !back).map_err(|error| Refused(error.to_string()))?;
        }
        if back {
            state.drained = None;
            self.event(&mut state, format!("switchover back: leaders may return to region {region}"));
            return Ok(());
        }
        state.drained = Some((region.to_string(), Instant::now()));
        self.event(&mut state, format!("switchover: moving every leader out of region {region}"));
        let drills = self.clone();
        let region = region.to_string();
        tokio::spawn(async move { drills.watch_drained(region).await });
        Ok(())
    }

    /// Reports when no cell is led from the drained region any more.
    async fn watch_drained(&self, region: String) {
        let nodes = self.cluster.topology.region_nodes(&region);
        loop {
            tokio::time::sleep(MONITOR_INTERVAL).await;
            let led_there = self
                .cluster
                .cell_ids()
                .into_iter()
                .any(|cell| self.cluster.leader(cell, |_| true).is_none_or(|(node, _)| nodes.contains(&node)));
            let mut state = self.lock();
            let Some((drained, at)) = state.drained.clone().filter(|(drained, _)| *drained == region) else { return };
            if !led_there {
                let text =
                    format!("switchover: no leader left in region {drained} after {} ms", at.elapsed().as_millis());
                self.event(&mut state, text);
                return;
            }
        }
    }

    /// The drills' part of the dashboard's state.
    pub(super) fn json(&self) -> Value {
        let state = self.lock();
        let cut = state.cut.as_ref().map(|cut| {
            json!({
                "target": cut.target.spec(),
                "nodes": cut.nodes,
                "for_ms": cut.at.elapsed().as_secs_f64() * 1e3,
                "rto_ms": cut.rto.map(|rto| rto.as_secs_f64() * 1e3),
                "cells": cut.recovered.values().collect::<Vec<_>>(),
                "waiting": cut.baseline.keys().filter(|cell| !cut.recovered.contains_key(cell)).collect::<Vec<_>>(),
            })
        });
        let events: Vec<Value> = state.events.iter().map(|(t, text)| json!({ "t": t, "text": text })).collect();
        json!({
            "phase": state.phase,
            "cut": cut,
            "switched_over": state.drained.as_ref().map(|(region, _)| region),
            "last": state.last,
            "events": events,
        })
    }
}
