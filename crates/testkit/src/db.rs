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

/// Where Debian keeps the Postgres server binaries (`initdb`, `postgres`).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// How long a private server has to start or stop.
const PG_START_LIMIT: Duration = Duration::from_secs(30);

/// A Postgres server of this test's own (a fresh cluster in a temporary directory, run as the
/// `postgres` user, fsync off), listening on `listen`: for tests that restart the database or
/// reach it from another network namespace. Stopped and removed when dropped.
pub struct PrivatePostgres {
    pub listen: std::net::IpAddr,
    pub port: u16,
    dir: TempDir,
    uid: u32,
    gid: u32,
    child: Option<tokio::process::Child>,
}

impl PrivatePostgres {
    /// Creates the cluster and starts the server on `listen:port`.
    pub async fn start(listen: std::net::IpAddr, port: u16) -> PrivatePostgres {
        let (uid, gid) = postgres_user();
        let dir = tempfile::Builder::new()
            .prefix("chorus_pg")
            .tempdir()
            .expect("temporary directory");
        let chown = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .status()
            .expect("run chown");
        assert!(chown.success(), "chown the private Postgres directory");
        let status = tokio::process::Command::new(format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .uid(uid)
            .gid(gid)
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("initdb runs");
        assert!(status.success(), "initdb of the private Postgres failed");
        // Trust any host: the server listens on a test bridge only, for the test's own hosts.
        let hba = dir.path().join("data/pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        rules.push_str("\nhost all all 0.0.0.0/0 trust\n");
        std::fs::write(&hba, rules).expect("write pg_hba.conf");
        let mut pg = PrivatePostgres {
            listen,
            port,
            dir,
            uid,
            gid,
            child: None,
        };
        pg.start_again().await;
        pg
    }

    /// Starts the server again after [`PrivatePostgres::stop`], on the same address and data.
    pub async fn start_again(&mut self) {
        let child = tokio::process::Command::new(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", &format!("listen_addresses={}", self.listen)])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .uid(self.uid)
            .gid(self.gid)
            // Its log goes to the test's output, shown when the test fails.
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        let url = self.admin_url();
        crate::fixture::wait_for(
            PG_START_LIMIT,
            "the private Postgres to accept connections",
            || {
                let url = url.clone();
                async move { PgConnection::connect(&url).await.is_ok() }
            },
        )
        .await;
    }

    /// The server's `postgres` database, as its superuser.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.listen, self.port)
    }

    /// Stops the server (a fast shutdown: sessions are cut, work in flight rolls back).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                crate::process::signal(pid, "INT");
            }
            tokio::time::timeout(PG_START_LIMIT, child.wait())
                .await
                .expect("the private Postgres stops within 30 s")
                .expect("wait for postgres");
        }
    }
}

/// The uid and gid of the `postgres` user, which the server must run as.
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("no postgres user (Debian's postgresql package makes it)"))
    };
    (id("-u"), id("-g"))
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // An immediate shutdown: the postmaster stops its backends and exits; nothing waits.
        if let Some(pid) = self.child.as_ref().and_then(tokio::process::Child::id) {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
    }
}
