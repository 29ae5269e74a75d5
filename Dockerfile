# chorus container image: `docker build -t chorus .`, then `docker run -p 3000:3000 chorus`.
# Without DATABASE_URL the node keeps SQLite in /data/chorus.db (mount a volume there to keep it);
# with DATABASE_URL=postgres://... and REDIS_URL it is one node of a cluster (docker-compose.yml).

# ---- build --------------------------------------------------------------------------------------
# Same toolchain as rust-version/edition 2024 in Cargo.toml need, on Debian 12 so the binary links
# against the glibc of the runtime stage. The slim image has gcc, which the bundled SQLite needs.
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when a manifest or Cargo.lock
# changes, not on every source edit. Cargo reads every workspace member's manifest and wants a
# target file for each, so the server and the members (the test kit and the bench, never built
# here) get empty stand-ins; building -p chorus then compiles the server's dependencies alone.
COPY Cargo.toml Cargo.lock ./
COPY crates/testkit/Cargo.toml crates/testkit/
COPY crates/bench/Cargo.toml crates/bench/
# A dependency patched for chorus ([patch.crates-io] in Cargo.toml), needed to resolve the rest.
COPY patches ./patches
RUN mkdir -p src crates/testkit/src crates/bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs crates/testkit/src/lib.rs \
    && echo 'fn main() {}' > crates/bench/src/main.rs \
    && cargo build --release --locked -p chorus \
    && rm -rf src

# The real sources. The binary embeds migrations/ (sqlx::migrate!) and assets/ (include_str!).
COPY src ./src
COPY migrations ./migrations
COPY assets ./assets
# COPY keeps the files' own modification times, which can be older than the stand-ins built
# above; touching them makes cargo see the crate as changed and compile the real code.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p chorus \
    && cp target/release/chorus /usr/local/bin/chorus

# ---- runtime ------------------------------------------------------------------------------------
FROM debian:12.13-slim

# ca-certificates only: the system trust store, for anything in the image that opens TLS. The
# binary itself needs no shared library beyond glibc (SQLite is built in) and is its own health
# check client, so there is no curl.
# The version is left to the base image's archive: Debian drops superseded versions, so an exact
# pin would break the build at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid, so Kubernetes' runAsNonRoot can verify it from the image. /data is the only
# writable place it needs, for the SQLite default (a Postgres node writes nothing to disk).
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin chorus \
    && mkdir /data \
    && chown chorus:chorus /data
WORKDIR /data

COPY --from=build /usr/local/bin/chorus /usr/local/bin/chorus

USER 10001:10001
ENV HOST=0.0.0.0 PORT=3000
EXPOSE 3000

# Liveness only: a node whose store or Redis is down still serves and recovers by itself, so
# Docker should not report it broken. Orchestrators that route traffic use `--ready` (/readyz).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["chorus", "healthcheck"]

# SIGTERM starts the graceful drain: /readyz answers 503, sockets close so clients reconnect to
# another node, and the write batch in progress commits before exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chorus"]
