# tidemark container image.
#
#   docker build -t tidemark .
#   docker run -d --name tidemark -p 6432:6432 -p 9187:9187 \
#       -v "$PWD/tidemark.toml:/etc/tidemark/tidemark.toml:ro" tidemark
#
# The image holds no configuration: mount one at /etc/tidemark/tidemark.toml (start from
# packaging/tidemark.toml). Inside a container, `listen` and `metrics.listen` must bind
# 0.0.0.0 to be reachable through published ports. See docs/operations.md.

# --- build ------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

# pg_query (tidemark-sql's parser) compiles libpg_query with the C compiler the image has
# and generates its bindings with bindgen, which needs libclang.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# A production build: --no-default-features leaves out the `dev` feature (`tidemark dev`,
# the embedded test cluster and rcgen). --locked builds exactly what Cargo.lock says.
RUN cargo build --release -p tidemark --no-default-features --locked \
    && install -m 0755 target/release/tidemark /usr/local/bin/tidemark

# --- runtime ----------------------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tidemark \
    && useradd --system --uid 10001 --gid tidemark --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tidemark \
    && mkdir -p /etc/tidemark

COPY --from=builder /usr/local/bin/tidemark /usr/bin/tidemark
COPY LICENSE-MIT LICENSE-APACHE /usr/share/doc/tidemark/

USER tidemark:tidemark

# 6432: the client listener (`listen`; the example config and README use 0.0.0.0:6432).
# 9187: `metrics.listen` (GET /metrics, GET /), off unless the config sets it.
EXPOSE 6432 9187

# tidemark has no health endpoint yet; this checks that the client listener accepts TCP
# connections on port 6432 (bash's /dev/tcp, so no curl in the image). A connection closed
# before its startup packet is dropped silently by tidemark, so this does not fill the log.
# Change the port here if your config listens elsewhere.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/6432"]

# SIGTERM (docker stop) shuts down gracefully: idle clients get 57P01, running
# transactions get up to limits.shutdown_timeout (10s by default). Give `docker stop` a
# longer timeout than that (e.g. --stop-timeout 15) so it does not SIGKILL first.
ENTRYPOINT ["tidemark"]
CMD ["--config", "/etc/tidemark/tidemark.toml"]
