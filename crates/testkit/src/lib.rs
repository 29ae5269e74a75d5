//! chorus-testkit: the harness of chorus's integration tests, and the Socket.IO codec the load
//! generator shares with its client.
//!
//! # Layout
//! - [`codec`]: Engine.IO / Socket.IO packets: encode, decode in full, decode the lean way.
//! - [`transport`]: the websocket under every client: connect and join namespace `/`.
//! - [`client`]: the tests' Socket.IO client with the contract's verbs, and a slow consumer.
//! - [`node`]: nodes in the test process, and [`TestSettings`], the one way to set a node up.
//! - [`process`]: nodes as child processes: drain (SIGTERM), kill (SIGKILL), restart.
//! - [`balancer`]: nginx or HAProxy with the shipped `deploy/` configuration.
//! - [`load`]: a steady load of tutorial clients through a balancer.
//! - [`js`]: the `tests/js` scenarios of the official client.
//! - [`db`]: a fresh Postgres database per test, a temporary SQLite file, a private server.
//! - [`redis`]: the local Redis, and private ones to kill and restart.
//! - [`netns`]: test hosts in network namespaces, with partitions and bad links.
//! - [`proxy`]: a TCP proxy that cuts a service off and lets it back.
//! - [`http`]: GETs on loopback; [`metrics`]: one sample of `/metrics`, either text format.
//! - [`fixture`]: unique names, free ports, the repository's files, waiting with a limit.
//!
//! The root package's tests pass what only they know, such as the `chorus` binary
//! (`env!("CARGO_BIN_EXE_chorus")`, in [`NodeSetup`]); files of the repository are found from
//! this crate's own directory ([`fixture::repo_root`]).

pub mod balancer;
pub mod client;
pub mod codec;
pub mod db;
pub mod fixture;
pub mod http;
pub mod js;
pub mod load;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod transport;

pub use balancer::{Balancer, Lb};
pub use client::{Ack, Client, ClientError, Delivery, assert_acked, slow_consumer};
pub use db::{PG_ADMIN, PrivatePostgres, TestDb, TestSqlite};
pub use fixture::{free_port, unique, wait_for};
pub use http::{
    PollingRefusal, PollingSession, http_get, raw_status, try_get, try_get_at, websocket_upgrade,
};
pub use js::run_js;
pub use load::{SteadyLoad, sources};
pub use metrics::{metric, metric_at};
pub use netns::{Cut, Host, Netem, TestNet};
pub use node::{Node, TestSettings, spawn_cluster, stop_all};
pub use process::{NodeSetup, ProcNode, signal, start_nodes};
pub use proxy::FaultProxy;
pub use redis::{PrivateRedis, PrivateRedisCluster, REDIS, require_redis};
