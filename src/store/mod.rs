//! Message storage behind one trait: Postgres when scaled out, SQLite embedded.
//!
//! Both backends keep the same invariant in every room, which the ordering argument in
//! `docs/DESIGN.md` rests on: a room's offsets are handed out in commit order, so its committed
//! offsets are always exactly `1..=head` with no gap, and a reader that sees offset `n` of a room
//! sees every offset below it. Rooms are independent: appends to different rooms take different
//! locks.

mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use crate::{config::Settings, rooms::Room};

/// A message as a client sent it, validated, not yet stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The client's idempotency key; `None` for clients that send none (stored once per emit).
    /// Together with the content it identifies a message (`docs/DESIGN.md`, "Write path").
    pub client_offset: Option<String>,
    /// The text.
    pub content: String,
    /// Who sent it: not part of its identity (a retry is the same message whoever sends it).
    pub name: String,
    /// When the node accepted it, in milliseconds since the Unix epoch.
    pub at: i64,
}

/// A stored message: its offset is its position in its room's total order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The room it was sent to.
    pub room: Room,
    /// The `serverOffset` clients see; gapless within the room, starting at 1.
    pub offset: i64,
    /// The text.
    pub content: String,
    /// Its sender's name.
    pub name: String,
    /// When it was accepted, in milliseconds since the Unix epoch.
    pub at: i64,
}

impl Message {
    /// The stored form of `message` at `offset` of `room`.
    pub fn stored(room: Room, offset: i64, message: NewMessage) -> Self {
        Self {
            room,
            offset,
            content: message.content,
            name: message.name,
            at: message.at,
        }
    }
}

/// The name of a sender who gave none.
pub const ANONYMOUS: &str = "anonymous";

/// Now, in milliseconds since the Unix epoch (the time a message is given when it is accepted).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `append` did with one input message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored now, at this offset.
    Inserted(i64),
    /// The same message (client offset and content) was stored before, at this offset;
    /// nothing was written.
    Existing(i64),
}

/// Why a store operation failed; every variant is transient to clients (no ack, they retry).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied at start-up.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database did not answer in time.
    #[error("database timed out")]
    Timeout,
}

impl StoreError {
    /// Whether the database refused the data itself, so that the same rows would fail again
    /// (a Postgres data exception, SQLSTATE class 22, or a check or not-null violation on either
    /// database), as opposed to being unreachable, busy or slow.
    pub fn is_refusal(&self) -> bool {
        let Self::Database(sqlx::Error::Database(error)) = self else {
            return false;
        };
        let data_exception = error
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some_and(|pg| pg.code().starts_with("22"));
        data_exception
            || matches!(
                error.kind(),
                sqlx::error::ErrorKind::CheckViolation | sqlx::error::ErrorKind::NotNullViolation
            )
    }
}

/// A room and its head, as the store reported it.
pub type RoomHead = (Room, i64);

/// Durable, ordered message storage, room by room.
pub trait Store: Send + Sync + 'static {
    /// Stores a batch in `room` in one transaction (a room's first append creates it), skipping
    /// messages (client offset and content) stored there before; the result has one entry per
    /// input, in input order. The messages of one batch must be distinct.
    fn append<'a>(
        &'a self,
        room: &'a Room,
        batch: &'a [NewMessage],
    ) -> BoxFuture<'a, Result<Vec<Appended>, StoreError>>;
    /// Up to `limit` messages of `room` with offsets above `after`, in offset order.
    fn read_after<'a>(
        &'a self,
        room: &'a Room,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Message>, StoreError>>;
    /// The highest committed offset of `room` (0 when it has none, or does not exist).
    fn head<'a>(&'a self, room: &'a Room) -> BoxFuture<'a, Result<i64, StoreError>>;
    /// The heads of those of `rooms` that exist.
    fn heads<'a>(&'a self, rooms: &'a [Room]) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>>;
    /// Every conversation of any of `people`, with its head.
    fn conversations<'a>(
        &'a self,
        people: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>>;
    /// A random name this database's history got when it was created; caches key on it.
    fn epoch(&self) -> BoxFuture<'_, Result<String, StoreError>>;
    /// Closes the pool once in-flight work is done.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Opens the backend the URL names, runs its migrations and returns it.
pub async fn connect(settings: &Settings) -> Result<Arc<dyn Store>, StoreError> {
    let url = settings.database_url.as_str();
    let timeout = settings.store.timeout;
    let max = settings.store.max_connections;
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max, timeout).await?))
    } else {
        Ok(Arc::new(PgStore::connect(url, max, timeout).await?))
    }
}

/// Messages in a SQL database: [`PgStore`] or [`SqliteStore`]. A pool and its time limit.
pub struct SqlStore<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    timeout: Duration,
}

impl<DB: sqlx::Database> SqlStore<DB>
where
    DB::Connection: sqlx::migrate::Migrate,
{
    /// Connects a pool of `pool` (each connection made with `connect`, getting one waits at
    /// most `timeout`), then brings the schema up to date with `migrator` (on Postgres under an
    /// advisory lock, so several nodes may start at once).
    async fn open(
        pool: sqlx::pool::PoolOptions<DB>,
        connect: <DB::Connection as sqlx::Connection>::Options,
        timeout: Duration,
        migrator: sqlx::migrate::Migrator,
    ) -> Result<Self, StoreError> {
        let pool = pool.acquire_timeout(timeout).connect_with(connect).await?;
        migrator.run(&pool).await?;
        Ok(Self { pool, timeout })
    }
}

/// Messages in Postgres, shared by every node of a cluster.
pub type PgStore = SqlStore<sqlx::Postgres>;
/// Messages in a local SQLite file (or in memory).
pub type SqliteStore = SqlStore<sqlx::Sqlite>;

/// What a store's append returns.
type Appending<'a> = BoxFuture<'a, Result<Vec<Appended>, StoreError>>;

/// What differs between the databases; [`Store`] is implemented once, for both, on top of it.
pub trait Dialect: sqlx::Database {
    /// The rooms, with their heads, named in a JSON array of names (`$1`).
    const HEADS: &'static str;
    /// The conversations, with their heads, of the people named in a JSON array (`$1`).
    const CONVERSATIONS: &'static str;
    /// [`Store::append`], the one operation whose SQL differs.
    fn append<'a>(
        store: &'a SqlStore<Self>,
        room: &'a Room,
        batch: &'a [NewMessage],
    ) -> Appending<'a>;
}

/// A stored row as the read queries return it: offset, content, name, time.
type Row = (i64, String, String, i64);

/// Everything else both databases run alike: the SQL is the same (SQLite takes `$N`
/// parameters too).
impl<DB> Store for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> i64: sqlx::Decode<'r, DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    for<'r> Row: sqlx::FromRow<'r, DB::Row>,
    for<'r> (String, i64): sqlx::FromRow<'r, DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    fn append<'a>(&'a self, room: &'a Room, batch: &'a [NewMessage]) -> Appending<'a> {
        DB::append(self, room, batch)
    }

    fn read_after<'a>(
        &'a self,
        room: &'a Room,
        after: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Message>, StoreError>> {
        Box::pin(async move {
            let rows: Vec<Row> = timed(
                self.timeout,
                sqlx::query_as(
                    "select id, content, name, at_ms from room_messages where room = $1 and id > $2 order by id limit $3",
                )
                .bind(room.key())
                .bind(after)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool),
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|(offset, content, name, at)| Message {
                    room: room.clone(),
                    offset,
                    content,
                    name,
                    at,
                })
                .collect())
        })
    }

    fn head<'a>(&'a self, room: &'a Room) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let head: Option<i64> = timed(
                self.timeout,
                sqlx::query_scalar("select head from rooms where name = $1")
                    .bind(room.key())
                    .fetch_optional(&self.pool),
            )
            .await?;
            Ok(head.unwrap_or(0))
        })
    }

    fn heads<'a>(&'a self, rooms: &'a [Room]) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>> {
        let names: Vec<&str> = rooms.iter().map(Room::key).collect();
        Box::pin(self.room_heads(DB::HEADS, serde_json::to_string(&names)))
    }

    fn conversations<'a>(
        &'a self,
        people: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<RoomHead>, StoreError>> {
        Box::pin(self.room_heads(DB::CONVERSATIONS, serde_json::to_string(people)))
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

impl<DB> SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'r> (String, i64): sqlx::FromRow<'r, DB::Row>,
{
    /// Runs a query of rooms and heads whose one parameter is a JSON array.
    async fn room_heads(
        &self,
        query: &'static str,
        list: serde_json::Result<String>,
    ) -> Result<Vec<RoomHead>, StoreError> {
        // A list of strings always encodes.
        let list = list.unwrap_or_else(|_| "[]".to_owned());
        let rows: Vec<(String, i64)> = timed(
            self.timeout,
            sqlx::query_as(query).bind(list).fetch_all(&self.pool),
        )
        .await?;
        Ok(rows
            .into_iter()
            .map(|(name, head)| (Room::from_key(&name), head))
            .collect())
    }
}

/// Runs a query future with the store's time limit.
async fn timed<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Timeout),
    }
}
