//! Databases of one test: a fresh Postgres database (also the bench's, on any server it is
//! given), and a SQLite file in a temporary directory that is removed with it.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

use crate::fixture::{POLL, unique};

/// The local Postgres, as a user allowed to create databases.
pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long [`TestDb::wait_stored`] waits for the rows.
const STORED_LIMIT: Duration = Duration::from_secs(60);

/// A Postgres database of its own.
#[derive(Debug)]
pub struct TestDb {
    /// The database's URL, for nodes and queries.
    pub url: String,
    name: String,
    /// The URL that created it, to drop it again.
    admin: String,
}

impl AsRef<str> for TestDb {
    fn as_ref(&self) -> &str {
        &self.url
    }
}

impl TestDb {
    /// A fresh database for one test on the local Postgres (`chorus_t_...`; `scripts/test` drops
    /// those left by earlier runs).
    pub async fn new() -> TestDb {
        TestDb::create(PG_ADMIN, &unique("chorus_t"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "could not create a database on {PG_ADMIN} ({e}); scripts/test starts Postgres"
                )
            })
    }

    /// Creates the database `name` (dropping one left by an earlier run) through `admin_url`,
    /// which names a database on the same server, like `postgres://user@host/postgres`.
    pub async fn create(admin_url: &str, name: &str) -> Result<TestDb, sqlx::Error> {
        let (server, _) = admin_url.rsplit_once('/').ok_or_else(|| {
            sqlx::Error::Configuration(format!("{admin_url} does not end in /DATABASE").into())
        })?;
        let mut admin = PgConnection::connect(admin_url).await?;
        // The name is the caller's own (a prefix and digits), never input from outside.
        let drop = format!("drop database if exists {name} with (force)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut admin)
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(TestDb {
            url: format!("{server}/{name}"),
            name: name.to_owned(),
            admin: admin_url.to_owned(),
        })
    }

    /// Drops the database now (tests leave theirs for `scripts/test` to drop, to look at after
    /// a failure).
    pub async fn drop_now(self) -> Result<(), sqlx::Error> {
        let mut admin = PgConnection::connect(&self.admin).await?;
        let drop = format!("drop database if exists {} with (force)", self.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut admin)
            .await?;
        admin.close().await
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection of the test's own.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to test database")
    }

    /// Rows in `messages`.
    pub async fn count(&self) -> i64 {
        count(&mut self.connect().await).await
    }

    /// Waits until the database holds at least `rows` messages (60 s at most).
    pub async fn wait_stored(&self, rows: i64) {
        let mut conn = self.connect().await;
        let start = tokio::time::Instant::now();
        loop {
            let n = count(&mut conn).await;
            if n >= rows {
                return;
            }
            assert!(
                start.elapsed() < STORED_LIMIT,
                "only {n} of {rows} messages stored after {STORED_LIMIT:?}: the load stalled"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn count(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar("select count(*) from messages")
        .fetch_one(conn)
        .await
        .expect("count messages")
}

/// A SQLite database file in a temporary directory, removed when this is dropped: keep it
/// until the node using it has stopped.
#[derive(Debug)]
pub struct TestSqlite {
    /// `sqlite://.../chat.db`, for a node's `DATABASE_URL`.
    pub url: String,
    _dir: TempDir,
}

impl AsRef<str> for TestSqlite {
    fn as_ref(&self) -> &str {
        &self.url
    }
}

impl TestSqlite {
    pub fn new() -> TestSqlite {
        let dir = tempfile::Builder::new()
            .prefix("chorus_sqlite")
            .tempdir()
            .expect("temporary directory");
        TestSqlite {
            url: format!("sqlite://{}", dir.path().join("chat.db").display()),
            _dir: dir,
        }
    }

    /// Rows in `messages` (the node has created the file by then).
    pub async fn count(&self) -> i64 {
        let mut conn = sqlx::SqliteConnection::connect(&self.url)
            .await
            .expect("open the test SQLite file");
        sqlx::query_scalar("select count(*) from messages")
            .fetch_one(&mut conn)
            .await
            .expect("count messages")
    }
}

impl Default for TestSqlite {
    fn default() -> Self {
        Self::new()
    }
}
