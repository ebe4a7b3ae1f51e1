//! The topology file: the default local cluster, lookups, delays, and every
//! validation error.

use std::time::Duration;

use cellpay_cluster::topology::{
    Cell, Latency, Topology, TopologyError, CELLS_MAX, CELL_REPLICAS_MAX, FILE_BYTES_MAX, GLOBAL_CELL, NODES_MAX,
    SHARDS_DEFAULT,
};

/// A small valid cluster: regions r1 (d1: node 1, d2: node 2) and r2 (d3: node 3), four shards, two cells.
const SMALL: &str = r#"
shards = 4

[[region]]
name = "r1"

[[region.datacenter]]
name = "d1"

[[region.datacenter.node]]
id = 1
peer = "127.0.0.1:7000"
client = "127.0.0.1:7001"

[[region.datacenter]]
name = "d2"

[[region.datacenter.node]]
id = 2
peer = "127.0.0.1:7002"
client = "127.0.0.1:7003"

[[region]]
name = "r2"

[[region.datacenter]]
name = "d3"

[[region.datacenter.node]]
id = 3
peer = "127.0.0.1:7004"
client = "127.0.0.1:7005"

[[cell]]
id = 1
shards = ["0-1"]
voters = [1, 2, 3]
leader_preference = ["d1", "d2"]

[[cell]]
id = 2
shards = ["2", "3"]
voters = [1, 2]
learners = [3]
leader_preference = ["d3"]
"#;

/// `SMALL` with each `(from, to)` replaced once; `from` must occur.
fn small_with(replacements: &[(&str, &str)]) -> String {
    let mut text = SMALL.to_owned();
    for (from, to) in replacements {
        assert!(text.contains(from), "{from:?} is not in the small file");
        text = text.replacen(from, to, 1);
    }
    text
}

fn parse_error(text: &str) -> String {
    match Topology::parse(text) {
        Ok(topology) => panic!("parsed, but expected an error: {topology:?}"),
        Err(error) => error.to_string(),
    }
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    range.collect()
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// A file with `nodes` nodes, one per datacenter, in one region, and one cell
/// owning every shard with the first `voters` nodes as voters.
fn generated(nodes: u64, voters: u64) -> String {
    let mut text = String::from("shards = 1\n[[region]]\nname = \"r\"\n");
    for id in 1..=nodes {
        text.push_str(&format!(
            "[[region.datacenter]]\nname = \"d{id}\"\n[[region.datacenter.node]]\nid = {id}\n\
             peer = \"10.0.{}.{}:7000\"\nclient = \"10.0.{}.{}:7001\"\n",
            id / 256,
            id % 256,
            id / 256,
            id % 256
        ));
    }
    let voters: Vec<String> = (1..=voters).map(|id| id.to_string()).collect();
    text.push_str(&format!("[[cell]]\nid = 1\nshards = [\"0\"]\nvoters = [{}]\n", voters.join(", ")));
    text
}

#[test]
fn small_file_parses() {
    let topology = Topology::parse(SMALL).unwrap();
    assert_eq!(topology.shards, 4);
    assert_eq!(topology.latency, Latency::DISABLED);
    assert_eq!(topology.nodes().map(|node| node.id).collect::<Vec<_>>(), [1, 2, 3]);
    let cell = topology.cell(2).unwrap();
    assert_eq!(cell.shards, [2, 3]);
    assert_eq!(cell.voters, [1, 2]);
    assert_eq!(cell.learners, [3]);
    assert_eq!(topology.cell(3), None);
    assert_eq!(topology.cells_of_node(3), [GLOBAL_CELL, 1, 2]);
    assert_eq!(topology.cells_of_node(9), Vec::<u64>::new());
    assert_eq!(topology.region_nodes("r1"), [1, 2]);
    assert_eq!(Topology::parse(&topology.to_toml()).unwrap(), topology);
}

#[test]
fn shards_default_to_one_hundred() {
    let text = small_with(&[("shards = 4", ""), (r#"["2", "3"]"#, r#"["2-99"]"#)]);
    let topology = Topology::parse(&text).unwrap();
    assert_eq!(topology.shards, SHARDS_DEFAULT);
    assert_eq!(topology.cell_of_shard(99), Some(2));
}

#[test]
fn module_doc_example_parses() {
    let source = include_str!("../src/topology.rs");
    let doc: Vec<&str> = source
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line))
        .collect();
    let start = doc.iter().position(|line| *line == "```toml").expect("the module doc has a TOML example") + 1;
    let length = doc[start..].iter().position(|line| *line == "```").unwrap();
    let example = doc[start..start + length].join("\n");
    let topology = Topology::parse(&example).unwrap();
    assert_eq!(topology.cells.len(), 2);
    assert_eq!(topology.cell(2).unwrap().shards, (50..100).collect::<Vec<u32>>());
    assert!(topology.latency.enabled);
}

#[test]
fn local_validates_and_round_trips() {
    for cells in [1, 3, 5, 7, 100, 150, CELLS_MAX as u32] {
        let topology = Topology::local(7000, cells);
        let text = topology.to_toml();
        assert_eq!(Topology::parse(&text).unwrap(), topology, "cells = {cells}");
    }
    let topology = Topology::local(7000, 3);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("topology.toml");
    std::fs::write(&path, topology.to_toml()).unwrap();
    assert_eq!(Topology::load(&path).unwrap(), topology);
}

#[test]
fn to_toml_writes_compact_ranges() {
    let topology = Topology::local(7000, 3);
    let text = topology.to_toml();
    assert!(text.contains(r#"shards = ["0-32"]"#), "{text}");
    assert!(text.contains(r#"shards = ["66-99"]"#), "{text}");
    let scattered = small_with(&[(r#"["0-1"]"#, r#"["0", "1"]"#), (r#"["2", "3"]"#, r#"["3", "2"]"#)]);
    let text = Topology::parse(&scattered).unwrap().to_toml();
    assert!(text.contains(r#"shards = ["0-1"]"#), "{text}");
    assert!(text.contains(r#"shards = ["2-3"]"#), "{text}");
}

#[test]
fn local_placement() {
    let topology = Topology::local(7000, 3);
    assert_eq!(topology.shards, 100);
    assert_eq!(topology.latency, Latency::LOCAL);
    assert_eq!(Latency::LOCAL.same_datacenter_us, 500);
    assert_eq!(Latency::LOCAL.same_region_us, 2_000);
    assert_eq!(Latency::LOCAL.cross_region_us, 20_000);
    let layout: Vec<(&str, Vec<&str>)> = topology
        .regions
        .iter()
        .map(|region| (region.name.as_str(), region.datacenters.iter().map(|dc| dc.name.as_str()).collect()))
        .collect();
    assert_eq!(
        layout,
        [("hangzhou", vec!["hz-a", "hz-b"]), ("shanghai", vec!["sh-a", "sh-b"]), ("shenzhen", vec!["sz-a"])]
    );
    let nodes: Vec<(u64, String, String)> = topology
        .nodes()
        .map(|node| (node.id, node.peer_address.to_string(), node.client_address.to_string()))
        .collect();
    let expected: Vec<(u64, String, String)> = (1..=5u16)
        .map(|id| {
            (u64::from(id), format!("127.0.0.1:{}", 7000 + 2 * (id - 1)), format!("127.0.0.1:{}", 7001 + 2 * (id - 1)))
        })
        .collect();
    assert_eq!(nodes, expected);
    for (id, datacenter) in (1..=5).zip(["hz-a", "hz-b", "sh-a", "sh-b", "sz-a"]) {
        assert_eq!(topology.location(id).unwrap().datacenter, datacenter);
        assert_eq!(topology.node(id).unwrap().id, id);
    }
    assert_eq!(topology.location(4).unwrap().region, "shanghai");
    assert_eq!(topology.location(6), None);
    assert_eq!(topology.node(0), None);
    assert_eq!(topology.region_nodes("hangzhou"), [1, 2]);
    assert_eq!(topology.region_nodes("shanghai"), [3, 4]);
    assert_eq!(topology.region_nodes("shenzhen"), [5]);
    assert_eq!(topology.region_nodes("beijing"), Vec::<u64>::new());

    let cells: Vec<(u64, Vec<u32>)> = topology.cells.iter().map(|cell| (cell.id, cell.shards.clone())).collect();
    assert_eq!(cells, [(1, (0..33).collect()), (2, (33..66).collect()), (3, (66..100).collect())]);
    for cell in &topology.cells {
        assert_eq!(cell.voters, ids(1..=5));
        assert!(cell.learners.is_empty());
    }
    assert_eq!(topology.cells_of_node(5), [GLOBAL_CELL, 1, 2, 3]);
}

#[test]
fn local_leader_preferences() {
    let topology = Topology::local(7000, 7);
    let preferences: Vec<Vec<String>> = topology.cells.iter().map(|cell| cell.leader_preference.clone()).collect();
    let expected = [
        ["hz-a", "hz-b", "sh-a", "sh-b", "sz-a"],
        ["hz-b", "hz-a", "sh-a", "sh-b", "sz-a"],
        ["sh-a", "sh-b", "hz-a", "hz-b", "sz-a"],
        ["sh-b", "sh-a", "hz-a", "hz-b", "sz-a"],
        ["sz-a", "hz-a", "hz-b", "sh-a", "sh-b"],
        ["hz-a", "hz-b", "sh-a", "sh-b", "sz-a"],
        ["hz-b", "hz-a", "sh-a", "sh-b", "sz-a"],
    ];
    assert_eq!(preferences, expected.iter().map(|names| strings(names)).collect::<Vec<_>>());
}

#[test]
fn preference_rank() {
    let topology = Topology::local(7000, 5);
    assert_eq!(topology.preference_rank(3, 3), 0);
    assert_eq!(topology.preference_rank(3, 4), 1);
    assert_eq!(topology.preference_rank(3, 1), 2);
    assert_eq!(topology.preference_rank(3, 5), 4);
    assert_eq!(topology.preference_rank(5, 5), 0);
    assert_eq!(topology.preference_rank(3, 99), 5, "an unknown node ranks after every listed datacenter");
    assert_eq!(topology.preference_rank(99, 1), 0, "an unknown cell has an empty preference");
    let small = Topology::parse(SMALL).unwrap();
    assert_eq!(small.preference_rank(2, 3), 0);
    assert_eq!(small.preference_rank(2, 1), 1, "a datacenter the preference does not list");
    assert_eq!(small.preference_rank(1, 3), 2);
}

#[test]
fn one_way_delay() {
    let latency = "shards = 4\n[latency]\nenabled = true\n\
                   same_datacenter_us = 100\nsame_region_us = 1000\ncross_region_us = 30000";
    let second_node_in_d1 = "client = \"127.0.0.1:7001\"\n\n[[region.datacenter.node]]\nid = 4\n\
                             peer = \"[::1]:7000\"\nclient = \"[::1]:7001\"";
    let text = small_with(&[("shards = 4", latency), ("client = \"127.0.0.1:7001\"", second_node_in_d1)]);
    let topology = Topology::parse(&text).unwrap();
    assert_eq!(Topology::parse(&topology.to_toml()).unwrap(), topology);
    assert_eq!(topology.one_way_delay(1, 1), Duration::ZERO);
    assert_eq!(topology.one_way_delay(1, 4), Duration::from_micros(100));
    assert_eq!(topology.one_way_delay(4, 1), Duration::from_micros(100));
    assert_eq!(topology.one_way_delay(1, 2), Duration::from_micros(1000));
    assert_eq!(topology.one_way_delay(2, 3), Duration::from_millis(30));
    assert_eq!(topology.one_way_delay(3, 4), Duration::from_millis(30));
    assert_eq!(topology.one_way_delay(1, 99), Duration::ZERO);
    let disabled = Topology::parse(&text.replace("enabled = true", "enabled = false")).unwrap();
    assert_eq!(disabled.one_way_delay(2, 3), Duration::ZERO);
    let local = Topology::local(7000, 1);
    assert_eq!(local.one_way_delay(1, 2), Duration::from_millis(2));
    assert_eq!(local.one_way_delay(1, 5), Duration::from_millis(20));
}

#[test]
fn cell_of_shard() {
    let topology = Topology::local(7000, 3);
    let expected = [(0, Some(1)), (32, Some(1)), (33, Some(2)), (65, Some(2)), (66, Some(3)), (99, Some(3))];
    for (shard, cell) in expected {
        assert_eq!(topology.cell_of_shard(shard), cell, "shard {shard}");
    }
    assert_eq!(topology.cell_of_shard(100), None);
    assert_eq!(topology.cell_of_shard(u32::MAX), None);
    let small = Topology::parse(SMALL).unwrap();
    assert_eq!(
        (0..5).map(|shard| small.cell_of_shard(shard)).collect::<Vec<_>>(),
        [Some(1), Some(1), Some(2), Some(2), None]
    );
}

#[test]
fn try_local_limits() {
    assert_eq!(
        Topology::try_local(7000, 0).unwrap_err().to_string(),
        "no cells: the cluster needs at least one [[cell]]"
    );
    assert_eq!(
        Topology::try_local(7000, u32::MAX).unwrap_err().to_string(),
        format!("{} cells is more than the limit of 4096", u32::MAX)
    );
    assert_eq!(
        Topology::try_local(65527, 3).unwrap_err().to_string(),
        "local cluster: base port 65527 is too high: it must be at most 65526"
    );
    let highest = Topology::try_local(65526, 3).unwrap();
    assert_eq!(highest.node(5).unwrap().client_address.port(), u16::MAX);
}

#[test]
fn new_validates_and_sorts() {
    let small = Topology::parse(SMALL).unwrap();
    let mut cells = small.cells.clone();
    cells[1].shards = vec![3, 2];
    let rebuilt = Topology::new(small.shards, small.latency, small.regions.clone(), cells.clone()).unwrap();
    assert_eq!(rebuilt, small);
    cells[1].shards = vec![3, 7, 2];
    let error = Topology::new(small.shards, small.latency, small.regions.clone(), cells).unwrap_err();
    assert_eq!(error.to_string(), "cell 2: shard 7 is out of range: shards are 0 to 3 (shards = 4)");
    let moved =
        vec![Cell { id: 9, shards: vec![0, 1, 2, 3], voters: vec![2], learners: vec![], leader_preference: vec![] }];
    let rebuilt = Topology::new(small.shards, small.latency, small.regions.clone(), moved).unwrap();
    assert_eq!(rebuilt.cell_of_shard(3), Some(9));
    assert_eq!(rebuilt.cells_of_node(1), [GLOBAL_CELL], "every node hosts the global cell");
}

#[test]
fn the_global_cell_has_a_voter_per_datacenter_and_learners_for_the_rest() {
    let text = small_with(&[(
        "client = \"127.0.0.1:7001\"\n",
        "client = \"127.0.0.1:7001\"\n\n[[region.datacenter.node]]\nid = 4\npeer = \"127.0.0.1:7006\"\n\
         client = \"127.0.0.1:7007\"\n",
    )]);
    let topology = Topology::parse(&text).unwrap();
    let global = topology.global();
    assert_eq!(global.id, GLOBAL_CELL);
    assert_eq!(topology.cell(GLOBAL_CELL), Some(global));
    assert!(global.shards.is_empty(), "the global cell owns no shard");
    assert_eq!(global.voters, [1, 2, 3], "the first node of each datacenter");
    assert_eq!(global.learners, [4], "the others: read replicas in their datacenter");
    assert_eq!(global.leader_preference, strings(&["d1", "d2", "d3"]));
    assert_eq!(topology.cells_of_node(4), [GLOBAL_CELL]);
    assert!(!topology.cells.iter().any(|cell| cell.id == GLOBAL_CELL), "not one of the file's cells");
    assert_eq!(Topology::parse(&topology.to_toml()).unwrap(), topology, "and never written to the file");
}

#[test]
fn validation_errors() {
    const ID_MAX: &str = "9223372036854775807";
    let latency =
        "shards = 4\n[latency]\nenabled = true\nsame_datacenter_us = 1\nsame_region_us = 10000001\ncross_region_us = 3";
    let cases: &[(&[(&str, &str)], String)] = &[
        (&[("shards = 4", "shards = 0")], "shards = 0: must be in 1..=10000".into()),
        (&[("shards = 4", "shards = 10001")], "shards = 10001: must be in 1..=10000".into()),
        (&[("shards = 4", latency)], "latency: same_region_us = 10000001 is more than the limit of 10000000 us".into()),
        (&[(r#"name = "r1""#, r#"name = "r 1""#)], region_name_error("r 1")),
        (&[(r#"name = "d2""#, r#"name = """#)], datacenter_name_error("")),
        (
            &[(r#"name = "d2""#, &format!("name = \"{}\"", "d".repeat(65)))],
            datacenter_name_error(&format!("{}…", "d".repeat(64))),
        ),
        (&[(r#"name = "r2""#, r#"name = "r1""#)], "region r1 is listed twice".into()),
        (
            &[(r#"name = "d3""#, r#"name = "d1""#)],
            "datacenter d1 is listed twice: in region r1 and in region r2".into(),
        ),
        (&[("id = 2\npeer", "id = 1\npeer")], "node 1 is listed twice: in datacenter d1 and in datacenter d2".into()),
        (&[("id = 3\npeer", "id = 0\npeer")], format!("datacenter d3: node id 0 is out of range 1..={ID_MAX}")),
        (
            &[("id = 3\npeer", "id = 9223372036854775807\npeer"), ("voters = [1, 2, 3]", "voters = [1, 2]")],
            "cell 2: learner 3 is not a node of the cluster".into(),
        ),
        (
            &[("127.0.0.1:7004", "localhost:7004")],
            r#"node 3: peer address "localhost:7004" is not an IP:port socket address: invalid socket address syntax"#
                .into(),
        ),
        (
            &[("127.0.0.1:7005", "127.0.0.1")],
            r#"node 3: client address "127.0.0.1" is not an IP:port socket address: invalid socket address syntax"#
                .into(),
        ),
        (
            &[(r#"client = "127.0.0.1:7005""#, r#"client = "127.0.0.1:7000""#)],
            "address 127.0.0.1:7000 is used twice: node 1 peer and node 3 client".into(),
        ),
        (
            &[(r#"client = "127.0.0.1:7001""#, r#"client = "127.0.0.1:7000""#)],
            "address 127.0.0.1:7000 is used twice: node 1 peer and node 1 client".into(),
        ),
        (&[("id = 2\nshards", "id = 1\nshards")], "cell 1 is listed twice".into()),
        (&[("id = 2\nshards", "id = 0\nshards")], "cell id 0 is out of range 1..=65535".to_string()),
        (&[("id = 2\nshards", "id = 65536\nshards")], "cell id 65536 is out of range 1..=65535".to_string()),
        (&[(r#"["2", "3"]"#, r#"["2", "3-"]"#)], shard_syntax_error(2, "3-")),
        (&[(r#"["2", "3"]"#, r#"["3-2"]"#)], shard_syntax_error(2, "3-2")),
        (&[(r#"["2", "3"]"#, r#"["2", " 3"]"#)], shard_syntax_error(2, " 3")),
        (&[(r#"["2", "3"]"#, r#"["2", "4294967296"]"#)], shard_syntax_error(2, "4294967296")),
        (
            &[(r#"["2", "3"]"#, r#"["2", "3-4"]"#)],
            "cell 2: shard 3-4 is out of range: shards are 0 to 3 (shards = 4)".into(),
        ),
        (
            &[(r#"["2", "3"]"#, r#"["2", "3-4294967295"]"#)],
            "cell 2: shard 3-4294967295 is out of range: shards are 0 to 3 (shards = 4)".into(),
        ),
        (&[(r#"["2", "3"]"#, r#"["2", "3", "2"]"#)], "cell 2: shard 2 is listed twice".into()),
        (&[(r#"["2", "3"]"#, r#"["2-3", "3"]"#)], "cell 2: shard 3 is listed twice".into()),
        (&[(r#"["2", "3"]"#, r#"["1-3"]"#)], "cell 2: shard 1 is also owned by cell 1".into()),
        (&[(r#"["2", "3"]"#, r#"["3"]"#)], "shards not owned by any cell: 2 (1 in all)".into()),
        (
            &[
                ("shards = 4", "shards = 40"),
                (r#"["2", "3"]"#, r#"["2", "4", "6", "8", "10", "12", "14", "16", "18-20"]"#),
            ],
            "shards not owned by any cell: 3, 5, 7, 9, 11, 13, 15, 17, … (27 in all)".into(),
        ),
        (&[("voters = [1, 2]\n", "voters = []\n")], "cell 2: no voters: a cell needs at least one voter".into()),
        (&[("learners = [3]", "learners = [4]")], "cell 2: learner 4 is not a node of the cluster".into()),
        (&[("voters = [1, 2, 3]", "voters = [1, 0]")], "cell 1: voter 0 is not a node of the cluster".into()),
        (&[("voters = [1, 2, 3]", "voters = [1, 2, 1]")], "cell 1: voter 1 is listed twice".into()),
        (&[("learners = [3]", "learners = [3, 3]")], "cell 2: learner 3 is listed twice".into()),
        (&[("learners = [3]", "learners = [2]")], "cell 2: node 2 is both a voter and a learner".into()),
        (
            &[(r#"["d3"]"#, r#"["d4"]"#)],
            r#"cell 2: leader_preference names "d4", which is not a datacenter of the cluster"#.into(),
        ),
        (
            &[(r#"["d3"]"#, r#"["r2"]"#)],
            r#"cell 2: leader_preference names "r2", which is not a datacenter of the cluster"#.into(),
        ),
        (&[(r#"["d1", "d2"]"#, r#"["d1", "d2", "d1"]"#)], "cell 1: leader_preference lists datacenter d1 twice".into()),
    ];
    for (replacements, expected) in cases {
        assert_eq!(&parse_error(&small_with(replacements)), expected, "{replacements:?}");
    }
}

fn region_name_error(name: &str) -> String {
    format!("region name {name:?} is invalid: use 1 to 64 of the characters a-z, A-Z, 0-9, '-', '_' and '.'")
}

fn datacenter_name_error(name: &str) -> String {
    format!("datacenter name {name:?} is invalid: use 1 to 64 of the characters a-z, A-Z, 0-9, '-', '_' and '.'")
}

fn shard_syntax_error(cell: u64, range: &str) -> String {
    format!("cell {cell}: shard range {range:?} is invalid: write a shard (\"7\") or an inclusive range (\"0-24\")")
}

#[test]
fn structural_errors() {
    let cases: &[(&str, &str)] = &[
        ("", "no regions: the cluster needs at least one [[region]]"),
        ("[[cell]]\nid = 1\nshards = []\nvoters = [1]", "no regions: the cluster needs at least one [[region]]"),
        ("[[region]]\nname = \"r1\"", "region r1: no datacenters: a region needs at least one [[region.datacenter]]"),
        (
            "[[region]]\nname = \"r1\"\n[[region.datacenter]]\nname = \"d1\"",
            "datacenter d1: no nodes: a datacenter needs at least one [[region.datacenter.node]]",
        ),
        (
            "[[region]]\nname = \"r1\"\n[[region.datacenter]]\nname = \"d1\"\n[[region.datacenter.node]]\n\
             id = 1\npeer = \"127.0.0.1:1\"\nclient = \"127.0.0.1:2\"",
            "no cells: the cluster needs at least one [[cell]]",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(&parse_error(text), expected, "{text}");
    }
}

#[test]
fn limits() {
    assert!(Topology::parse(&generated(NODES_MAX as u64, CELL_REPLICAS_MAX as u64)).is_ok());
    assert_eq!(parse_error(&generated(NODES_MAX as u64 + 1, 1)), "more than the limit of 1024 nodes");
    assert_eq!(
        parse_error(&generated(CELL_REPLICAS_MAX as u64 + 1, CELL_REPLICAS_MAX as u64 + 1)),
        "cell 1: 65 replicas is more than the limit of 64"
    );
    let mut text = small_with(&[("shards = 4", "shards = 1"), ("[\"0-1\"]", "[\"0\"]"), ("[\"2\", \"3\"]", "[]")]);
    for id in 3..=CELLS_MAX as u64 + 1 {
        text.push_str(&format!("[[cell]]\nid = {id}\nshards = []\nvoters = [1]\n"));
    }
    assert_eq!(parse_error(&text), "4097 cells is more than the limit of 4096");
    let too_large = " ".repeat(FILE_BYTES_MAX + 1);
    assert_eq!(
        parse_error(&too_large),
        format!("the topology is more than the limit of {FILE_BYTES_MAX} bytes ({} bytes read)", FILE_BYTES_MAX + 1)
    );
}

#[test]
fn shape_errors_name_line_and_field() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("voters = [1, 2, 3]", "voters = [1, 2, 3]\nweight = 3")], "unknown field `weight`"),
        (&[("shards = 4", "shards = 4\ncolour = 1")], "unknown field `colour`"),
        (&[("shards = 4", "shards = 4\n[latency]\nenabled = true")], "missing field `same_datacenter_us`"),
        (&[("voters = [1, 2]\n", "")], "missing field `voters`"),
        (&[("id = 3\npeer", "id = -3\npeer")], "line 30, column 6"),
        (&[("shards = 4", "shards = -4")], "shards"),
        (&[("shards = 4", "shards = \"4\"")], "shards"),
        (&[(r#"["2", "3"]"#, "[2, 3]")], "line 42, column 11"),
        (&[("shards = 4", "shards = 4\nshards = 5")], "duplicate key"),
    ];
    for (replacements, expected) in cases {
        let message = parse_error(&small_with(replacements));
        assert!(message.contains(expected), "{replacements:?}: {message}");
    }
}

#[test]
fn load_names_the_path() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.toml");
    let message = Topology::load(&missing).unwrap_err().to_string();
    assert!(message.starts_with(&format!("topology file {}: cannot read: ", missing.display())), "{message}");
    let bad = directory.path().join("bad.toml");
    std::fs::write(&bad, small_with(&[("shards = 4", "shards = 0")])).unwrap();
    let error = Topology::load(&bad).unwrap_err();
    let TopologyError::File { path, error: inner } = &error else { panic!("{error:?}") };
    assert_eq!(path, &bad);
    assert!(matches!(**inner, TopologyError::ShardCount { shards: 0 }), "{inner:?}");
    assert_eq!(error.to_string(), format!("topology file {}: shards = 0: must be in 1..=10000", bad.display()));
    let binary = directory.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    assert!(Topology::load(&binary).unwrap_err().to_string().contains("cannot read"));
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

#[test]
fn garbage_never_panics() {
    let fixed = [
        "\0",
        "[[[",
        "shards = ",
        "shards = 18446744073709551616",
        "[[region]]\n[[region]]",
        "[[cell]]\nid = 1\nshards = [\"0-99999999999999999999\"]\nvoters = [1]",
        "region = 1",
        "cell = \"x\"",
        "[latency]\nenabled = 1",
        "\u{feff}shards = 4",
    ];
    for text in fixed {
        let _ = Topology::parse(text);
    }
    let tokens = [
        "[[region]]",
        "[[region.datacenter]]",
        "[[region.datacenter.node]]",
        "[[cell]]",
        "[latency]",
        "name = \"a\"",
        "name = \"b\"",
        "id = 1",
        "id = 2",
        "id = 0",
        "peer = \"127.0.0.1:1\"",
        "client = \"127.0.0.1:2\"",
        "shards = 1",
        "shards = [\"0\"]",
        "shards = [\"0-0\"]",
        "voters = [1]",
        "learners = [2]",
        "leader_preference = [\"a\"]",
        "enabled = true",
        "=",
        "\"",
        "[",
        "]",
        "\n",
        "-",
        "#",
    ];
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2_000 {
        let length = random.below(30);
        let text: Vec<&str> = (0..length).map(|_| tokens[random.below(tokens.len())]).collect();
        let _ = Topology::parse(&text.join("\n"));
    }
    const MUTATIONS: &[u8] = b"0123456789-=[]\"\n ,az";
    let valid = Topology::local(7000, 3).to_toml().into_bytes();
    for _ in 0..2_000 {
        let mut bytes = valid.clone();
        for _ in 0..1 + random.below(4) {
            let position = random.below(bytes.len());
            match random.below(3) {
                0 => bytes[position] = MUTATIONS[random.below(MUTATIONS.len())],
                1 => {
                    bytes.remove(position);
                }
                _ => bytes.insert(position, MUTATIONS[random.below(MUTATIONS.len())]),
            }
        }
        if let Ok(text) = String::from_utf8(bytes) {
            if let Ok(topology) = Topology::parse(&text) {
                assert_eq!(Topology::parse(&topology.to_toml()).unwrap(), topology);
            }
        }
    }
}

#[test]
fn ledgers_defined_from_the_start_are_read_checked_and_written_back() {
    assert!(Topology::parse(SMALL).unwrap().ledgers.is_empty(), "no [[ledger]]: none defined");
    let text = format!(
        "{SMALL}\n[[ledger]]\nid = 1\nname = \"CNY\"\nasset_scale = 2\n\n[[ledger]]\nid = 840\nname = \"USD\"\nasset_scale = 2\n"
    );
    let topology = Topology::parse(&text).unwrap();
    let table = topology.initial_ledgers();
    assert_eq!(table.version(), 1);
    assert_eq!(
        table.definitions().map(|ledger| (ledger.id, ledger.name.as_str())).collect::<Vec<_>>(),
        [(1, "CNY"), (840, "USD")]
    );
    assert_eq!(Topology::parse(&topology.to_toml()).unwrap(), topology);
    assert_eq!(Topology::local(20_000, 4).initial_ledgers().get(1).map(|ledger| ledger.asset_scale), Some(2));
    let second = "id = 840\nname = \"USD\"\nasset_scale = 2";
    for (bad, expected) in [
        ("id = 840\nname = \"CNY\"\nasset_scale = 2", "ledger name CNY is already ledger 1's"),
        ("id = 1\nname = \"USD\"\nasset_scale = 2", "ledger 1 is already defined"),
        ("id = 0\nname = \"USD\"\nasset_scale = 2", "ledger id 0 is invalid"),
        ("id = 840\nname = \"US D\"\nasset_scale = 2", "name \"US D\" is invalid"),
        ("id = 840\nname = \"USD\"\nasset_scale = 30", "asset scale 30 is over the limit of 18"),
    ] {
        assert_eq!(text.matches(second).count(), 1);
        let error = Topology::parse(&text.replacen(second, bad, 1)).unwrap_err().to_string();
        assert!(error.contains(expected), "{bad:?}: {error}");
    }
}
