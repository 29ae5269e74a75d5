//! Assertions several test modules share; the harness itself is `chorus-testkit`.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use chorus_testkit::Client;
use serde_json::{Value, json};

/// Reconnects to `url` having seen `after`, and requires `after+1..=head` in order, each message
/// once; the rest of the recovery, if any, is left unread.
pub async fn recover(url: &str, after: i64, head: i64) {
    let mut client = Client::connect(url, Some(json!({ "serverOffset": after })))
        .await
        .expect("connect");
    let mut seen = HashSet::new();
    for expected in after + 1..=head {
        let (content, offset) = client
            .next_chat_message(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("message {expected} of the recovery: {e}"));
        assert_eq!(offset, expected, "recovered in order, no gap, no duplicate");
        assert!(seen.insert(content.clone()), "{content} twice");
    }
    client.close().await;
}

/// The next `joined`, `left` or `typing` event about `room` (`None`: the default room), skipping
/// every other event; `(event, args)`. Fails the test when none comes within 10 s.
pub async fn next_about(client: &mut Client, room: Option<&str>) -> (String, Vec<Value>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (event, args) = client
            .next_event(left)
            .await
            .unwrap_or_else(|e| panic!("no presence event about {room:?}: {e}"));
        let about = args.first().cloned().unwrap_or(Value::Null);
        if ["joined", "left", "typing"].contains(&event.as_str()) && about == json!(room) {
            return (event, args);
        }
    }
}
