//! The README's commands, run as a user would: the demo, and the client
//! commands against a real server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

fn cellpay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellpay")).args(args).output().expect("run cellpay")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn demo_runs_a_workload_and_audits_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let data = data.to_str().unwrap();
    let args = ["demo", "--data", data, "--base-port", "0", "--duration-s", "3", "--rate", "5000"];
    let first = stdout(&cellpay(&args));
    assert!(first.contains("transfers/s"), "live summary printed: {first}");
    assert!(first.contains("gateway: API on"), "the workload goes through a gateway: {first}");
    assert!(cross_cell_sent(&first) > 0, "payments between cells: {first}");
    assert!(first.contains("audit: every account conserves money"), "{first}");
    assert!(first.contains("10104 created now"), "{first}");
    // Running it again resumes from the data directory.
    let second = stdout(&cellpay(&args));
    assert!(second.contains("(0 created now)"), "{second}");
    assert!(second.contains("audit: every account conserves money"), "{second}");
    // --fresh starts over.
    let mut fresh = args.to_vec();
    fresh.push("--fresh");
    assert!(stdout(&cellpay(&fresh)).contains("10104 created now"));
}

/// `cellpay demo --drill region`: the region leading the most cells is cut
/// off under load, every cell commits again (the RTO, printed), and after
/// the heal every acknowledged transfer is found and money is conserved
/// (RPO = 0), or the demo exits non-zero.
#[test]
fn demo_drill_cuts_a_region_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let data = data.to_str().unwrap();
    let args = ["demo", "--data", data, "--base-port", "0", "--rate", "2000", "--drill", "region"];
    let args = [&args[..], &["--drill-warm-up-s", "4", "--drill-hold-s", "4"]].concat();
    let output = stdout(&cellpay(&args));
    let results = output.split("drill results:").nth(1).unwrap_or_else(|| panic!("no drill results: {output}"));
    println!("drill results:{results}");
    assert!(results.contains("RPO = 0: nothing acknowledged was lost"), "{output}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{data}/drill-report.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["conserved"], true, "{report}");
    let acknowledged =
        report["acknowledged_before"].as_u64().unwrap() + report["acknowledged_during"].as_u64().unwrap();
    assert!(report["acknowledged_before"].as_u64().unwrap() > 0, "transfers acknowledged before the cut: {report}");
    assert!(report["acknowledged_during"].as_u64().unwrap() > 0, "and during it: {report}");
    assert_eq!(report["found"].as_u64().unwrap(), acknowledged, "{report}");
    let rto = report["rto_ms"].as_f64().expect("an RTO was measured");
    let cells = report["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 5, "the global cell and four cells recovered: {report}");
    assert!(cells.iter().any(|cell| cell["kept"] == false), "the busiest region led a cell: {report}");
    println!("measured RTO: {rto:.0} ms");
}

#[test]
fn bench_refuses_cross_cell_without_a_gateway() {
    let refused = cellpay(&["bench", "--cross-cell", "10", "--address", "127.0.0.1:1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--cross-cell needs --cluster and --gateway"), "{stderr}");
    let out_of_range = cellpay(&["bench", "--cross-cell", "101"]);
    assert!(!out_of_range.status.success());
}

/// The payments between cells the demo's last summary line counts
/// (`cross-cell 8.1% of transfers (OK/SENT ok)`).
fn cross_cell_sent(output: &str) -> u64 {
    let line = output.lines().rfind(|line| line.contains("cross-cell")).expect("a summary line");
    let counts = line.split("of transfers (").nth(1).and_then(|rest| rest.split(' ').next()).expect("counts");
    counts.split('/').nth(1).and_then(|sent| sent.parse().ok()).expect("a count sent")
}

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server(data: &std::path::Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let address = line.split_whitespace().nth(4).expect("listening line").to_string();
    Server(child, address)
}

#[test]
fn client_commands_move_money_two_phase() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path());
    let at = ["--address", server.1.as_str()];
    let run = |args: &[&str]| stdout(&cellpay(&[args, &at[..]].concat()));
    let payer = "22773741490847380009910273"; // user 1234567, index 1
    let payee = "141197300545020568834932737"; // user 7654321, index 1
    run(&[
        "account",
        "create",
        "--user",
        "1234567",
        "--ledger",
        "1",
        "--code",
        "1",
        "--flags",
        "debits_must_not_exceed_credits",
    ]);
    run(&["account", "create", "--user", "7654321", "--ledger", "1", "--code", "1"]);
    run(&["account", "create", "--id", "1", "--ledger", "1", "--code", "9"]);
    run(&[
        "transfer", "--id", "1", "--debit", "1", "--credit", payer, "--amount", "1000", "--ledger", "1", "--code", "1",
    ]);
    let authorise = ["transfer", "--id", "2", "--debit", payer, "--credit", payee, "--amount", "300"];
    run(&[&authorise[..], &["--ledger", "1", "--code", "1", "--pending", "--timeout-s", "60"]].concat());
    run(&["transfer", "--id", "3", "--post", "2", "--amount", "250"]);

    let account: serde_json::Value = serde_json::from_str(&run(&["lookup", "account", payer])).unwrap();
    let account = &account["accounts"][0];
    assert_eq!(account["debits_posted"], "250");
    assert_eq!(account["debits_pending"], "0");
    assert_eq!(account["credits_posted"], "1000");
    let history: serde_json::Value = serde_json::from_str(&run(&["history", payer, "--reversed"])).unwrap();
    let ids: Vec<&str> = history["transfers"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["3", "2", "1"]);

    // An overdraft is refused with its result code and a failing exit status.
    let overdraft = cellpay(
        &[
            &[
                "transfer", "--id", "4", "--debit", payer, "--credit", payee, "--amount", "751", "--ledger", "1",
                "--code", "1",
            ][..],
            &at[..],
        ]
        .concat(),
    );
    assert!(!overdraft.status.success());
    assert!(String::from_utf8_lossy(&overdraft.stdout).contains("exceeds_credits"));
    // A retry of an applied transfer is harmless.
    let retry = run(&["transfer", "--id", "3", "--post", "2", "--amount", "250"]);
    assert!(retry.contains("\"exists\""), "{retry}");
}
