//! The Postgres backend: one `chorus_append` call per batch (see the migration for why ids are
//! assigned in commit order).

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{Appended, Backend, NewMessage, Pooled, StoreError, timed};

/// Messages in Postgres, shared by every node of a cluster.
pub struct PgStore {
    db: Pooled<sqlx::Postgres>,
}

impl PgStore {
    /// Connects and applies migrations; safe when several nodes start at once (sqlx holds an
    /// advisory lock while migrating).
    pub async fn connect(url: &str, max: u32, timeout: Duration) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(timeout)
            // Not a ping per acquire: that is a round trip before every batch (3.6 ms a batch
            // under load here). A broken connection fails its query; the client retries.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Self {
            db: Pooled { pool, timeout },
        })
    }
}

impl Backend for PgStore {
    type Db = sqlx::Postgres;
    const HEAD: &'static str = "select head from message_head";

    fn pooled(&self) -> &Pooled<sqlx::Postgres> {
        &self.db
    }

    fn append<'a>(
        &'a self,
        batch: &'a [NewMessage],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
        Box::pin(async move {
            let offsets: Vec<Option<&str>> =
                batch.iter().map(|m| m.client_offset.as_deref()).collect();
            let contents: Vec<&str> = batch.iter().map(|m| m.content.as_str()).collect();
            let rows: Vec<(i64, i64, bool)> = timed(
                self.db.timeout,
                sqlx::query_as("select o_ord, o_id, o_inserted from chorus_append($1, $2)")
                    .bind(offsets)
                    .bind(contents)
                    .fetch_all(&self.db.pool),
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
