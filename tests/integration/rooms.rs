//! Rooms and conversations on three nodes: each room's own gapless order under concurrent
//! senders and reconnecting receivers, exactly-once per room, recovery of several rooms at once
//! from the stream and from the database, private messages across nodes, and bad requests.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chorus_testkit::{
    Client, ClientError, Delivery, Node, REDIS, TestDb, TestSettings, spawn_cluster, stop_all,
    unique,
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// A small deterministic generator, so a failing run can be repeated from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A receiver as the tutorial's client would be written for rooms: it keeps the last offset it
/// saw of each room and hands them back in `auth.rooms` (and `auth.serverOffset`) on every
/// reconnect.
struct Receiver {
    name: String,
    rooms: Vec<String>,
    /// What it saw, per room (`""` for the default room): offset and content, in arrival order.
    seen: HashMap<String, Vec<(i64, String)>>,
    client: Option<Client>,
}

impl Receiver {
    fn auth(&self) -> Value {
        let last = |room: &str| {
            self.seen
                .get(room)
                .and_then(|s| s.last())
                .map_or(0, |(o, _)| *o)
        };
        let rooms: serde_json::Map<String, Value> = self
            .rooms
            .iter()
            .map(|r| (r.clone(), json!(last(r))))
            .collect();
        json!({ "name": self.name, "serverOffset": last(""), "rooms": rooms })
    }

    async fn connect(&mut self, url: &str) {
        let client = Client::connect(url, Some(self.auth()))
            .await
            .expect("connect");
        self.client = Some(client);
    }

    /// Takes what arrived; `wait` for at most that long for the first of it.
    async fn drain(&mut self, wait: Duration) -> usize {
        let Some(client) = self.client.as_mut() else {
            return 0;
        };
        let mut n = 0;
        let mut limit = wait;
        loop {
            match client.next_delivery(limit).await {
                Ok(Delivery {
                    room,
                    content,
                    offset,
                    ..
                }) => {
                    let room = room.unwrap_or_default();
                    self.seen.entry(room).or_default().push((offset, content));
                    n += 1;
                    limit = Duration::from_millis(1);
                }
                Err(ClientError::Timeout) | Err(ClientError::Closed) => return n,
                Err(e) => panic!("receiver {}: {e}", self.name),
            }
        }
    }
}

/// Several rooms at once on three nodes: senders on every node write to random rooms while
/// receivers, each in several rooms, reconnect at random to random nodes recovering through
/// `auth.rooms`. Per room, every receiver sees every message once, in offset order with no
/// gap, and all of them the same message at each offset, which is the one the store holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_room_keeps_one_gapless_order_under_concurrent_senders_and_reconnects() {
    let seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rng = Rng(seed);
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("rooms")).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let rooms = ["north", "south", "east", "west"];

    let mut receivers = Vec::new();
    for r in 0..4 {
        let mine: Vec<String> = (0..3)
            .map(|k| rooms[(r + k) % rooms.len()].to_owned())
            .collect();
        let mut receiver = Receiver {
            name: format!("reader{r}"),
            rooms: mine.clone(),
            seen: HashMap::new(),
            client: None,
        };
        receiver.connect(&urls[r % 3]).await;
        for room in &mine {
            let ack = receiver
                .client
                .as_ref()
                .expect("connected")
                .join(room, Some(0))
                .await;
            ack.assert_ok();
            assert_eq!(ack.field("room"), Some(&json!(room)));
        }
        receivers.push(receiver);
    }

    // Six senders, two per node, each in every room, sending with client offsets and retrying
    // until acked, as the tutorial's client does.
    let per_sender = 150;
    let mut senders = Vec::new();
    for s in 0..6 {
        let url = urls[s % 3].clone();
        let order: Vec<usize> = (0..per_sender).map(|_| rng.below(rooms.len())).collect();
        senders.push(tokio::spawn(async move {
            let client = Client::connect(&url, Some(json!({ "name": format!("sender{s}") })))
                .await
                .expect("connect");
            for room in rooms {
                client.join(room, None).await.assert_ok();
            }
            let mut acked: Vec<(String, i64, String)> = Vec::new();
            for (i, pick) in order.into_iter().enumerate() {
                let room = rooms[pick];
                let content = format!("s{s}-{i}");
                let offset = format!("s{s}-o{i}");
                let ack = client
                    .try_send_to(room, &content, Some(&offset), T)
                    .await
                    .unwrap_or_else(|e| panic!("sender {s}: {e}"));
                ack.assert_ok();
                assert_eq!(ack.field("room"), Some(&json!(room)));
                acked.push((room.to_owned(), ack.offset(), content));
            }
            client.close().await;
            acked
        }));
    }

    // Meanwhile receivers read, and now and then one drops its connection and comes back on a
    // random node with what it saw.
    let (mut rounds, mut reconnects) = (0, 0);
    while senders.iter().any(|s| !s.is_finished()) {
        rounds += 1;
        let who = rng.below(receivers.len());
        for receiver in receivers.iter_mut() {
            receiver.drain(Duration::from_millis(5)).await;
        }
        {
            reconnects += 1;
            let receiver = &mut receivers[who];
            if let Some(client) = receiver.client.take() {
                client.close().await;
            }
            let url = &urls[rng.below(urls.len())];
            receiver.connect(url).await;
        }
        assert!(rounds < 5_000, "senders did not finish (seed {seed:#x})");
    }
    assert!(
        reconnects >= 10,
        "only {reconnects} reconnects happened while the senders ran"
    );
    let mut acked: BTreeMap<String, BTreeMap<i64, String>> = BTreeMap::new();
    for sender in senders {
        for (room, offset, content) in sender.await.expect("sender") {
            let previous = acked
                .entry(room.clone())
                .or_default()
                .insert(offset, content);
            assert!(previous.is_none(), "two acks for offset {offset} of {room}");
        }
    }

    // Every room's acked offsets are exactly 1..=n.
    for (room, messages) in &acked {
        let offsets: Vec<i64> = messages.keys().copied().collect();
        assert_eq!(
            offsets,
            (1..=messages.len() as i64).collect::<Vec<_>>(),
            "{room}"
        );
    }
    // Each receiver catches up, then holds exactly the room's order.
    for receiver in receivers.iter_mut() {
        for _ in 0..200 {
            let complete = receiver
                .rooms
                .iter()
                .all(|room| receiver.seen.get(room).map_or(0, Vec::len) >= acked[room].len());
            if complete {
                break;
            }
            receiver.drain(Duration::from_millis(50)).await;
        }
        for room in &receiver.rooms {
            let seen = receiver.seen.get(room).cloned().unwrap_or_default();
            let expected: Vec<(i64, String)> =
                acked[room].iter().map(|(o, c)| (*o, c.clone())).collect();
            assert_eq!(
                seen, expected,
                "{} in {room}: lost, duplicated, reordered or divergent (seed {seed:#x})",
                receiver.name
            );
        }
        assert!(
            !receiver
                .seen
                .keys()
                .any(|r| !r.is_empty() && !receiver.rooms.contains(r)),
            "{} got messages of a room it is not in",
            receiver.name
        );
    }
    // And the store holds each message once, where it was acked.
    let mut conn = db.connect().await;
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("select room, id, content from room_messages order by room, id")
            .fetch_all(&mut conn)
            .await
            .expect("rows");
    let stored: BTreeMap<String, BTreeMap<i64, String>> =
        rows.into_iter().fold(BTreeMap::new(), |mut m, (r, o, c)| {
            m.entry(r).or_default().insert(o, c);
            m
        });
    assert_eq!(stored, acked, "the store holds what was acked, once");
    for receiver in receivers {
        if let Some(client) = receiver.client {
            client.close().await;
        }
    }
    stop_all(nodes).await;
}

/// A message is its room, client offset and content: a retry in the same room (through another
/// node) is acked with the offset it got, the same send in another room is another message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_stored_once_per_room() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("once")).await;
    let mut clients = Vec::new();
    for node in &nodes {
        let client = Client::connect(&node.url, Some(json!({ "name": "Ada" })))
            .await
            .expect("connect");
        client.join("a", None).await.assert_ok();
        client.join("b", None).await.assert_ok();
        clients.push(client);
    }
    let first = clients[0].send_to(Some("a"), "hello", Some("o-1")).await;
    let retry = clients[1].send_to(Some("a"), "hello", Some("o-1")).await;
    let elsewhere = clients[2].send_to(Some("b"), "hello", Some("o-1")).await;
    let default_room = clients[2].send_to(None, "hello", Some("o-1")).await;
    assert_eq!((first.offset(), retry.offset()), (1, 1));
    assert_eq!(elsewhere.offset(), 1);
    assert_eq!(elsewhere.field("room"), Some(&json!("b")));
    assert_eq!(default_room.field("room"), Some(&Value::Null));
    let second = clients[0].send_to(Some("a"), "again", Some("o-2")).await;
    assert_eq!(second.offset(), 2);
    let mut conn = db.connect().await;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select room, count(*) from room_messages group by room order by room")
            .fetch_all(&mut conn)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        [("".to_owned(), 1), ("a".to_owned(), 2), ("b".to_owned(), 1)]
    );
    for client in clients {
        client.close().await;
    }
    stop_all(nodes).await;
}

/// Reads `n` deliveries and groups them by room, checking each room's are consecutive from
/// `after + 1`.
async fn read_rooms(client: &mut Client, n: usize) -> BTreeMap<String, Vec<i64>> {
    let mut by_room: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for i in 0..n {
        let delivery = client
            .next_delivery(T)
            .await
            .unwrap_or_else(|e| panic!("delivery {i} of {n}: {e}"));
        by_room
            .entry(delivery.room.unwrap_or_default())
            .or_default()
            .push(delivery.offset);
    }
    by_room
}

/// A client in three rooms goes away while each room gets 40 messages; coming back with
/// `auth.rooms` it gets the missed messages of every room, in order, once: from the recovery
/// stream on another node of the cluster, and from the database on a node without Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_rooms_are_recovered_at_once_from_the_stream_and_from_the_database() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(2, &db, REDIS, &unique("rooms-recovery")).await;
    let rooms = ["r1", "r2", "r3"];
    let writer = Client::connect(&nodes[0].url, Some(json!({ "name": "w" })))
        .await
        .expect("connect");
    for room in rooms {
        writer.join(room, None).await.assert_ok();
        writer
            .send_to(Some(room), "first", Some(&format!("{room}-0")))
            .await
            .assert_ok();
    }
    // Gone after the first message of each room.
    let auth = json!({ "rooms": { "r1": 1, "r2": 1, "r3": 1 } });
    for i in 1..=40 {
        for room in rooms {
            writer
                .send_to(Some(room), &format!("m{i}"), Some(&format!("{room}-{i}")))
                .await
                .assert_ok();
        }
    }
    let expected: BTreeMap<String, Vec<i64>> = rooms
        .iter()
        .map(|r| (r.to_string(), (2..=41).collect()))
        .collect();

    let stream_reads = nodes[1]
        .metric("chorus_replays_total{source=\"log\"}")
        .await;
    let mut back = Client::connect(&nodes[1].url, Some(auth.clone()))
        .await
        .expect("connect");
    let mut got = read_rooms(&mut back, 120).await;
    got.remove("");
    assert_eq!(
        got, expected,
        "every room's missed messages, in order, once"
    );
    assert!(
        nodes[1]
            .metric("chorus_replays_total{source=\"log\"}")
            .await
            > stream_reads,
        "recovered from the stream"
    );
    back.close().await;

    let single = Node::start(TestSettings::new(&db).build()).await;
    let mut from_db = Client::connect(&single.url, Some(auth))
        .await
        .expect("connect");
    let mut got = read_rooms(&mut from_db, 120).await;
    got.remove("");
    assert_eq!(got, expected, "the same from the database");
    assert!(
        single
            .metric("chorus_replays_total{source=\"database\"}")
            .await
            > 0.0,
        "recovered from the database"
    );
    from_db.close().await;
    single.stop().await;
    writer.close().await;
    stop_all(nodes).await;
}

/// Ada on one node writes to Bob, who has sockets on the two others; all of Bob's sockets and
/// Ada's own get the conversation's messages, nobody else does. Bob goes away, Ada keeps
/// writing, and Bob back on another node with `auth.rooms` gets what he missed, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_reaches_both_people_on_every_node_and_survives_reconnects() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("private")).await;
    let named = |name: &str| Some(json!({ "name": name }));
    let mut ada = Client::connect(&nodes[0].url, named("Ada"))
        .await
        .expect("connect");
    let mut bob = Client::connect(&nodes[1].url, named("Bob"))
        .await
        .expect("connect");
    let mut bob_phone = Client::connect(&nodes[2].url, named("Bob"))
        .await
        .expect("connect");
    let mut cy = Client::connect(&nodes[2].url, named("Cy"))
        .await
        .expect("connect");
    let room = "@Ada|Bob";

    let ack = ada.send_private("Bob", "hi Bob", Some("a-1")).await;
    ack.assert_ok();
    assert_eq!((ack.field("room"), ack.offset()), (Some(&json!(room)), 1));
    let reply = bob.send_private("Ada", "hi Ada", Some("b-1")).await;
    assert_eq!(reply.offset(), 2);
    for client in [&mut ada, &mut bob, &mut bob_phone] {
        let got: Vec<(Option<String>, String, i64, String)> = [
            client.next_delivery(T).await.expect("first"),
            client.next_delivery(T).await.expect("second"),
        ]
        .into_iter()
        .map(|d| (d.room, d.content, d.offset, d.sender))
        .collect();
        assert_eq!(
            got,
            [
                (Some(room.into()), "hi Bob".into(), 1, "Ada".into()),
                (Some(room.into()), "hi Ada".into(), 2, "Bob".into()),
            ]
        );
    }
    // Cy may not join or write to it, and got nothing.
    assert_eq!(
        cy.join(room, Some(0)).await.error_code(),
        Some("not_a_member")
    );
    assert_eq!(
        cy.send_to(Some(room), "me too", None).await.error_code(),
        Some("not_a_member")
    );
    assert!(
        matches!(
            cy.next_delivery(Duration::from_millis(300)).await,
            Err(ClientError::Timeout)
        ),
        "Cy got a message of a conversation not his"
    );

    bob.close().await;
    bob_phone.close().await;
    for i in 3..=7 {
        let ack = ada
            .send_private("Bob", &format!("m{i}"), Some(&format!("a-{i}")))
            .await;
        assert_eq!(ack.offset(), i);
    }
    let mut bob = Client::connect(
        &nodes[2].url,
        Some(json!({ "name": "Bob", "rooms": { room: 2 } })),
    )
    .await
    .expect("connect");
    let mut seen = Vec::new();
    for _ in 3..=7 {
        let d = bob.next_delivery(T).await.expect("missed message");
        assert_eq!(d.room.as_deref(), Some(room));
        seen.push((d.offset, d.content));
    }
    assert_eq!(
        seen,
        (3..=7).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>()
    );
    // A socket that does not name the conversation gets its newest history.
    let mut laptop = Client::connect(&nodes[0].url, named("Bob"))
        .await
        .expect("connect");
    let history: Vec<i64> = {
        let mut offsets = Vec::new();
        for _ in 1..=7 {
            offsets.push(laptop.next_delivery(T).await.expect("history").offset);
        }
        offsets
    };
    assert_eq!(history, (1..=7).collect::<Vec<_>>());
    // Live again, to every socket of both.
    ada.send_private("Bob", "last", Some("a-8"))
        .await
        .assert_ok();
    for client in [&mut bob, &mut laptop] {
        let d = client.next_delivery(T).await.expect("live");
        assert_eq!((d.offset, d.content.as_str()), (8, "last"));
    }
    for c in [ada, bob, laptop, cy] {
        c.close().await;
    }
    stop_all(nodes).await;
}

/// Every request about rooms that cannot be served is refused with a code that says why, and
/// changes nothing; a bad `auth.rooms` refuses the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_room_requests_are_refused_with_a_reason() {
    let db = TestDb::new().await;
    let node = Node::start(
        TestSettings::new(&db)
            .set("CHORUS__LIMITS__MAX_ROOMS_PER_SOCKET", "2")
            .build(),
    )
    .await;
    let ada = Client::connect(&node.url, Some(json!({ "name": "Ada" })))
        .await
        .expect("connect");
    let anonymous = Client::connect(&node.url, None).await.expect("connect");
    let cases: Vec<(Value, &str)> = vec![
        (json!(["join", "", null]), "invalid_room"),
        (json!(["join", "x".repeat(65), null]), "invalid_room"),
        (json!(["join", "a\u{1}b", null]), "invalid_room"),
        (json!(["join", 7, null]), "invalid_room"),
        (json!(["join", "@Ada", null]), "invalid_room"),
        (json!(["join", "@Bob|Cy", null]), "not_a_member"),
        (json!(["join", "lobby", -1]), "invalid_offset"),
        (json!(["join", "lobby", 5]), "invalid_offset"),
        (json!(["leave", null]), "invalid_room"),
        (json!(["leave", "@Ada|Bob"]), "invalid_room"),
        (json!(["room message", "lobby", "hi"]), "not_a_member"),
        (json!(["room message", "lobby", 5]), "not_a_member"),
        (json!(["private message", "Ada", "hi"]), "invalid_recipient"),
        (json!(["private message", "@x", "hi"]), "invalid_recipient"),
        (json!(["private message", 7, "hi"]), "invalid_recipient"),
        (json!(["private message", "Bob", ""]), "empty_content"),
    ];
    for (request, code) in cases {
        let args = request.as_array().expect("array");
        let event = args[0].as_str().expect("event");
        let ack = ada.request(event, args[1..].to_vec()).await;
        assert_eq!(ack.error_code(), Some(code), "{request}: {:?}", ack.args());
    }
    assert_eq!(
        anonymous.send_private("Ada", "hi", None).await.error_code(),
        Some("no_name")
    );
    ada.join("one", None).await.assert_ok();
    ada.join("two", None).await.assert_ok();
    ada.join("two", None).await.assert_ok();
    assert_eq!(
        ada.join("three", None).await.error_code(),
        Some("too_many_rooms")
    );
    ada.leave("one").await.assert_ok();
    ada.join("three", None).await.assert_ok();
    assert_eq!(
        ada.send_to(Some("one"), "hi", None).await.error_code(),
        Some("not_a_member"),
        "left"
    );
    let mut conn = db.connect().await;
    let stored: i64 = sqlx::query_scalar("select count(*) from room_messages")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(stored, 0, "nothing refused was stored");

    for (auth, says) in [
        (json!({ "rooms": [1] }), "auth.rooms"),
        (json!({ "rooms": { "": 0 } }), "auth.rooms"),
        (json!({ "rooms": { "a": -1 } }), "auth.rooms"),
        (json!({ "rooms": { "a": "1" } }), "auth.rooms"),
        (json!({ "rooms": { "a": 9 } }), "ahead"),
        (json!({ "rooms": { "a": 0, "b": 0, "c": 0 } }), "at most 2"),
        (
            json!({ "name": "Cy", "rooms": { "@Ada|Bob": 0 } }),
            "not a conversation of yours",
        ),
    ] {
        match Client::connect(&node.url, Some(auth.clone())).await {
            Err(ClientError::ConnectRejected(message)) => {
                assert!(message.contains(says), "{auth}: {message}")
            }
            other => panic!(
                "{auth} was not refused: {:?}",
                other.map(|c| c.sid().to_owned())
            ),
        }
    }
    ada.close().await;
    anonymous.close().await;
    node.stop().await;
}
