//! The SQLite backend, the embedded default: one process writes, inside `BEGIN IMMEDIATE`.

use std::{str::FromStr, time::Duration};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::{Appended, Appending, Dialect, NewMessage, SqlStore, SqliteStore, StoreError, timed};
use crate::rooms::Room;

impl SqliteStore {
    /// Opens (creating if missing) the database and applies migrations.
    pub async fn connect(url: &str, max: u32, timeout: Duration) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // an ack promises durability, so every commit is synced
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(timeout);
        // An in-memory database exists once per connection: keep one so every query sees it.
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { max })
            .min_connections(if in_memory { 1 } else { 0 })
            .idle_timeout(None)
            .max_lifetime(None);
        SqlStore::open(pool, options, timeout, sqlx::migrate!("migrations/sqlite")).await
    }

    async fn append_inner(
        &self,
        room: &Room,
        batch: &[NewMessage],
    ) -> Result<Vec<Appended>, sqlx::Error> {
        // IMMEDIATE takes the write lock first, so the head read below cannot go stale.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let known_head: Option<i64> = sqlx::query_scalar("select head from rooms where name = ?")
            .bind(room.key())
            .fetch_optional(&mut *tx)
            .await?;
        let mut head = match known_head {
            Some(head) => head,
            None => {
                // A room's first append creates it.
                let (a, b) = room.people().unzip();
                sqlx::query("insert into rooms (name, person_a, person_b) values (?, ?, ?)")
                    .bind(room.key())
                    .bind(a)
                    .bind(b)
                    .execute(&mut *tx)
                    .await?;
                0
            }
        };
        let first = head;
        let mut out = Vec::with_capacity(batch.len());
        for message in batch {
            if let Some(client_offset) = &message.client_offset {
                let known: Option<i64> = sqlx::query_scalar(
                    "select id from room_messages where room = ? and client_offset = ? and content = ?",
                )
                .bind(room.key())
                .bind(client_offset)
                .bind(message.content.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(id) = known {
                    out.push(Appended::Existing(id));
                    continue;
                }
            }
            head += 1;
            sqlx::query(
                "insert into room_messages (room, id, client_offset, content, name, at_ms) values (?, ?, ?, ?, ?, ?)",
            )
            .bind(room.key())
            .bind(head)
            .bind(message.client_offset.as_deref())
            .bind(message.content.as_str())
            .bind(message.name.as_str())
            .bind(message.at)
            .execute(&mut *tx)
            .await?;
            out.push(Appended::Inserted(head));
        }
        if head != first {
            sqlx::query("update rooms set head = ? where name = ?")
                .bind(head)
                .bind(room.key())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(out)
    }
}

impl Dialect for sqlx::Sqlite {
    const HEADS: &'static str =
        "select name, head from rooms where name in (select value from json_each($1))";
    const CONVERSATIONS: &'static str = "select name, head from rooms \
         where person_a in (select value from json_each($1)) \
            or person_b in (select value from json_each($1))";

    fn append<'a>(
        store: &'a SqliteStore,
        room: &'a Room,
        batch: &'a [NewMessage],
    ) -> Appending<'a> {
        Box::pin(timed(store.timeout, store.append_inner(room, batch)))
    }
}
