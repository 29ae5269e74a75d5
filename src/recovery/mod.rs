//! The recovery log: the newest messages of each room in offset order, kept where every node can
//! read them, so that a client reconnecting to any node catches up without a database query.
//!
//! A cluster keeps it in a Redis stream ([`StreamLog`]), a single node in process
//! ([`MemoryLog`]). Neither is trusted: a read returns only the contiguous run that starts
//! exactly at the asked offset, and anything else reads as "not here", which sends the caller
//! to the store. Why that makes a lost, trimmed or foreign stream harmless: `docs/DESIGN.md`,
//! "The stream".

mod memory;
mod stream;

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

pub use memory::MemoryLog;
pub use stream::StreamLog;

use crate::{config::RecoverySettings, rooms::Room, store::Message};

/// How much the log keeps of each room: at most `max_len` messages and `max_bytes` (see
/// [`entry_bytes`]), none older than `max_age`. A room with nothing newer is forgotten.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most messages kept.
    pub max_len: usize,
    /// Most bytes kept.
    pub max_bytes: usize,
    /// Oldest message kept.
    pub max_age: Duration,
}

impl From<&RecoverySettings> for Retention {
    fn from(settings: &RecoverySettings) -> Self {
        Self {
            max_len: settings.max_len,
            max_bytes: settings.max_bytes,
            max_age: settings.max_age,
        }
    }
}

/// What one entry counts against `Retention::max_bytes`: its content and sender's name and a
/// fixed overhead for its id, time and bookkeeping, so that a flood of tiny messages is
/// counted too.
pub fn entry_bytes(message: &Message) -> usize {
    /// About what an entry costs beyond its content and name (a stream entry's id, fields and
    /// time, or the in-process queue's slot and `Arc`).
    const ENTRY_OVERHEAD: usize = 64;
    message.content.len() + message.name.len() + ENTRY_OVERHEAD
}

/// Why the log could not be read (the caller reads the store instead).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Redis refused or did not answer.
    #[error("redis error: {0}")]
    Redis(#[from] fred::error::Error),
    /// An entry was not in the shape this module writes.
    #[error("malformed stream entry {0}")]
    Malformed(String),
}

/// Recent messages of every room, readable by room and offset.
pub trait RecoveryLog: Send + Sync + 'static {
    /// Takes released messages of one room (in offset order, contiguous); never waits.
    fn append(&self, messages: &[Arc<Message>]);
    /// Up to `limit` messages of `room` from `after + 1` on, contiguous; empty when the log
    /// does not hold `after + 1`.
    fn read_after<'a>(
        &'a self,
        room: &'a Room,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ReadError>>;
}
