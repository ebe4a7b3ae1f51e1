//! The demo's dashboard in a real browser: headless Chromium (Debian's
//! `chromium` and `chromium-driver`, installed by `scripts/install-deps.sh`)
//! driven over WebDriver. It loads the page of a running `cellpay demo`,
//! checks that the topology, the shard map and the charts show live data,
//! clicks "Cut region", sees the RTO appear, clicks "Heal", sees the RPO
//! audit pass, and saves screenshots (`target/tmp/dashboard-*.png`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

/// The region the test cuts off.
const REGION: &str = "hangzhou";

/// A child process killed when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a fresh demo; its dashboard's address, and its output lines.
fn start_demo(data: &std::path::Path) -> (Process, String, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["demo", "--fresh", "--base-port", "0", "--rate", "2000", "--data"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cellpay demo");
    let (lines_sender, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("the demo's stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                return;
            }
        }
    });
    let demo = Process(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the demo's output");
        if let Some(address) = line.strip_prefix("dashboard: ") {
            let url = address.split_whitespace().next().expect("the dashboard's address").to_string();
            return (demo, url, lines);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts chromedriver and connects a headless Chromium session through it.
async fn browser() -> (Process, Client) {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/install-deps.sh installs it)");
    let driver = Process(driver);
    let mut options = serde_json::json!({
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700"],
    });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        options["binary"] = "/usr/bin/chromium".into();
    }
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".to_string(), options);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(capabilities.clone());
        match builder.connect(&format!("http://127.0.0.1:{port}")).await {
            Ok(client) => return (driver, client),
            Err(error) if Instant::now() < deadline => {
                eprintln!("chromedriver not ready yet: {error}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => panic!("no browser session through chromedriver: {error}"),
        }
    }
}

/// Waits until the element's text satisfies `done`; its text then.
async fn wait_text(client: &Client, css: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(element) = client.find(Locator::Css(css)).await {
            last = element.text().await.unwrap_or_default();
            if done(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{css}: still {last:?} after {timeout:?}");
}

/// How many points a chart has drawn.
async fn chart_points(client: &Client, css: &str) -> usize {
    let chart = client.find(Locator::Css(css)).await.expect("the chart");
    chart.attr("data-points").await.unwrap().and_then(|points| points.parse().ok()).unwrap_or(0)
}

async fn screenshot(client: &Client, name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{name}.png"));
    let png = client.screenshot().await.expect("a screenshot");
    std::fs::write(&path, png).expect("write the screenshot");
    println!("screenshot: {}", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_runs_a_region_cut() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (demo, url, lines) = start_demo(&dir.path().join("demo"));
    let (_driver, client) = browser().await;
    client.goto(&url).await.expect("load the dashboard");

    // The topology: 3 regions, 5 nodes, each up; the shard map; live charts.
    let topology = wait_text(&client, "#topology", Duration::from_secs(60), |text| text.contains("node 5")).await;
    for region in ["hangzhou", "shanghai", "shenzhen"] {
        assert!(topology.contains(region), "{topology}");
    }
    let nodes = client.find_all(Locator::Css("#topology .node")).await.unwrap();
    assert_eq!(nodes.len(), 5, "one node per datacenter");
    let shards = client.find_all(Locator::Css("#shards .shard")).await.unwrap();
    assert_eq!(shards.len(), 100, "the shard map");
    let rate = wait_text(&client, "#tps-now", Duration::from_secs(60), |text| {
        text.trim_end_matches("/s").replace(',', "").parse::<f64>().is_ok_and(|rate| rate > 0.0)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while chart_points(&client, "#chart-tps").await < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(chart_points(&client, "#chart-tps").await >= 6, "the transfers chart draws live points");
    assert!(chart_points(&client, "#chart-commits").await >= 6, "the commits chart draws live points");
    let cells = wait_text(&client, "#cells", Duration::from_secs(10), |text| text.contains("global")).await;
    assert!(!cells.contains("electing"), "every cell has a leader: {cells}");
    println!(
        "the page showed the cluster live {:.1} s after the demo started: {rate}",
        started.elapsed().as_secs_f64()
    );
    screenshot(&client, "live").await;

    // Cut a region: the RTO appears.
    let cut = client.find(Locator::Css(&format!("button[data-cut='region:{REGION}']"))).await.expect("the cut button");
    cut.click().await.expect("click cut");
    let phase = wait_text(&client, "#phase", Duration::from_secs(10), |text| text.starts_with("CUT")).await;
    assert!(phase.contains(REGION), "{phase}");
    let rto =
        wait_text(&client, "#rto", Duration::from_secs(60), |text| text.starts_with("RTO ") && text.ends_with(" ms"))
            .await;
    println!("{rto} (as the page shows it)");
    let node1 = client.find(Locator::Css("#topology .node[data-node='1']")).await.unwrap().text().await.unwrap();
    assert!(node1.contains("CUT OFF"), "node 1 is in {REGION}: {node1}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    screenshot(&client, "cut").await;

    // Heal: the RPO audit passes.
    client.find(Locator::Css("#heal")).await.unwrap().click().await.expect("click heal");
    let rpo = wait_text(&client, "#rpo", Duration::from_secs(120), |text| {
        text.contains("RPO = 0") || text.contains("FAILED")
    })
    .await;
    let detail = client.find(Locator::Css("#rpo-detail")).await.unwrap().text().await.unwrap();
    println!("{rpo}: {detail}");
    assert!(rpo.contains("RPO = 0 · audit passed"), "{rpo}: {detail}");
    assert!(detail.contains(" 0 missing; money conserved in every cell"), "{detail}");
    let phase = wait_text(&client, "#phase", Duration::from_secs(10), |text| text.starts_with("all regions")).await;
    println!("after the heal: {phase}");
    screenshot(&client, "healed").await;
    client.close().await.expect("close the browser");
    controls_through_the_api(&url).await;

    // The demo stops cleanly on SIGTERM and its final audit passes.
    let mut demo = demo;
    let status = Command::new("kill").args(["-TERM", &demo.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = demo.0.wait().unwrap();
    // The rest of its output, to the end (the reader stops at its end).
    let output: Vec<String> = lines.iter().collect();
    assert!(exit.success(), "the demo stopped cleanly: {exit:?}\n{}", output.join("\n"));
    assert!(
        output.iter().any(|line| line.starts_with("audit: every account conserves money")),
        "{}",
        output.join("\n")
    );
}

/// The JSON API's other controls: refusals, a datacenter cut and its audit,
/// a planned switchover and back.
async fn controls_through_the_api(url: &str) {
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        let request = http.post(format!("{url}api/{path}")).json(&body);
        async move {
            let response = request.send().await.expect("the dashboard answers");
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.expect("a JSON answer"))
        }
    };
    let state =
        || async { http.get(format!("{url}api/state")).send().await.unwrap().json::<serde_json::Value>().await };
    let (status, answer) = post("heal", serde_json::json!({})).await;
    assert_eq!(status, 409, "nothing to heal: {answer}");
    let (status, answer) = post("cut", serde_json::json!({ "target": "datacenter:nowhere" })).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("sz-a"), "names the datacenters: {answer}");

    let (status, answer) = post("cut", serde_json::json!({ "target": "datacenter:sz-a" })).await;
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = post("cut", serde_json::json!({ "target": "region:shanghai" })).await;
    assert_eq!(status, 409, "one cut at a time: {answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while state().await.unwrap()["drill"]["cut"]["rto_ms"].is_null() {
        assert!(Instant::now() < deadline, "every cell commits again without sz-a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, answer) = post("heal", serde_json::json!({})).await;
    assert_eq!(status, 202, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let report = loop {
        let state = state().await.unwrap();
        let last = &state["drill"]["last"];
        if state["drill"]["phase"] == "normal" && last["target"] == "datacenter:sz-a" {
            break last.clone();
        }
        assert!(Instant::now() < deadline, "the datacenter drill's audit: {state}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report["passed"], true, "{report}");
    println!("datacenter sz-a: RTO {} ms, {} acknowledged transfers found", report["rto_ms"], report["found"]);

    let (status, answer) = post("switchover", serde_json::json!({ "region": "shenzhen" })).await;
    assert_eq!(status, 202, "{answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = state().await.unwrap();
        let events = state["drill"]["events"].as_array().unwrap().clone();
        let moved = events
            .iter()
            .filter_map(|event| event["text"].as_str())
            .find(|text| text.starts_with("switchover: no leader left in region shenzhen"));
        if let Some(text) = moved {
            println!("{text}");
            let cells = state["cells"].as_array().unwrap();
            assert!(cells.iter().all(|cell| cell["leader"] != 5), "node 5 is shenzhen's: {cells:?}");
            break;
        }
        assert!(Instant::now() < deadline, "leaders leave shenzhen: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, answer) = post("switchover", serde_json::json!({ "region": "shenzhen", "back": true })).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(state().await.unwrap()["drill"]["switched_over"], serde_json::Value::Null);
}
