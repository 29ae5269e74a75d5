//! The recovery log of a single node, in process: a queue of released messages trimmed by count
//! and age.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures_util::future::BoxFuture;

use super::{ReadError, RecoveryLog, Retention};
use crate::store::Message;

/// The log of a single node, in memory.
pub struct MemoryLog {
    /// Released messages with the time they were appended, contiguous by offset.
    entries: Mutex<VecDeque<(Instant, Arc<Message>)>>,
    retention: Retention,
}

impl MemoryLog {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
            retention,
        }
    }
}

impl RecoveryLog for MemoryLog {
    fn append(&self, messages: &[Arc<Message>]) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            match entries.back() {
                Some((_, last)) if message.offset <= last.offset => continue,
                // Not contiguous (cannot happen with the feed's order): start over rather than
                // keep a hole that readers would have to step around.
                Some((_, last)) if message.offset != last.offset + 1 => entries.clear(),
                _ => {}
            }
            entries.push_back((now, message.clone()));
        }
        while entries.len() > self.retention.max_len
            || entries
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
        })
    }

    #[tokio::test]
    async fn reads_only_the_run_that_starts_right_after_the_offset() {
        let log = MemoryLog::new(Retention {
            max_len: 3,
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
}
