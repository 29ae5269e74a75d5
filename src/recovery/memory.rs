//! The recovery log of a single node, in process: a queue of released messages trimmed by count
//! and age.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures_util::future::BoxFuture;

use super::{ReadError, RecoveryLog, Retention, entry_bytes};
use crate::store::Message;

/// The log of a single node, in memory.
pub struct MemoryLog {
    entries: Mutex<Entries>,
    retention: Retention,
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
            entries: Mutex::new(Entries::default()),
            retention,
        }
    }
}

impl RecoveryLog for MemoryLog {
    fn append(&self, messages: &[Arc<Message>]) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
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
        while entries.queue.len() > self.retention.max_len
            || entries.bytes > self.retention.max_bytes
            || entries
                .queue
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.max_age)
        {
            entries.pop_front();
        }
    }

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, ReadError>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
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
            offset,
            content: format!("m{offset}"),
            name: String::new(),
            at: 0,
        })
    }

    #[tokio::test]
    async fn reads_only_the_run_that_starts_right_after_the_offset() {
        let log = MemoryLog::new(Retention {
            max_len: 3,
            max_bytes: usize::MAX,
            max_age: Duration::from_secs(60),
        });
        log.append(&(1..=5).map(message).collect::<Vec<_>>());
        // Trimmed to the newest three: 3, 4, 5.
        assert!(log.read_after(1, 10).await.unwrap().is_empty());
        let page = log.read_after(2, 2).await.unwrap();
        assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [3, 4]);
        assert!(log.read_after(5, 10).await.unwrap().is_empty());
        // A copy of what it holds is skipped; the next offset extends it.
        log.append(&[message(5), message(6)]);
        let page = log.read_after(4, 10).await.unwrap();
        assert_eq!(page.iter().map(|m| m.offset).collect::<Vec<_>>(), [5, 6]);
    }

    #[tokio::test]
    async fn large_messages_are_trimmed_by_bytes_before_the_count_is_reached() {
        let big = |offset| {
            Arc::new(Message {
                offset,
                content: "x".repeat(1000),
                name: String::new(),
                at: 0,
            })
        };
        let per_entry = entry_bytes(&big(1));
        let log = MemoryLog::new(Retention {
            max_len: 1_000,
            max_bytes: 10 * per_entry,
            max_age: Duration::from_secs(60),
        });
        log.append(&(1..=25).map(big).collect::<Vec<_>>());
        // The newest ten fit: 16..=25.
        assert!(log.read_after(14, 100).await.unwrap().is_empty());
        let kept: Vec<i64> = log
            .read_after(15, 100)
            .await
            .unwrap()
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(kept, (16..=25).collect::<Vec<_>>());
        assert_eq!(log.entries.lock().unwrap().bytes, 10 * per_entry);
    }
}
