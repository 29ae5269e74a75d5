//! chorus: the Socket.IO tutorial's chat as a server that runs on one node or many.
//!
//! # Layout
//! - [`config`]: the settings tree (defaults, a file, environment variables).
//! - [`app`]: builds a node from settings and runs it until shutdown.
//! - [`chat`]: the Socket.IO side: handshake (auth, replay) and `chat message` sends.
//! - [`writer`]: group commit: stores sends in batches, then feeds, publishes and acks.
//! - [`feed`]: the node's ordered feed: releases messages to local sockets in offset order,
//!   replays reconnecting sockets and switches them to live without gaps or duplicates.
//! - [`bus`]: carries committed messages between nodes over Redis pub/sub (a fast path).
//! - [`log`]: the recovery log of recent messages (a Redis stream, or in process) that serves
//!   reconnects without a database query.
//! - [`store`]: message storage behind one trait: Postgres and SQLite.
//! - [`http`]: the page, the client bundle, health, readiness, metrics.
//! - [`logging`]: plain or JSON log lines, each with the node id.
//! - [`metrics`]: the node's counters in Prometheus text.
//!
//! How data flows and why no message is lost, duplicated or reordered: `docs/DESIGN.md`.

pub mod app;
pub mod bus;
pub mod chat;
pub mod config;
pub mod feed;
pub mod http;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod store;
pub mod writer;
