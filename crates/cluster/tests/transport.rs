//! Transport tests over real sockets on 127.0.0.1.
//!
//! Every test drives the transport from the plain test thread (as the
//! consensus code does) and runs it on its own small runtime. Timing
//! assertions are lower bounds only; waits poll with a generous deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellpay_cluster::transport::{
    Deliver, NodeId, PeerConfig, SendError, Transport, TransportConfig, TransportError, FRAME_HEADER_BYTES,
    HANDSHAKE_MAGIC, PROTOCOL_VERSION,
};

/// Long enough for anything that should happen "soon" on a loaded machine.
const WAIT_MAX: Duration = Duration::from_secs(5);

/// A received message and when it arrived.
type Received = (NodeId, Vec<u8>, Instant);

struct Node {
    transport: Transport,
    inbox: mpsc::Receiver<Received>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A deliver callback that forwards into a channel (and accepts everything).
fn channel_deliver() -> (Deliver, mpsc::Receiver<Received>) {
    let (sender, receiver) = mpsc::channel();
    let deliver: Deliver = Arc::new(move |from, payload| {
        let _ = sender.send((from, payload, Instant::now()));
        true
    });
    (deliver, receiver)
}

/// Starts one transport per id, all peers of each other, with `adjust`
/// applied to each configuration.
fn cluster(runtime: &tokio::runtime::Runtime, ids: &[NodeId], adjust: impl Fn(&mut TransportConfig)) -> Vec<Node> {
    let listeners: Vec<TcpListener> = ids.iter().map(|_| bind()).collect();
    let addresses: Vec<SocketAddr> = listeners.iter().map(|listener| listener.local_addr().unwrap()).collect();
    ids.iter()
        .zip(listeners)
        .map(|(&id, listener)| {
            let peers = ids
                .iter()
                .zip(&addresses)
                .filter(|(&peer, _)| peer != id)
                .map(|(&peer, &address)| PeerConfig { id: peer, address, one_way_delay: Duration::ZERO })
                .collect();
            let mut config = TransportConfig::new(id, listener.local_addr().unwrap(), peers);
            config.reconnect_delay_max = Duration::from_millis(100);
            adjust(&mut config);
            let (deliver, inbox) = channel_deliver();
            let transport = Transport::start_with_listener(config, listener, deliver, runtime.handle()).unwrap();
            Node { transport, inbox }
        })
        .collect()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < WAIT_MAX, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn receive(node: &Node) -> Received {
    node.inbox.recv_timeout(WAIT_MAX).expect("a message within the wait limit")
}

fn sequence_message(sequence: u64) -> Vec<u8> {
    sequence.to_le_bytes().to_vec()
}

fn sequence_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload.try_into().expect("an 8-byte sequence message"))
}

/// An address nothing listens on (bound, then released).
fn unused_address() -> SocketAddr {
    bind().local_addr().unwrap()
}

/// A raw client connection that reads with a timeout.
fn raw_connection(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(WAIT_MAX)).unwrap();
    stream
}

/// Whether the server closed the raw connection (EOF or reset, not timeout).
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buffer = [0u8; 16];
    match stream.read(&mut buffer) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => !matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

fn handshake(from: NodeId, to: NodeId) -> Vec<u8> {
    let mut bytes = HANDSHAKE_MAGIC.to_vec();
    bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    bytes.extend_from_slice(&from.to_le_bytes());
    bytes.extend_from_slice(&to.to_le_bytes());
    bytes
}

#[test]
fn transport_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Transport>();
}

#[test]
fn transport_two_nodes_exchange_many_messages_in_order_both_ways() {
    let runtime = runtime();
    let nodes = cluster(&runtime, &[1, 2], |_| {});
    let count = 20_000u64;
    for sequence in 0..count {
        nodes[0].transport.send(2, sequence_message(sequence)).unwrap();
        nodes[1].transport.send(1, sequence_message(sequence)).unwrap();
    }
    for (node, from) in [(&nodes[1], 1), (&nodes[0], 2)] {
        for expected in 0..count {
            let (sender, payload, _) = receive(node);
            assert_eq!(sender, from);
            assert_eq!(sequence_of(&payload), expected);
        }
    }
    let stats = nodes[0].transport.stats(2).unwrap();
    assert_eq!(stats.messages_sent, count);
    assert_eq!(stats.bytes_sent, 8 * count);
    assert_eq!(stats.messages_received, count);
    assert!(stats.flushes >= 1 && stats.flushes <= count);
    assert!(nodes[0].transport.peer_connected(2));
}

#[test]
fn transport_three_nodes_each_receive_every_peer_in_order() {
    let runtime = runtime();
    let ids = [1, 2, 3];
    let nodes = cluster(&runtime, &ids, |_| {});
    let count = 2_000u64;
    for sequence in 0..count {
        for (node, &id) in nodes.iter().zip(&ids) {
            for &to in ids.iter().filter(|&&to| to != id) {
                node.transport.send(to, sequence_message(sequence)).unwrap();
            }
        }
    }
    for (node, &id) in nodes.iter().zip(&ids) {
        let mut next_by_sender = std::collections::HashMap::new();
        for _ in 0..2 * count {
            let (from, payload, _) = receive(node);
            assert_ne!(from, id);
            let next = next_by_sender.entry(from).or_insert(0u64);
            assert_eq!(sequence_of(&payload), *next, "node {id} from {from}");
            *next += 1;
        }
        assert!(next_by_sender.values().all(|&next| next == count));
    }
}

#[test]
fn transport_emulated_delay_is_respected() {
    let runtime = runtime();
    let delay = Duration::from_millis(60);
    let nodes = cluster(&runtime, &[1, 2], |config| {
        if config.node == 1 {
            config.peers[0].one_way_delay = delay;
        }
    });
    wait_until("node 1 is connected to node 2", || nodes[0].transport.peer_connected(2));
    for sequence in 0..5 {
        let sent_at = Instant::now();
        nodes[0].transport.send(2, sequence_message(sequence)).unwrap();
        let (_, payload, received_at) = receive(&nodes[1]);
        assert_eq!(sequence_of(&payload), sequence);
        assert!(received_at - sent_at >= delay, "delivered after {:?}", received_at - sent_at);
    }
    // The other direction has no delay configured, and a delay can be changed live.
    assert_eq!(nodes[1].transport.one_way_delay(1), Some(Duration::ZERO));
    let delay_changed = Duration::from_millis(30);
    nodes[1].transport.set_one_way_delay(1, delay_changed);
    let sent_at = Instant::now();
    nodes[1].transport.send(1, sequence_message(7)).unwrap();
    let (_, _, received_at) = receive(&nodes[0]);
    assert!(received_at - sent_at >= delay_changed);
}

#[test]
fn transport_queue_fills_while_peer_is_down_then_drains_after_reconnect() {
    let runtime = runtime();
    let address_of_2 = unused_address();
    let peers = vec![PeerConfig { id: 2, address: address_of_2, one_way_delay: Duration::ZERO }];
    let mut config = TransportConfig::new(1, "127.0.0.1:0".parse().unwrap(), peers);
    config.queue_bytes_max = 1000;
    config.message_bytes_max = 100;
    config.reconnect_delay_max = Duration::from_millis(50);
    let (deliver, _inbox) = channel_deliver();
    let node_1 = Transport::start(config, deliver, runtime.handle()).unwrap();

    for sequence in 0..10u8 {
        node_1.send(2, vec![sequence; 100]).unwrap();
    }
    assert_eq!(node_1.send(2, vec![0; 1]), Err(SendError::QueueFull { queued_bytes: 1000, max: 1000 }));
    let stats = node_1.stats(2).unwrap();
    assert_eq!((stats.queued_messages, stats.queued_bytes, stats.messages_dropped_queue_full), (10, 1000, 1));
    assert!(!node_1.peer_connected(2));

    let peers = vec![PeerConfig { id: 1, address: node_1.local_address(), one_way_delay: Duration::ZERO }];
    let (deliver, inbox_2) = channel_deliver();
    let node_2 = Transport::start(TransportConfig::new(2, address_of_2, peers), deliver, runtime.handle()).unwrap();
    let node_2 = Node { transport: node_2, inbox: inbox_2 };
    for sequence in 0..10u8 {
        let (from, payload, _) = receive(&node_2);
        assert_eq!((from, payload), (1, vec![sequence; 100]));
    }
    wait_until("the queue is empty", || node_1.stats(2).unwrap().queued_bytes == 0);
    let stats = node_1.stats(2).unwrap();
    assert_eq!(stats.messages_sent, 10);
    // All ten were due when the connection came up: coalesced into few flushes.
    assert!(stats.flushes < 10, "{stats:?}");
    assert!(stats.connects >= 1);
    node_1.send(2, vec![42; 100]).unwrap();
    assert_eq!(receive(&node_2).1, vec![42; 100]);
}

#[test]
fn transport_refuses_too_large_and_unknown_peer() {
    let runtime = runtime();
    let nodes = cluster(&runtime, &[1, 2], |config| config.message_bytes_max = 1024);
    assert_eq!(nodes[0].transport.send(2, vec![0; 1025]), Err(SendError::TooLarge { bytes: 1025, max: 1024 }));
    assert_eq!(nodes[0].transport.send(9, vec![0; 1]), Err(SendError::UnknownPeer));
    assert_eq!(nodes[0].transport.send(1, vec![0; 1]), Err(SendError::UnknownPeer));
    assert!(nodes[0].transport.stats(9).is_none());
    nodes[0].transport.send(2, vec![7; 1024]).unwrap();
    assert_eq!(receive(&nodes[1]).1, vec![7; 1024]);
}

#[test]
fn transport_start_reports_bad_configuration_and_address() {
    let runtime = runtime();
    let (deliver, _inbox) = channel_deliver();
    let taken = bind();
    let config = TransportConfig::new(1, taken.local_addr().unwrap(), Vec::new());
    let error = Transport::start(config, deliver.clone(), runtime.handle()).unwrap_err();
    assert!(matches!(error, TransportError::Bind { .. }), "{error}");
    assert!(error.to_string().contains(&taken.local_addr().unwrap().to_string()), "{error}");

    let peers = vec![PeerConfig { id: 1, address: unused_address(), one_way_delay: Duration::ZERO }];
    let config = TransportConfig::new(1, "127.0.0.1:0".parse().unwrap(), peers);
    let error = Transport::start(config, deliver, runtime.handle()).unwrap_err();
    assert!(matches!(error, TransportError::SelfAsPeer { node: 1 }), "{error}");
}

#[test]
fn transport_blocked_link_drops_both_directions_and_recovers() {
    let runtime = runtime();
    let nodes = cluster(&runtime, &[1, 2], |_| {});
    wait_until("both are connected", || nodes[0].transport.peer_connected(2) && nodes[1].transport.peer_connected(1));

    nodes[0].transport.set_blocked(2, true);
    assert!(nodes[0].transport.is_blocked(2));
    assert_eq!(nodes[0].transport.send(2, sequence_message(0)), Err(SendError::Blocked));
    wait_until("the blocked outbound link is closed", || !nodes[0].transport.peer_connected(2));
    // Node 2 does not know of the cut: its messages reach node 1 and are dropped there.
    for sequence in 0..5 {
        nodes[1].transport.send(1, sequence_message(sequence)).unwrap();
    }
    wait_until("node 1 dropped node 2's messages", || {
        nodes[0].transport.stats(2).unwrap().messages_dropped_blocked == 1 + 5
    });
    assert!(nodes[0].inbox.try_recv().is_err());

    nodes[0].transport.set_blocked(2, false);
    wait_until("the link is back", || nodes[0].transport.peer_connected(2));
    nodes[0].transport.send(2, sequence_message(100)).unwrap();
    nodes[1].transport.send(1, sequence_message(200)).unwrap();
    assert_eq!(sequence_of(&receive(&nodes[1]).1), 100);
    assert_eq!(sequence_of(&receive(&nodes[0]).1), 200);
    assert!(nodes[1].inbox.try_recv().is_err(), "the message refused while blocked never arrives");
}

#[test]
fn transport_bad_connections_are_closed_without_harming_the_real_peer() {
    let runtime = runtime();
    // Frames with a valid handshake impersonate node 3 (which would
    // supersede node 3's own connection); node 1's link must stay untouched.
    let nodes = cluster(&runtime, &[1, 2, 3], |config| config.message_bytes_max = 1024);
    let address = nodes[1].transport.local_address();
    wait_until("node 1 is connected", || nodes[0].transport.peer_connected(2));

    // Not our protocol at all.
    let mut garbage = raw_connection(address);
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed_by_server(&mut garbage));

    // Right magic, wrong version.
    let mut wrong_version = raw_connection(address);
    let mut bytes = handshake(1, 2);
    bytes[4] = 99;
    wrong_version.write_all(&bytes).unwrap();
    assert!(closed_by_server(&mut wrong_version));

    // A sender that is not a peer, and a handshake meant for another node.
    for (from, to) in [(7, 2), (1, 4)] {
        let mut stranger = raw_connection(address);
        stranger.write_all(&handshake(from, to)).unwrap();
        assert!(closed_by_server(&mut stranger));
    }

    // A valid handshake, then a frame with a bad checksum.
    let mut corrupt = raw_connection(address);
    let mut bytes = handshake(3, 2);
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(b"abc").wrapping_add(1).to_le_bytes());
    bytes.extend_from_slice(b"abc");
    corrupt.write_all(&bytes).unwrap();
    assert!(closed_by_server(&mut corrupt));

    // A valid handshake, then a frame longer than the limit.
    let mut oversize = raw_connection(address);
    let mut bytes = handshake(3, 2);
    bytes.extend_from_slice(&1025u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    oversize.write_all(&bytes).unwrap();
    assert!(closed_by_server(&mut oversize));
    assert_eq!(bytes.len(), 24 + FRAME_HEADER_BYTES);

    assert!(nodes[1].inbox.try_recv().is_err(), "nothing from the bad connections was delivered");
    assert!(nodes[0].transport.peer_connected(2));
    nodes[0].transport.send(2, sequence_message(5)).unwrap();
    assert_eq!(sequence_of(&receive(&nodes[1]).1), 5);
    assert_eq!(nodes[0].transport.stats(2).unwrap().connects, 1, "the real link was never disturbed");
}

#[test]
fn transport_newer_connection_from_a_peer_supersedes_the_older() {
    let runtime = runtime();
    let nodes = cluster(&runtime, &[1, 2], |_| {});
    let address = nodes[1].transport.local_address();
    wait_until("node 1 is connected", || nodes[0].transport.peer_connected(2));

    // A raw client with node 1's handshake: its messages are delivered, and
    // node 1's own (older) connection is closed.
    let mut newer = raw_connection(address);
    let mut bytes = handshake(1, 2);
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(b"raw").to_le_bytes());
    bytes.extend_from_slice(b"raw");
    newer.write_all(&bytes).unwrap();
    let (from, payload, _) = receive(&nodes[1]);
    assert_eq!((from, payload), (1, b"raw".to_vec()));

    // Node 1 sees its connection closed, reconnects, and so supersedes the raw one.
    wait_until("node 1 reconnected", || nodes[0].transport.stats(2).unwrap().connects >= 2);
    assert!(closed_by_server(&mut newer));
    wait_until("node 1 is connected", || nodes[0].transport.peer_connected(2));
    nodes[0].transport.send(2, sequence_message(9)).unwrap();
    assert_eq!(sequence_of(&receive(&nodes[1]).1), 9);
}

#[test]
fn transport_bounds_inbound_connections() {
    let runtime = runtime();
    let nodes = cluster(&runtime, &[1, 2], |_| {});
    let address = nodes[1].transport.local_address();
    wait_until("node 1 is connected", || nodes[1].transport.inbound_connections() == 1);
    let max = 2 + 8;
    let idle: Vec<TcpStream> = (0..max + 5).map(|_| raw_connection(address)).collect();
    wait_until("the bound is reached", || nodes[1].transport.inbound_connections() == max);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(nodes[1].transport.inbound_connections(), max);
    drop(idle);
    wait_until("the idle connections are released", || nodes[1].transport.inbound_connections() == 1);
    nodes[0].transport.send(2, sequence_message(1)).unwrap();
    assert_eq!(sequence_of(&receive(&nodes[1]).1), 1);
}

#[test]
fn transport_counts_messages_refused_by_a_full_inbox() {
    let runtime = runtime();
    let listeners = [bind(), bind()];
    let addresses = [listeners[0].local_addr().unwrap(), listeners[1].local_addr().unwrap()];
    let [listener_1, listener_2] = listeners;
    let peer = |id, address| vec![PeerConfig { id, address, one_way_delay: Duration::ZERO }];
    let (deliver, _inbox) = channel_deliver();
    let config_1 = TransportConfig::new(1, addresses[0], peer(2, addresses[1]));
    let node_1 = Transport::start_with_listener(config_1, listener_1, deliver, runtime.handle()).unwrap();
    let refusing: Deliver = Arc::new(|_, _| false);
    let config_2 = TransportConfig::new(2, addresses[1], peer(1, addresses[0]));
    let node_2 = Transport::start_with_listener(config_2, listener_2, refusing, runtime.handle()).unwrap();

    for sequence in 0..50 {
        node_1.send(2, sequence_message(sequence)).unwrap();
    }
    wait_until("all are counted as dropped", || node_2.stats(1).unwrap().messages_dropped_inbox_full == 50);
    assert_eq!(node_2.stats(1).unwrap().messages_received, 0);
    assert_eq!(node_1.stats(2).unwrap().messages_sent, 50);
}

#[test]
fn transport_shutdown_stops_everything() {
    let runtime = runtime();
    let mut nodes = cluster(&runtime, &[1, 2], |_| {});
    wait_until("both are connected", || nodes[0].transport.peer_connected(2) && nodes[1].transport.peer_connected(1));
    let address_of_1 = nodes[0].transport.local_address();
    nodes[0].transport.set_one_way_delay(2, Duration::from_secs(5));
    nodes[0].transport.send(2, sequence_message(1)).unwrap();

    nodes[0].transport.shutdown();
    nodes[0].transport.shutdown();
    assert_eq!(nodes[0].transport.send(2, sequence_message(2)), Err(SendError::ShutDown));
    assert!(!nodes[0].transport.peer_connected(2));
    assert_eq!(nodes[0].transport.stats(2).unwrap().queued_messages, 0, "pending messages are dropped");
    wait_until("node 2 sees its link to node 1 go down", || !nodes[1].transport.peer_connected(1));
    wait_until("node 1 no longer accepts connections", || TcpStream::connect(address_of_1).is_err());

    // A message node 2 sends now goes nowhere: it waits in the queue.
    nodes[1].transport.send(1, sequence_message(3)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(nodes[0].inbox.try_recv().is_err());
    assert!(nodes[1].inbox.try_recv().is_err(), "the delayed message was dropped at shutdown");

    // Dropping a transport shuts it down too.
    let node_2 = nodes.pop().unwrap();
    let address_of_2 = node_2.transport.local_address();
    drop(node_2.transport);
    wait_until("node 2 no longer accepts connections", || TcpStream::connect(address_of_2).is_err());
}
