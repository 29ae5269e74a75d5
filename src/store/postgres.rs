//! The Postgres backend: one `chorus_append_to` call per batch of one room (see the migrations
//! for why a room's offsets are assigned in commit order).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Appended, Appending, Dialect, NewMessage, PgStore, SqlStore, StoreError, timed};
use crate::rooms::Room;

impl PgStore {
    /// Connects and applies migrations; safe when several nodes start at once (sqlx holds an
    /// advisory lock while migrating).
    pub async fn connect(url: &str, max: u32, timeout: Duration) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            // Not a ping per acquire: that is a round trip before every batch (3.6 ms a batch
            // under load here). A broken connection fails its query; the client retries.
            .test_before_acquire(false);
        SqlStore::open(
            pool,
            options,
            timeout,
            sqlx::migrate!("migrations/postgres"),
        )
        .await
    }
}

impl Dialect for sqlx::Postgres {
    const HEADS: &'static str =
        "select name, head from rooms where name in (select json_array_elements_text($1::json))";
    const CONVERSATIONS: &'static str = "select name, head from rooms \
         where person_a in (select json_array_elements_text($1::json)) \
            or person_b in (select json_array_elements_text($1::json))";

    fn append<'a>(store: &'a PgStore, room: &'a Room, batch: &'a [NewMessage]) -> Appending<'a> {
        Box::pin(async move {
            let offsets: Vec<Option<&str>> =
                batch.iter().map(|m| m.client_offset.as_deref()).collect();
            let contents: Vec<&str> = batch.iter().map(|m| m.content.as_str()).collect();
            let names: Vec<&str> = batch.iter().map(|m| m.name.as_str()).collect();
            let ats: Vec<i64> = batch.iter().map(|m| m.at).collect();
            let rows: Vec<(i64, i64, bool)> = timed(
                store.timeout,
                sqlx::query_as(
                    "select o_ord, o_id, o_inserted from chorus_append_to($1, $2, $3, $4, $5)",
                )
                .bind(room.key())
                .bind(offsets)
                .bind(contents)
                .bind(names)
                .bind(ats)
                .fetch_all(&store.pool),
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|(_, id, inserted)| {
                    if inserted {
                        Appended::Inserted(id)
                    } else {
                        Appended::Existing(id)
                    }
                })
                .collect())
        })
    }
}
