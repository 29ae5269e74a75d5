//! The recovery log of a single node, in process: a queue of released messages per room,
//! trimmed by count, bytes and age.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use futures_util::future::BoxFuture;

use super::{ReadError, RecoveryLog, Retention, entry_bytes};
use crate::{rooms::Room, store::Message};

/// The log of a single node, in memory.
pub struct MemoryLog {
    rooms: Mutex<Rooms>,
    retention: Retention,
}

/// Each room's entries, and when rooms whose entries all aged out were last dropped.
struct Rooms {
    entries: HashMap<Room, Entries>,
    swept: Instant,
}

/// Released messages with the time they were appended, contiguous by offset, and what they
/// count against `Retention::max_bytes`.
#[derive(Default)]
struct Entries {
    queue: VecDeque<(Instant, Arc<Message>)>,
    bytes: usize,
}

impl Entries {
    fn pop_front(&mut self) {
        if let Some((_, message)) = self.queue.pop_front() {
            self.bytes -= entry_bytes(&message);
        }
    }
}

impl MemoryLog {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self {
            rooms: Mutex::new(Rooms {
                entries: HashMap::new(),
                swept: Instant::now(),
            }),
            retention,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `entries` holds anything older than the retention allows, or more.
    fn over(&self, entries: &Entries, now: Instant) -> bool {
        entries.queue.len() > self.retention.max_len
            || entries.bytes > self.retention.max_bytes
            || entries
                .queue
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.max_age)
    }
}

impl RecoveryLog for MemoryLog {
    fn append(&self, messages: &[Arc<Message>]) {
        let Some(room) = messages.first().map(|m| m.room.clone()) else {
            return;
        };
        let now = Instant::now();
        let mut rooms = self.lock();
        // Rooms nobody wrote to for longer than the age limit hold nothing readable: drop them
        // now and then, so that rooms which fell silent cost nothing.
        if now.duration_since(rooms.swept) > self.retention.max_age {
            let max_age = self.retention.max_age;
            rooms.entries.retain(|_, entries| {
                entries
                    .queue
                    .back()
                    .is_some_and(|(at, _)| now.duration_since(*at) <= max_age)
            });
            rooms.swept = now;
        }
        let entries = rooms.entries.entry(room).or_default();
        for message in messages {
            match entries.queue.back() {
                Some((_, last)) if message.offset <= last.offset => continue,
                // Not contiguous (cannot happen with the feed's order): start over rather than
                // keep a hole that readers would have to step around.
                Some((_, last)) if message.offset != last.offset + 1 => {
                    *entries = Entries::default()
                }
                _ => {}
            }
            entries.bytes += entry_bytes(message);
            entries.queue.push_back((now, message.clone()));
        }
        while self.over(entries, now) {
            entries.pop_front();
        }
    }

    fn read_after<'a>(
        &'a self,
        room: &'a Room,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<Message>>, ReadError>> {
        let rooms = self.lock();
        let Some(entries) = rooms.entries.get(room) else {
            return Box::pin(std::future::ready(Ok(Vec::new())));
        };
        let entries = &entries.queue;
        let page = match entries.front() {
            Some((_, first)) if after >= first.offset - 1 => {
                let skip = usize::try_from(after + 1 - first.offset).unwrap_or(usize::MAX);
                entries
                    .iter()
                    .skip(skip)
                    .take(limit)
                    .map(|(_, m)| m.clone())
                    .collect()
            }
            _ => Vec::new(),
        };
        Box::pin(std::future::ready(Ok(page)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn message(offset: i64) -> Arc<Message> {
        Arc::new(Message {
            room: Room::default_room(),
            offset,
            content: format!("m{offset}"),
            name: String::new(),
            at: 0,
        })
    }

    #[tokio::test]
    async fn reads_only_the_run_that_starts_right_after_the_offset() {
        let room = Room::default_room();
        let log = MemoryLog::new(Retention {
            max_len: 3,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(60),
        });
        log.append(&(1..=5).map(message).collect::<Vec<_>>());
        // Trimmed to the newest three: 3, 4, 5.
        assert!(log.read_after(&room, 1, 10).await.unwrap().is_empty());
        let page = log.read_after(&room, 2, 2).await.unwrap();
        assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [3, 4]);
        assert!(log.read_after(&room, 5, 10).await.unwrap().is_empty());
        // A copy of what it holds is skipped; the next offset extends it.
        log.append(&[message(5), message(6)]);
        let page = log.read_after(&room, 4, 10).await.unwrap();
        assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [5, 6]);
    }

    #[tokio::test]
    async fn large_messages_are_trimmed_by_bytes_before_the_count_is_reached() {
        let big = |offset| {
            Arc::new(Message {
                room: Room::default_room(),
                offset,
                content: "x".repeat(1000),
                name: String::new(),
                at: 0,
            })
        };
        let room = Room::default_room();
        let per_entry = entry_bytes(&big(1));
        let log = MemoryLog::new(Retention {
            max_len: 1_000,
            max_bytes: 10 * per_entry,
            max_age: Duration::from_secs(60),
        });
        log.append(&(1..=25).map(big).collect::<Vec<_>>());
        // The newest ten fit: 16..=25.
        assert!(log.read_after(&room, 14, 100).await.unwrap().is_empty());
        let kept: Vec<i64> = log
            .read_after(&room, 15, 100)
            .await
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(kept, (16..=25).collect::<Vec<_>>());
        assert_eq!(log.lock().entries[&room].bytes, 10 * per_entry);
    }
}
