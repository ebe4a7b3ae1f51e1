//! What the demo's workload has seen, for the summary line it prints every
//! second and for the dashboard: totals since the start, a bounded series
//! of one point per second, and the ids of the transfers acknowledged
//! lately, which a drill's RPO audit looks up after healing.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Result;
use cellpay_cluster::topology::CellId;
use cellpay_ledger::{CreateTransferResult, Transfer};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Points kept: the dashboard's charts show the last five minutes.
pub(super) const SERIES_POINTS_MAX: usize = 300;
/// Seconds of acknowledged transfers kept while no region is cut: what a
/// cut's audit calls "acknowledged before the cut".
const ACKED_BEFORE_SECONDS: usize = 10;
/// The most acknowledged transfer ids kept for an audit (16 bytes each:
/// 64 MiB; over three minutes of a cut at the demo's 20,000 transfers/s).
/// Acknowledged beyond it are counted, and the audit says it is partial.
pub(super) const ACKED_MAX: usize = 4_000_000;
/// Distinct error messages counted (more are counted as "other").
const ERROR_KINDS_MAX: usize = 16;

/// One second of the workload, and the cells' commit rates.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Point {
    /// Seconds since the demo started.
    pub t: f64,
    /// Transfers answered per second (accepted or refused by the ledger).
    pub transfers_per_s: f64,
    /// Transfers accepted (`ok`) per second.
    pub ok_per_s: f64,
    /// Batch latency through the gateway, of the batches answered this second.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Transfers in batches the gateway could not answer this second.
    pub errors: u64,
    /// Payments between cells among the transfers answered, in percent.
    pub cross_cell_percent: f64,
    /// Raft entries committed per second, by cell (its leader's commit index).
    pub commits_per_s: BTreeMap<CellId, f64>,
}

/// Transfers acknowledged (`ok`, or `exists` on a resend), by second, for an audit after a cut.
struct Acked {
    seconds: VecDeque<Vec<u128>>,
    len: usize,
    /// A cut is on: keep everything (up to `ACKED_MAX`), not just the last seconds.
    keep_all: bool,
    /// Ids kept when the cut began.
    before: usize,
    /// Acknowledged but not kept (over `ACKED_MAX`).
    not_kept: u64,
}

/// What an audit takes: the ids, how many were acknowledged before the cut.
pub(super) struct AckedIds {
    pub ids: Vec<u128>,
    pub before: usize,
    pub not_kept: u64,
}

struct Window {
    started: Instant,
    transfers: u64,
    ok: u64,
    cross_cell: u64,
    errors: u64,
    latency: Histogram<u64>,
}

struct Inner {
    results: BTreeMap<&'static str, u64>,
    cross_cell_sent: u64,
    cross_cell_ok: u64,
    batches_failed: u64,
    transfers_failed: u64,
    errors: BTreeMap<String, u64>,
    window: Window,
    series: VecDeque<Point>,
    acked: Acked,
    commits: BTreeMap<CellId, u64>,
}

pub(super) struct Board {
    started: Instant,
    inner: Mutex<Inner>,
}

/// Totals since the start, for the dashboard.
#[derive(Serialize)]
pub(super) struct Totals {
    pub results: BTreeMap<&'static str, u64>,
    pub cross_cell_sent: u64,
    pub cross_cell_ok: u64,
    pub batches_failed: u64,
    pub transfers_failed: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Board {
    pub(super) fn new(started: Instant) -> Result<Board> {
        let latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let window = Window { started, transfers: 0, ok: 0, cross_cell: 0, errors: 0, latency };
        let acked = Acked { seconds: VecDeque::from([Vec::new()]), len: 0, keep_all: false, before: 0, not_kept: 0 };
        let inner = Inner {
            results: BTreeMap::new(),
            cross_cell_sent: 0,
            cross_cell_ok: 0,
            batches_failed: 0,
            transfers_failed: 0,
            errors: BTreeMap::new(),
            window,
            series: VecDeque::with_capacity(SERIES_POINTS_MAX),
            acked,
            commits: BTreeMap::new(),
        };
        Ok(Board { started, inner: Mutex::new(inner) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("board lock")
    }

    /// Records a batch's answers: `cross_cell` are the positions of the
    /// payments between cells.
    pub(super) fn record(
        &self,
        transfers: &[Transfer],
        cross_cell: &[usize],
        results: &[CreateTransferResult],
        elapsed: Duration,
    ) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.window.latency.saturating_record(elapsed.as_micros() as u64);
        for result in results {
            *inner.results.entry(result.as_str()).or_default() += 1;
        }
        let cross_cell_ok = cross_cell.iter().filter(|&&at| results[at] == CreateTransferResult::Ok).count();
        inner.cross_cell_sent += cross_cell.len() as u64;
        inner.cross_cell_ok += cross_cell_ok as u64;
        inner.window.transfers += transfers.len() as u64;
        inner.window.cross_cell += cross_cell.len() as u64;
        let acked = &mut inner.acked;
        for (transfer, result) in transfers.iter().zip(results) {
            // The demo never reuses an id: `exists` answers a resend of a
            // transfer an earlier attempt applied (its answer was lost).
            match result {
                CreateTransferResult::Ok => inner.window.ok += 1,
                CreateTransferResult::Exists => {}
                _ => continue,
            }
            if acked.len < ACKED_MAX {
                acked.seconds.back_mut().expect("a current second").push(transfer.id);
                acked.len += 1;
            } else {
                acked.not_kept += 1;
            }
        }
    }

    /// Records a batch the gateway did not answer.
    pub(super) fn record_failure(&self, transfers: usize, error: &str) {
        let mut inner = self.lock();
        inner.batches_failed += 1;
        inner.transfers_failed += transfers as u64;
        inner.window.errors += transfers as u64;
        let kind = if inner.errors.len() < ERROR_KINDS_MAX || inner.errors.contains_key(error) {
            error.to_string()
        } else {
            "other".to_string()
        };
        *inner.errors.entry(kind).or_default() += 1;
    }

    /// Ends the current second: its point joins the series (with the
    /// cells' commit indexes now, for their rates) and its summary line is
    /// returned.
    pub(super) fn sample(&self, commits: BTreeMap<CellId, u64>) -> String {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let elapsed = inner.window.started.elapsed().as_secs_f64().max(1e-3);
        let commits_per_s = commits
            .iter()
            .map(|(&cell, &commit)| {
                let before = inner.commits.get(&cell).copied().unwrap_or(commit);
                (cell, commit.saturating_sub(before) as f64 / elapsed)
            })
            .collect();
        inner.commits = commits;
        let window = &inner.window;
        let point = Point {
            t: self.started.elapsed().as_secs_f64(),
            transfers_per_s: window.transfers as f64 / elapsed,
            ok_per_s: window.ok as f64 / elapsed,
            p50_ms: window.latency.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: window.latency.value_at_quantile(0.99) as f64 / 1000.0,
            errors: window.errors,
            cross_cell_percent: 100.0 * window.cross_cell as f64 / window.transfers.max(1) as f64,
            commits_per_s,
        };
        let ok = inner.results.get("ok").copied().unwrap_or(0);
        let total: u64 = inner.results.values().sum();
        let others: Vec<String> =
            inner.results.iter().filter(|(code, _)| **code != "ok").map(|(code, n)| format!("{code}={n}")).collect();
        let failed = match inner.batches_failed {
            0 => String::new(),
            batches => format!("  FAILED {batches} batches ({} transfers)", inner.transfers_failed),
        };
        let line = format!(
            "[{:>4}s] {:>8.0} transfers/s  batch p50 {:>6.2} ms  p99 {:>6.2} ms  ok {ok}/{total}  cross-cell \
             {:.1}% of transfers ({}/{} ok)  {}{failed}",
            point.t as u64,
            point.transfers_per_s,
            point.p50_ms,
            point.p99_ms,
            point.cross_cell_percent,
            inner.cross_cell_ok,
            inner.cross_cell_sent,
            others.join(" "),
        );
        if inner.series.len() == SERIES_POINTS_MAX {
            inner.series.pop_front();
        }
        inner.series.push_back(point);
        inner.window.latency.reset();
        inner.window.started = Instant::now();
        (inner.window.transfers, inner.window.ok, inner.window.cross_cell, inner.window.errors) = (0, 0, 0, 0);
        let acked = &mut inner.acked;
        acked.seconds.push_back(Vec::new());
        while !acked.keep_all && acked.seconds.len() > ACKED_BEFORE_SECONDS + 1 {
            let dropped = acked.seconds.pop_front().expect("more than one second");
            acked.len -= dropped.len();
        }
        line
    }

    pub(super) fn series(&self) -> Vec<Point> {
        self.lock().series.iter().cloned().collect()
    }

    pub(super) fn totals(&self) -> Totals {
        let inner = self.lock();
        Totals {
            results: inner.results.clone(),
            cross_cell_sent: inner.cross_cell_sent,
            cross_cell_ok: inner.cross_cell_ok,
            batches_failed: inner.batches_failed,
            transfers_failed: inner.transfers_failed,
            errors: inner.errors.clone(),
        }
    }

    /// A cut begins: keep every acknowledged transfer from now on, and the
    /// last seconds' before it.
    pub(super) fn keep_acked(&self) {
        let mut inner = self.lock();
        inner.acked.keep_all = true;
        inner.acked.before = inner.acked.len;
        inner.acked.not_kept = 0;
    }

    /// The audit takes what was kept; the board goes back to keeping the last seconds.
    pub(super) fn take_acked(&self) -> AckedIds {
        let mut inner = self.lock();
        let acked = &mut inner.acked;
        let ids: Vec<u128> = acked.seconds.drain(..).flatten().collect();
        let taken = AckedIds { ids, before: acked.before, not_kept: acked.not_kept };
        *acked = Acked { seconds: VecDeque::from([Vec::new()]), len: 0, keep_all: false, before: 0, not_kept: 0 };
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfers(first: u128, count: u128) -> Vec<Transfer> {
        (first..first + count).map(|id| Transfer { id, ..Transfer::default() }).collect()
    }

    #[test]
    fn keeps_the_last_seconds_until_a_cut_then_everything_acknowledged() {
        let board = Board::new(Instant::now()).unwrap();
        let ok = [CreateTransferResult::Ok; 3];
        // Twelve seconds of three transfers each, ids 1..=36; only the last ten seconds are kept.
        for second in 0..12u128 {
            board.record(&transfers(1 + 3 * second, 3), &[], &ok, Duration::from_millis(5));
            board.sample(BTreeMap::new());
        }
        board.keep_acked();
        // During the cut: one accepted, one refused, and a failed batch.
        let results = [CreateTransferResult::Ok, CreateTransferResult::ExceedsCredits];
        board.record(&transfers(100, 2), &[1], &results, Duration::from_millis(5));
        board.record_failure(7, "unavailable");
        for _ in 0..20 {
            board.sample(BTreeMap::new());
        }
        let taken = board.take_acked();
        let expected: Vec<u128> = (7..=36).chain([100]).collect();
        assert_eq!(taken.ids, expected, "the ten seconds before the cut and the accepted one during it");
        assert_eq!((taken.before, taken.not_kept), (30, 0));
        let totals = board.totals();
        assert_eq!((totals.results["ok"], totals.results["exceeds_credits"]), (37, 1));
        assert_eq!((totals.cross_cell_sent, totals.cross_cell_ok, totals.transfers_failed), (1, 0, 7));
        assert_eq!(board.take_acked().ids, Vec::<u128>::new(), "taken once");
    }

    #[test]
    fn the_series_is_bounded_and_rates_come_from_commit_indexes() {
        let board = Board::new(Instant::now()).unwrap();
        for second in 0..(SERIES_POINTS_MAX as u64 + 5) {
            board.sample(BTreeMap::from([(1, 100 * second)]));
        }
        let series = board.series();
        assert_eq!(series.len(), SERIES_POINTS_MAX);
        assert!(series.last().unwrap().commits_per_s[&1] > 0.0);
    }
}
