//! The Postgres backend: one `chorus_append` call per batch (see the migration for why ids are
//! assigned in commit order).

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{Appended, Message, NewMessage, Store, StoreError, timed};

/// Messages in Postgres, shared by every node of a cluster.
pub struct PgStore {
    pool: PgPool,
    timeout: Duration,
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
        Ok(Self { pool, timeout })
    }
}

impl Store for PgStore {
    fn append<'a>(
        &'a self,
        batch: &'a [NewMessage],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>> {
        Box::pin(async move {
            let offsets: Vec<Option<&str>> =
                batch.iter().map(|m| m.client_offset.as_deref()).collect();
            let contents: Vec<&str> = batch.iter().map(|m| m.content.as_str()).collect();
            let rows: Vec<(i64, i64, bool)> = timed(
                self.timeout,
                sqlx::query_as("select o_ord, o_id, o_inserted from chorus_append($1, $2)")
                    .bind(offsets)
                    .bind(contents)
                    .fetch_all(&self.pool),
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

    fn read_after(
        &self,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Message>, StoreError>> {
        Box::pin(async move {
            timed(
                self.timeout,
                sqlx::query_as(
                    r#"select id as "offset", content from messages where id > $1 order by id limit $2"#,
                )
                .bind(after)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool),
            )
            .await
        })
    }

    fn head(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move {
            timed(
                self.timeout,
                sqlx::query_scalar("select head from message_head").fetch_one(&self.pool),
            )
            .await
        })
    }

    fn epoch(&self) -> BoxFuture<'_, Result<String, StoreError>> {
        Box::pin(timed(
            self.timeout,
            sqlx::query_scalar("select epoch from chorus_meta").fetch_one(&self.pool),
        ))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }
}
