//! chorus: the Socket.IO tutorial's chat as a server that runs on one node or many.
//!
//! # Layout
//! - [`config`]: the settings tree (defaults, a file, environment variables), checked as a whole.
//! - [`app`]: builds a node from settings (single or cluster mode) and runs it until shutdown.
//! - [`runtime`]: what every background part of a node shares: metrics, tasks, the stop signal.
//! - [`access`]: who may open a socket: allowed origins, and signed handshake tokens.
//! - [`names`]: what a person may be called.
//! - [`rooms`]: what a room may be called; the default room and conversations.
//! - [`peers`]: who a connection is from (behind trusted proxies too) and how many each holds.
//! - [`chat`]: the Socket.IO side: handshake (auth, replay) and `chat message` sends.
//! - [`writer`]: group commit: stores sends in batches, then feeds, publishes and acks.
//! - [`feed`]: the node's ordered feed: releases messages to local sockets in offset order,
//!   replays reconnecting sockets and switches them to live without gaps or duplicates.
//! - [`bus`]: carries committed messages between nodes over Redis pub/sub (a fast path).
//! - [`recovery`]: the recovery log of recent messages (a Redis stream, or in process) that
//!   serves reconnects without a database query.
//! - [`redis`]: builds the node's Redis clients and keeps subscribers subscribed.
//! - [`store`]: message storage behind one trait: Postgres and SQLite.
//! - [`http`]: the page, the client bundle, health, readiness, metrics.
//! - [`server`]: accepts connections and serves HTTP/1.1 with bounded heads, head and write
//!   deadlines, and bounds per node and per address.
//! - [`logging`]: plain or JSON log lines, each with the node id.
//! - [`metrics`]: the node's counters, gauge and latency histograms.
//!
//! How data flows and why no message is lost, duplicated or reordered: `docs/DESIGN.md`.

pub mod access;
pub mod app;
pub mod bus;
pub mod chat;
pub mod config;
pub mod feed;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod peers;
pub mod recovery;
pub mod redis;
pub mod rooms;
pub mod runtime;
pub mod server;
pub mod store;
pub mod writer;
