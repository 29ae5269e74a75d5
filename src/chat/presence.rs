//! Presence and typing, cluster-wide through the Socket.IO adapter: who is in a room, `joined`
//! and `left` on a person's first and last socket, `typing`; and, in a cluster, taking the
//! people of a node that died out of their rooms (SPEC, "Rooms and people"). All of it is best
//! effort and never in the way of messages.
//!
//! Each socket is in Socket.IO rooms that say where it is: `r:{room}` for every room it is in
//! (the default room is `r:`), `m:{room}\u{1f}{name}` for its person there, and `p:{name}` for
//! its person. `who` is the `m:` rooms of the sockets in `r:{room}` on every node (one adapter
//! request); `joined` is sent when no socket was in `m:` before this one, `left` when none is
//! after. Unit separator (U+001F) is a control character, which neither names nor room names
//! may hold, so the parts never run together.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use fred::{
    clients::Client,
    interfaces::{KeysInterface, SetsInterface},
    types::{Expiration, SetOptions},
};
use serde::Serialize;
use socketioxide::{SocketIo, adapter::Adapter, extract::SocketRef};
use socketioxide_core::adapter::DefinedAdapter;
use tokio_util::sync::CancellationToken;

use crate::{rooms::Room, runtime::Runtime, store::ANONYMOUS};

/// The event a room's members get when someone's first socket joins it.
pub const JOINED: &str = "joined";
/// The event a room's members get when someone's last socket leaves it.
pub const LEFT: &str = "left";
/// Typing, both directions.
pub const TYPING: &str = "typing";
/// Who is in a room, from a client.
pub const WHO: &str = "who";

const SEPARATOR: char = '\u{1f}';

/// The Socket.IO room of a room's sockets.
pub fn members(room: &Room) -> String {
    format!("r:{}", room.key())
}

/// The Socket.IO room of one person's sockets in a room.
fn member(room: &Room, person: &str) -> String {
    format!("m:{}{SEPARATOR}{person}", room.key())
}

/// The Socket.IO room of a person's sockets.
pub fn person(name: &str) -> String {
    format!("p:{name}")
}

/// The room and person a `member` room names.
fn parse_member(name: &str) -> Option<(Room, &str)> {
    let (room, person) = name.strip_prefix("m:")?.split_once(SEPARATOR)?;
    Some((Room::from_key(room), person))
}

/// `(room, name)`, as `joined` and `left` carry them.
#[derive(Serialize)]
struct Someone<'a>(Option<&'a str>, &'a str);

/// The node's part in presence: its people per room, and in a cluster its record in Redis.
pub struct Presence {
    /// Local sockets per room and person: the record in Redis changes on the first and last.
    local: Mutex<HashMap<(Room, Arc<str>), usize>>,
    cluster: Option<ClusterPresence>,
}

/// What a cluster node keeps in Redis so the others can take its people out when it dies.
struct ClusterPresence {
    client: Client,
    /// `{prefix}:presence`.
    base: Arc<str>,
    node: Arc<str>,
}

impl ClusterPresence {
    fn alive(&self, node: &str) -> String {
        format!("{}:alive:{node}", self.base)
    }
    fn entries(&self, node: &str) -> String {
        format!("{}:of:{node}", self.base)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.base)
    }
    fn reaping(&self, node: &str) -> String {
        format!("{}:reap:{node}", self.base)
    }
}

impl Presence {
    /// Presence on one node, with nothing to share.
    pub fn single() -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            cluster: None,
        }
    }

    /// Presence on a node of a cluster, recorded under `{prefix}:presence` with `client`.
    pub fn clustered(client: Client, prefix: &str, node: Arc<str>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            cluster: Some(ClusterPresence {
                client,
                base: format!("{prefix}:presence").into(),
                node,
            }),
        }
    }

    /// Counts a local socket of `person` in or out of `room`; records the change in Redis when
    /// it is the person's first or last socket here.
    fn count(&self, room: &Room, person: &str, delta: isize) {
        let key = (room.clone(), Arc::<str>::from(person));
        let edge = {
            let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
            let n = local.entry(key.clone()).or_default();
            let before = *n;
            *n = n.saturating_add_signed(delta);
            let after = *n;
            if after == 0 {
                local.remove(&key);
            }
            (before == 0) != (after == 0)
        };
        let Some(cluster) = &self.cluster else {
            return;
        };
        if !edge {
            return;
        }
        let entry = format!("{}{SEPARATOR}{person}", room.key());
        let (client, set) = (cluster.client.clone(), cluster.entries(&cluster.node));
        tokio::spawn(async move {
            let done: Result<i64, _> = if delta > 0 {
                client.sadd(&set, entry).await
            } else {
                client.srem(&set, entry).await
            };
            if let Err(error) = done {
                tracing::debug!(error = %error, "presence record not updated");
            }
        });
    }

    /// A socket of `person` enters `room`: it joins the room's Socket.IO rooms, and when no
    /// socket of the person was in the room on any node, the room's members get `joined`.
    /// Anonymous sockets take no part in presence.
    pub async fn enter<A: Adapter>(&self, socket: &SocketRef<A>, room: &Room, person: &str) {
        // Anonymous clients (the tutorial's) are no one in particular: they get the room's
        // typing and cost the cluster no request.
        if person == ANONYMOUS {
            socket.join(members(room));
            return;
        }
        let theirs = member(room, person);
        let first = socket
            .within(theirs.clone())
            .fetch_sockets()
            .await
            .map(|sockets| sockets.is_empty());
        socket.join([members(room), theirs.clone()]);
        self.count(room, person, 1);
        // A socket that closed during the fetch has been through its disconnect already: take
        // back what was just added, or it would stay listed as a ghost.
        if !socket.connected() {
            socket.leave([members(room), theirs]);
            self.count(room, person, -1);
            return;
        }
        match first {
            Ok(true) => announce(socket, room, JOINED, person).await,
            Ok(false) => {}
            Err(error) => tracing::debug!(error = %error, %room, "presence unknown; no joined"),
        }
    }

    /// A socket of `person` leaves `room`: when it was the person's last socket there on any
    /// node, the room's members get `left`.
    pub async fn exit<A: Adapter>(&self, socket: &SocketRef<A>, room: &Room, person: &str) {
        if person == ANONYMOUS {
            socket.leave(members(room));
            return;
        }
        socket.leave([members(room), member(room, person)]);
        self.count(room, person, -1);
        gone_if_last(socket, room, person).await;
    }

    /// A socket disconnected: it leaves every room it was in, and each of whose people it was
    /// the last socket of gets `left`. The checks run in a task of their own, so the socket is
    /// released without waiting for the cluster.
    pub fn disconnect<A: Adapter>(self: &Arc<Self>, socket: &SocketRef<A>) {
        let rooms = socket.rooms();
        socket.leave_all();
        let mut places = Vec::new();
        for name in &rooms {
            if let Some((room, person)) = parse_member(name) {
                self.count(&room, person, -1);
                places.push((room, person.to_owned()));
            }
        }
        if places.is_empty() {
            return;
        }
        let socket = socket.clone();
        tokio::spawn(async move {
            for (room, person) in places {
                gone_if_last(&socket, &room, &person).await;
            }
        });
    }

    /// Everyone with a socket in `room` on any live node, sorted; for a conversation, which of
    /// its two people have a socket anywhere.
    pub async fn who<A: Adapter>(
        &self,
        socket: &SocketRef<A>,
        room: &Room,
    ) -> Result<Vec<String>, String> {
        let people: BTreeSet<String> = if let Some((a, b)) = room.people() {
            let rooms = socket
                .within([person(a), person(b)])
                .rooms()
                .await
                .map_err(|e| e.to_string())?;
            rooms
                .iter()
                .filter_map(|r| r.strip_prefix("p:"))
                .map(str::to_owned)
                .collect()
        } else {
            let rooms = socket
                .within(members(room))
                .rooms()
                .await
                .map_err(|e| e.to_string())?;
            rooms
                .iter()
                .filter_map(|r| parse_member(r))
                .filter(|(r, _)| r == room)
                .map(|(_, p)| p.to_owned())
                .collect()
        };
        Ok(people.into_iter().collect())
    }

    /// In a cluster: clears what an earlier run of this node left, then keeps this node's record
    /// alive and takes the people of nodes whose record expired out of their rooms; every
    /// `timeout / 3` until `cancel`. On the way out the node
    /// drops its own record, so the others take its people out at once.
    pub fn start<A: Adapter + DefinedAdapter>(
        self: &Arc<Self>,
        io: SocketIo<A>,
        timeout: Duration,
        runtime: &Runtime,
    ) {
        if self.cluster.is_none() {
            return;
        }
        let presence = self.clone();
        let cancel: CancellationToken = runtime.cancel.clone();
        runtime.spawn(async move {
            // What a previous run of this node recorded and no one reaped (it restarted faster
            // than the timeout) is stale: its sockets are gone.
            if let Some(cluster) = &presence.cluster
                && let Err(error) = presence.reap(&io, &cluster.node).await
            {
                tracing::debug!(error = %error, "could not clear an earlier presence record");
            }
            let mut tick = tokio::time::interval((timeout / 3).max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(error) = presence.beat(&io, timeout).await {
                    tracing::debug!(error = %error, "presence heartbeat failed");
                }
            }
            if let Some(cluster) = &presence.cluster {
                let alive: Result<i64, _> = cluster.client.del(cluster.alive(&cluster.node)).await;
                if let Err(error) = alive {
                    tracing::debug!(error = %error, "presence record not dropped");
                }
            }
        });
    }

    /// One heartbeat: renew this node's record, then reap the nodes that stopped renewing.
    async fn beat<A: Adapter>(
        &self,
        io: &SocketIo<A>,
        timeout: Duration,
    ) -> Result<(), fred::error::Error> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let ms = i64::try_from(timeout.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let client = &cluster.client;
        let () = client
            .set(
                cluster.alive(&cluster.node),
                1,
                Some(Expiration::PX(ms)),
                None,
                false,
            )
            .await?;
        let _: i64 = client.sadd(cluster.nodes(), &*cluster.node).await?;
        let nodes: Vec<String> = client.smembers(cluster.nodes()).await?;
        for node in nodes.iter().filter(|n| **n != *cluster.node) {
            let alive: i64 = client.exists(cluster.alive(node)).await?;
            if alive > 0 {
                continue;
            }
            // One survivor reaps a node; the others see the lock and move on.
            let lock: Option<String> = client
                .set(
                    cluster.reaping(node),
                    &*cluster.node,
                    Some(Expiration::PX(ms * 4)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            if lock.is_none() {
                continue;
            }
            self.reap(io, node).await?;
        }
        Ok(())
    }
}

impl Presence {
    /// Takes the people `node` recorded out of their rooms (`left`) unless they have a socket
    /// elsewhere, and drops its records.
    async fn reap<A: Adapter>(
        &self,
        io: &SocketIo<A>,
        node: &str,
    ) -> Result<(), fred::error::Error> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let client = &cluster.client;
        let entries: Vec<String> = client.smembers(cluster.entries(node)).await?;
        if !entries.is_empty() {
            tracing::info!(%node, people = entries.len(), "taking the people of a node that stopped out of their rooms");
        }
        for entry in &entries {
            let Some((room, person)) = entry.split_once(SEPARATOR) else {
                continue;
            };
            let room = Room::from_key(room);
            if let Ok(sockets) = io.within(member(&room, person)).fetch_sockets().await
                && sockets.is_empty()
            {
                let left = Someone(room.to_arg(), person);
                if let Err(error) = io.within(members(&room)).emit(LEFT, &left).await {
                    tracing::debug!(error = %error, "left not sent");
                }
            }
        }
        // Only what was read: a node clearing its own earlier record may already be adding
        // new entries.
        if !entries.is_empty() {
            let _: i64 = client.srem(cluster.entries(node), entries).await?;
        }
        if node != &*cluster.node {
            let _: i64 = client.srem(cluster.nodes(), node).await?;
        }
        Ok(())
    }
}

/// Sends `event` (`joined` or `left`) about `person` to `room`'s members on every node.
async fn announce<A: Adapter>(socket: &SocketRef<A>, room: &Room, event: &str, person: &str) {
    let someone = Someone(room.to_arg(), person);
    if let Err(error) = socket.within(members(room)).emit(event, &someone).await {
        tracing::debug!(error = %error, %room, event, "presence event not sent");
    }
}

/// Sends `left` about `person` when no socket of theirs is in `room` on any node.
async fn gone_if_last<A: Adapter>(socket: &SocketRef<A>, room: &Room, person: &str) {
    match socket.within(member(room, person)).fetch_sockets().await {
        Ok(sockets) if sockets.is_empty() => announce(socket, room, LEFT, person).await,
        Ok(_) => {}
        Err(error) => tracing::debug!(error = %error, %room, "presence unknown; no left"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_room_names_its_room_and_person() {
        let lobby = Room::named("lobby").unwrap();
        assert_eq!(
            parse_member(&member(&lobby, "Ada")),
            Some((lobby.clone(), "Ada"))
        );
        let default = Room::default_room();
        assert_eq!(
            parse_member(&member(&default, "Bob")),
            Some((default, "Bob"))
        );
        assert_eq!(parse_member(&members(&lobby)), None);
        assert_eq!(parse_member("p:Ada"), None);
    }
}
