//! Integration tests: real nodes, real Postgres and Redis, real Socket.IO clients.

mod abuse;
mod access;
mod browser;
mod cluster;
mod deploy;
mod faults;
mod input;
mod names;
mod nemesis;
mod presence;
mod recovery;
mod redis_cluster;
mod rooms;
mod support;
mod topology;
mod tutorial;
