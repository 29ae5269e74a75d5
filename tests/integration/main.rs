//! Integration tests: real nodes, real Postgres and Redis, real Socket.IO clients.

mod cluster;
mod faults;
mod input;
mod support;
mod tutorial;
