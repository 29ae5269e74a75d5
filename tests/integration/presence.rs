//! Presence and typing across nodes: `who` sees everyone in a room on any node, `joined` and
//! `left` fire on a person's first and last socket, a node killed with SIGKILL takes its people
//! out within the presence timeout, and `typing` reaches the room's other members, limited.

use std::time::{Duration, Instant};

use chorus_testkit::{
    Client, ClientError, Node, NodeSetup, ProcNode, REDIS, TestDb, TestSettings, free_port,
    spawn_cluster, stop_all, unique,
};
use serde_json::json;

use crate::support::next_about;

fn people(ack: &chorus_testkit::Ack) -> Vec<String> {
    ack.assert_ok();
    serde_json::from_value(ack.field("people").cloned().expect("people")).expect("names")
}

async fn named(url: &str, name: &str) -> Client {
    Client::connect(url, Some(json!({ "name": name })))
        .await
        .expect("connect")
}

/// Three people on three nodes in one room: each sees the others arrive, `who` lists them
/// from any node, a person's second socket announces nothing and neither does leaving with one
/// socket still there, the last one leaving is `left`, and typing reaches the others (not the
/// typist), a conversation's other person, at a bounded rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_reach_every_node() {
    let db = TestDb::new().await;
    let nodes = spawn_cluster(3, &db, REDIS, &unique("presence")).await;
    let mut ada = named(&nodes[0].url, "Ada").await;
    ada.join("lobby", None).await.assert_ok();
    // A joiner's room gets its `joined`, the joiner included.
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Ada")])
    );
    let mut bob = named(&nodes[1].url, "Bob").await;
    bob.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Bob")])
    );
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Bob")])
    );
    let mut cy = named(&nodes[2].url, "Cy").await;
    cy.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Cy")])
    );
    assert_eq!(people(&cy.who(Some("lobby")).await), ["Ada", "Bob", "Cy"]);
    assert_eq!(people(&ada.who(None).await), ["Ada", "Bob", "Cy"]);

    // Ada's second socket, on Cy's node: no second `joined`. Cy's typing, sent after it from
    // the same node, reaches Bob first.
    let ada_phone = named(&nodes[2].url, "Ada").await;
    ada_phone.join("lobby", None).await.assert_ok();
    cy.typing(Some("lobby"), true).await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        (
            "typing".into(),
            vec![json!("lobby"), json!("Cy"), json!(true)]
        )
    );
    // One of Ada's two sockets leaves: she is still there.
    ada.leave("lobby").await.assert_ok();
    cy.typing(Some("lobby"), false).await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        (
            "typing".into(),
            vec![json!("lobby"), json!("Cy"), json!(false)]
        )
    );
    ada_phone.leave("lobby").await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        ("left".into(), vec![json!("lobby"), json!("Ada")])
    );
    assert_eq!(people(&bob.who(Some("lobby")).await), ["Bob", "Cy"]);
    // The typist does not get its own typing.
    assert!(
        matches!(
            cy.next_named("typing", Duration::from_millis(300)).await,
            Err(ClientError::Timeout)
        ),
        "Cy got its own typing back"
    );
    // Disconnecting is leaving every room.
    cy.close().await;
    assert_eq!(
        next_about(&mut bob, Some("lobby")).await,
        ("left".into(), vec![json!("lobby"), json!("Cy")])
    );

    // A conversation's typing reaches the other person.
    ada.typing(Some("@Ada|Bob"), true).await.assert_ok();
    assert_eq!(
        next_about(&mut bob, Some("@Ada|Bob")).await,
        (
            "typing".into(),
            vec![json!("@Ada|Bob"), json!("Ada"), json!(true)]
        )
    );

    // Refused: a room the socket is not in, a value that is not a boolean, too fast.
    assert_eq!(
        bob.typing(Some("nowhere"), true).await.error_code(),
        Some("not_a_member")
    );
    assert_eq!(
        bob.who(Some("nowhere")).await.error_code(),
        Some("not_a_member")
    );
    let not_bool = bob
        .request("typing", vec![json!("lobby"), json!("yes")])
        .await;
    assert_eq!(not_bool.error_code(), Some("invalid_typing"));
    let mut codes = Vec::new();
    for _ in 0..30 {
        codes.push(
            bob.typing(Some("lobby"), true)
                .await
                .error_code()
                .map(str::to_owned),
        );
    }
    assert!(
        codes.iter().any(Option::is_none),
        "no typing allowed: {codes:?}"
    );
    assert!(
        codes.iter().any(|c| c.as_deref() == Some("rate_limited")),
        "typing is not limited: {codes:?}"
    );
    for client in [ada, ada_phone, bob] {
        client.close().await;
    }
    stop_all(nodes).await;
}

/// A node killed with SIGKILL says nothing; the two others take its people out of their rooms
/// (`left` on both, and `who` without them) within the presence timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_people_leave_within_the_presence_timeout() {
    let db = TestDb::new().await;
    let settings = TestSettings::new(&db)
        .redis(REDIS, &unique("presence-kill"))
        .set("CHORUS__CHAT__PRESENCE_TIMEOUT_MS", "1500");
    let survivor = Node::start(settings.build()).await;
    let other = Node::start(settings.build()).await;
    let setup = NodeSetup::new(env!("CARGO_BIN_EXE_chorus"), settings);
    let mut doomed = ProcNode::start("doomed", free_port(), &setup);
    doomed.ready().await;

    let mut ada = named(&survivor.url, "Ada").await;
    ada.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Ada")])
    );
    let mut eve = named(&other.url, "Eve").await;
    eve.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut eve, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Eve")])
    );
    let dan = named(&format!("http://127.0.0.1:{}", doomed.port), "Dan").await;
    dan.join("lobby", None).await.assert_ok();
    for client in [&mut ada, &mut eve] {
        // Ada also saw Eve arrive.
        let mut seen = next_about(client, Some("lobby")).await;
        if seen.1[1] == json!("Eve") {
            seen = next_about(client, Some("lobby")).await;
        }
        assert_eq!(seen, ("joined".into(), vec![json!("lobby"), json!("Dan")]));
    }
    assert_eq!(people(&ada.who(Some("lobby")).await), ["Ada", "Dan", "Eve"]);

    doomed.kill().await;
    let killed = Instant::now();
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("left".into(), vec![json!("lobby"), json!("Dan")])
    );
    let took = killed.elapsed();
    assert_eq!(
        next_about(&mut eve, Some("lobby")).await,
        ("left".into(), vec![json!("lobby"), json!("Dan")])
    );
    println!("Dan left {took:?} after his node was killed (presence timeout 1.5 s)");
    assert!(
        took < Duration::from_millis(1500 + 2000),
        "left came {took:?} after the kill"
    );
    assert_eq!(people(&eve.who(Some("lobby")).await), ["Ada", "Eve"]);
    drop(dan);
    ada.close().await;
    eve.close().await;
    survivor.stop().await;
    other.stop().await;
}

/// A node killed and restarted before the others notice clears what its earlier run recorded
/// itself, at start-up: its people's `left` comes at once, and nothing in it panics (its first
/// `left` once raced the registration of the namespace, and the panic took the node's presence
/// heartbeat with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_at_once_takes_its_earlier_people_out() {
    let db = TestDb::new().await;
    // Long enough that the survivor does not reap the killed node first.
    let settings = TestSettings::new(&db)
        .redis(REDIS, &unique("presence-restart"))
        .set("CHORUS__CHAT__PRESENCE_TIMEOUT_MS", "30000");
    let survivor = Node::start(settings.build()).await;
    let setup = NodeSetup::new(env!("CARGO_BIN_EXE_chorus"), settings);
    let mut phoenix = ProcNode::start("phoenix", free_port(), &setup);
    phoenix.ready().await;

    let mut ada = named(&survivor.url, "Ada").await;
    ada.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Ada")])
    );
    let dan = named(&format!("http://127.0.0.1:{}", phoenix.port), "Dan").await;
    dan.join("lobby", None).await.assert_ok();
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("joined".into(), vec![json!("lobby"), json!("Dan")])
    );

    phoenix.kill().await;
    drop(dan);
    phoenix.restart().await;
    let restarted = Instant::now();
    assert_eq!(
        next_about(&mut ada, Some("lobby")).await,
        ("left".into(), vec![json!("lobby"), json!("Dan")])
    );
    let took = restarted.elapsed();
    println!("Dan left {took:?} after his node came back (presence timeout 30 s)");
    assert!(
        took < Duration::from_secs(5),
        "left came {took:?} after the restart"
    );
    assert_eq!(people(&ada.who(Some("lobby")).await), ["Ada"]);
    assert_eq!(
        phoenix.panics(),
        0,
        "the restarted node panicked (its output above)"
    );
    phoenix.kill().await;
    ada.close().await;
    survivor.stop().await;
}
