//! One cell of the matrix: its proxy, the simulated users' connections and loop, their tallies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use super::{profile_name, CellResult, Ctx, Mode, Profile, RywArgs, FEED_ROWS};
use crate::pg_error;
use crate::procs::{self, ProcGuard, TidemarkOpts};
use crate::report::percentile;

const UPDATE_SQL: &str = "UPDATE ryw SET version = version + 1 WHERE id = $1 RETURNING version";
const SELECT_SQL: &str = "SELECT version, pg_is_in_recovery(), \
                          (SELECT version FROM ryw WHERE id = $2) FROM ryw WHERE id = $1";

/// How a connection sends the workload's two statements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Statements {
    /// Named prepared statements (Parse once, then Bind/Execute): what most drivers do.
    Prepared,
    /// An unnamed statement per execution (Parse/Bind/Describe/Execute/Sync in one round trip,
    /// tokio-postgres' `query_typed`).
    Unnamed,
}

impl Statements {
    /// The form `mode` runs with. Every Pgpool-II mode runs unnamed: Pgpool (4.3) routes a
    /// *named* statement by where its Parse went and, outside an explicit transaction, `Bind()`
    /// keeps that destination, so `disable_load_balance_on_write` does not act per statement
    /// (a SELECT prepared before any write keeps reading a replica under `always`). With
    /// `dml_adaptive` it is worse: the Parse of every named statement goes to both the primary
    /// and the session's load-balance node (`pool_setall_node_to_be_sent` in `Parse()`), the
    /// UPDATE then executes on the standby too, fails there ("cannot execute UPDATE in a
    /// read-only transaction") and Pgpool ends the session with FATAL "kind mismatch among
    /// backends". Unnamed statements are routed per statement, as Pgpool documents.
    pub(super) fn for_mode(mode: Mode, unnamed: bool) -> Statements {
        // PgBouncer 1.18 in transaction pooling has no named statements either (a statement
        // prepared on one server connection is unknown on the next).
        if unnamed
            || matches!(
                mode,
                Mode::Pgpool(_) | Mode::Pgbouncer | Mode::NaivePgbouncer
            )
        {
            Statements::Unnamed
        } else {
            Statements::Prepared
        }
    }

    fn name(self) -> &'static str {
        match self {
            Statements::Prepared => "prepared",
            Statements::Unnamed => "unnamed",
        }
    }
}

struct Pg {
    client: Client,
    /// The prepared UPDATE and SELECT; `None` with unnamed statements.
    prepared: Option<(Statement, Statement)>,
}

impl Pg {
    /// An ORM-style request: `BEGIN`, `body`, `COMMIT` (`ROLLBACK` after an error, which is
    /// returned).
    async fn in_tx<T>(
        &self,
        body: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, tokio_postgres::Error> {
        self.client.simple_query("BEGIN").await?;
        match body.await {
            Ok(v) => {
                self.client.simple_query("COMMIT").await?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.client.simple_query("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// [`Pg::write`], as an ORM saves: in a transaction that first loads the row.
    async fn write_as(&self, id: i32, orm: bool) -> Result<i64, tokio_postgres::Error> {
        if !orm {
            return self.write(id).await;
        }
        // The load reads what an ORM loads (not `pg_is_in_recovery()`, which differs between
        // a replica and the primary by design and would make every optimistic replay diverge).
        self.in_tx(async {
            self.client
                .query_typed_one(
                    "SELECT version, body FROM ryw WHERE id = $1",
                    &[(&id, Type::INT4)],
                )
                .await?;
            self.write(id).await
        })
        .await
    }

    /// [`Pg::read`], in a transaction of its own when `orm`.
    async fn read_as(
        &self,
        id: i32,
        other: i32,
        orm: bool,
    ) -> Result<(i64, bool), tokio_postgres::Error> {
        if orm {
            self.in_tx(self.read(id, other)).await
        } else {
            self.read(id, other).await
        }
    }

    /// Bumps the version of row `id`; returns the new version.
    async fn write(&self, id: i32) -> Result<i64, tokio_postgres::Error> {
        let row = match &self.prepared {
            Some((upd, _)) => self.client.query_one(upd, &[&id]).await?,
            None => {
                self.client
                    .query_typed_one(UPDATE_SQL, &[(&id, Type::INT4)])
                    .await?
            }
        };
        Ok(row.get(0))
    }

    /// The version of row `id` and whether the server is a replica (row `other` is read too).
    async fn read(&self, id: i32, other: i32) -> Result<(i64, bool), tokio_postgres::Error> {
        let row = match &self.prepared {
            Some((_, sel)) => self.client.query_one(sel, &[&id, &other]).await?,
            None => {
                self.client
                    .query_typed_one(SELECT_SQL, &[(&id, Type::INT4), (&other, Type::INT4)])
                    .await?
            }
        };
        Ok((row.get(0), row.get(1)))
    }
}

async fn connect(port: u16, key: Option<i32>, statements: Statements) -> Result<Pg> {
    let pg = connect_db(port, "postgres", statements).await?;
    if let Some(id) = key {
        pg.client
            .simple_query(&format!("SET tidemark.key = 'user:{id}'"))
            .await
            .map_err(|e| anyhow::anyhow!("SET tidemark.key: {}", pg_error(&e)))?;
    }
    Ok(pg)
}

/// A connection to database `db` on `port` (a node, a proxy, or one of PgBouncer's pools).
async fn connect_db(port: u16, db: &str, statements: Statements) -> Result<Pg> {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname={db} connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to port {port}: {}", pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let prepared = match statements {
        Statements::Unnamed => None,
        Statements::Prepared => {
            let upd = client
                .prepare(UPDATE_SQL)
                .await
                .map_err(|e| anyhow::anyhow!("preparing the UPDATE: {}", pg_error(&e)))?;
            let sel = client
                .prepare(SELECT_SQL)
                .await
                .map_err(|e| anyhow::anyhow!("preparing the SELECT: {}", pg_error(&e)))?;
            Some((upd, sel))
        }
    };
    Ok(Pg { client, prepared })
}

#[derive(Default)]
struct UserStats {
    writes: u64,
    reads: u64,
    stale: u64,
    read_backs: u64,
    stale_read_backs: u64,
    replica_reads: u64,
    errors: u64,
    first_error: Option<String>,
    lat_us: Vec<u32>,
}

impl UserStats {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// One user's connections: `primary` for writes (and reads in some modes), `replicas` for
/// direct replica reads, or a single `proxy` connection through tidemark (and, for
/// `tidemark-causal`, a second one, `reader`, that reads what `proxy` wrote).
struct UserConns {
    id: i32,
    primary: Option<Pg>,
    replicas: Vec<Pg>,
    proxy: Option<Pg>,
    reader: Option<Pg>,
}

async fn user_loop(
    mode: Mode,
    u: UserConns,
    feed_reads: usize,
    think: Duration,
    rows: i32,
    deadline: Instant,
    orm: bool,
) -> UserStats {
    let mut st = UserStats {
        lat_us: Vec::with_capacity(1 << 14),
        ..UserStats::default()
    };
    let mut rng = StdRng::seed_from_u64(u.id as u64 * 7919);
    let mut rr = u.id as usize;
    let Some(writer) = u.proxy.as_ref().or(u.primary.as_ref()) else {
        st.error("no connection");
        return st;
    };
    // Users do not start in lockstep (real ones don't): each starts within one think time.
    // In lockstep, every user's first read-back needs a replica connection at the same
    // instant, and a proxy's pool opens that many new server connections at once (~50 ms
    // each on this machine): a burst of start-up latency, not a routing cost.
    let offset = think.mul_f64(f64::from((u.id.unsigned_abs() * 37) % 100) / 100.0);
    tokio::time::sleep(offset).await;
    while Instant::now() < deadline {
        if writer.client.is_closed() {
            st.error("connection closed");
            break;
        }
        let written = match writer.write_as(u.id, orm).await {
            Ok(v) => v,
            Err(e) => {
                st.error(format!("write: {}", pg_error(&e)));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let wrote_at = Instant::now();
        st.writes += 1;
        for k in 0..=feed_reads {
            if k > 0 && !think.is_zero() {
                tokio::time::sleep(think).await;
            }
            if Instant::now() >= deadline {
                break;
            }
            let other = if k == 0 {
                u.id
            } else {
                rng.gen_range(1..=rows)
            };
            let conn = match mode {
                Mode::Tidemark | Mode::Pgpool(_) | Mode::Pgbouncer => writer,
                Mode::TidemarkCausal => u.reader.as_ref().unwrap_or(writer),
                Mode::Primary => writer,
                Mode::Pin(d) if wrote_at.elapsed() < d => writer,
                Mode::Naive | Mode::NaivePgbouncer | Mode::Pin(_) => {
                    rr += 1;
                    &u.replicas[rr % u.replicas.len()]
                }
            };
            let t = Instant::now();
            match conn.read_as(u.id, other, orm).await {
                Ok((version, in_recovery)) => {
                    st.lat_us
                        .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    st.reads += 1;
                    if in_recovery {
                        st.replica_reads += 1;
                    }
                    let stale = version < written;
                    st.stale += stale as u64;
                    if k == 0 {
                        st.read_backs += 1;
                        st.stale_read_backs += stale as u64;
                    }
                }
                Err(e) => st.error(format!("read: {}", pg_error(&e))),
            }
        }
    }
    st
}

/// Prints tidemark's `SHOW TRANSACTIONS` (outcomes, replays) after an ORM-style cell.
async fn show_transactions(port: u16, mode_name: &str, profile: Profile) {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=tidemark connect_timeout=10");
    let Ok((client, conn)) = tokio_postgres::connect(&conninfo, NoTls).await else {
        eprintln!("  (SHOW TRANSACTIONS: the console did not answer)");
        return;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let Ok(msgs) = client.simple_query("SHOW TRANSACTIONS").await else {
        eprintln!("  (SHOW TRANSACTIONS failed)");
        return;
    };
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let cols: Vec<String> = r
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{}={}", c.name(), r.get(i).unwrap_or("")))
                .collect();
            eprintln!(
                "  transactions {} / {mode_name}: {}",
                super::profile_name(profile),
                cols.join(" ")
            );
        }
    }
}

pub(super) async fn run_cell(
    ctx: &Ctx,
    args: &RywArgs,
    mode: Mode,
    mode_name: &str,
    profile: Profile,
    duration: Duration,
) -> Result<CellResult> {
    let c = &ctx.cluster;
    let mut proxy: Option<(ProcGuard, u16)> = None;
    if mode.is_tidemark() {
        let bin = ctx
            .tidemark_bin
            .as_deref()
            .context("the tidemark binary is needed for mode tidemark")?;
        let opts = TidemarkOpts {
            consistency: if mode == Mode::TidemarkCausal {
                "causal"
            } else {
                "session"
            },
            track_writes: true,
            max_wait: ctx.max_wait.clone(),
            wait: ctx.wait.clone(),
            transactions: ctx.transactions.clone(),
        };
        proxy = Some(procs::start_tidemark(bin, c, &opts, ctx.scratch.path(), "ryw").await?);
    }
    let mut _proxy_dir = None;
    // A peer proxy runs as `postgres` when the bench runs as root, from a directory of its own.
    let peer = |program: &str, package: &str, what: &str| -> Result<_> {
        let bin = procs::ensure_program(program, package)
            .with_context(|| format!("{what} is not installed (apt-get install {package})"))?;
        let owner = if procs::is_root() {
            procs::lookup_account("postgres")
        } else {
            None
        };
        let d = procs::scratch_dir(&format!("tidemark-bench-{program}"), owner)?;
        Ok((bin, owner, d))
    };
    if let Mode::Pgpool(which) = mode {
        let (bin, owner, d) = peer("pgpool", "pgpool2", "Pgpool-II")?;
        proxy = Some(procs::start_pgpool(&bin, c, d.path(), owner, which).await?);
        _proxy_dir = Some(d);
    }
    if matches!(mode, Mode::Pgbouncer | Mode::NaivePgbouncer) {
        let (bin, owner, d) = peer("pgbouncer", "pgbouncer", "PgBouncer")?;
        proxy = Some(procs::start_pgbouncer(&bin, c, d.path(), owner).await?);
        _proxy_dir = Some(d);
    }
    let statements = Statements::for_mode(mode, args.unnamed);
    let mut users = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let id = i as i32 + 1;
        let mut u = UserConns {
            id,
            primary: None,
            replicas: vec![],
            proxy: None,
            reader: None,
        };
        match mode {
            Mode::Tidemark => {
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.proxy = Some(connect(port, Some(id), statements).await?);
            }
            Mode::TidemarkCausal => {
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.proxy = Some(connect(port, None, statements).await?);
                u.reader = Some(connect(port, None, statements).await?);
            }
            Mode::Pgpool(_) | Mode::Pgbouncer => {
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.proxy = Some(connect(port, None, statements).await?);
            }
            Mode::Primary => u.primary = Some(connect(c.port(0), None, statements).await?),
            Mode::Naive | Mode::Pin(_) => {
                u.primary = Some(connect(c.port(0), None, statements).await?);
                for r in 1..c.node_count() {
                    u.replicas.push(connect(c.port(r), None, statements).await?);
                }
            }
            Mode::NaivePgbouncer => {
                // The pools PgBouncer keeps per node (`procs::start_pgbouncer`).
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.primary = Some(connect_db(port, "postgres", statements).await?);
                for r in 1..c.node_count() {
                    let db = procs::pgbouncer_node_db(r);
                    u.replicas.push(connect_db(port, &db, statements).await?);
                }
            }
        }
        users.push(u);
    }
    // Warm-up, the same for every mode: each user writes once and reads twice on each of its
    // connections, all users at once. A proxy starts with empty server pools, and a cold
    // pool's first statements open server connections and prepare statements on them (several
    // ms each): without this, that start-up cost, not the routing, would be the proxy rows'
    // p99 in a short cell, while the direct modes' connections are already open.
    let warm: Vec<_> = users
        .into_iter()
        .map(|u| {
            tokio::spawn(async move {
                if let Some(w) = u.proxy.as_ref().or(u.primary.as_ref()) {
                    let _ = w.write(u.id).await;
                }
                let conns = u
                    .proxy
                    .iter()
                    .chain(u.reader.iter())
                    .chain(u.primary.iter())
                    .chain(u.replicas.iter());
                for pg in conns {
                    for _ in 0..2 {
                        let _ = pg.read(u.id, u.id).await;
                    }
                }
                u
            })
        })
        .collect();
    let mut users = Vec::with_capacity(warm.len());
    for h in warm {
        users.push(h.await.context("a warm-up task panicked")?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let pauser = if profile == Profile::Paused {
        let cl = Arc::clone(c);
        Some(tokio::spawn(async move {
            tokio::time::sleep(duration.mul_f64(0.2)).await;
            let cl2 = Arc::clone(&cl);
            tokio::task::spawn_blocking(move || -> Result<()> {
                for r in 1..cl2.node_count() {
                    cl2.pause_replay(r)?;
                }
                Ok(())
            })
            .await??;
            tokio::time::sleep(duration.mul_f64(0.6)).await;
            tokio::task::spawn_blocking(move || -> Result<()> {
                for r in 1..cl.node_count() {
                    cl.resume_replay(r)?;
                }
                Ok(())
            })
            .await??;
            Ok::<(), anyhow::Error>(())
        }))
    } else {
        None
    };
    let handles: Vec<_> = users
        .into_iter()
        .map(|u| {
            tokio::spawn(user_loop(
                mode,
                u,
                args.feed_reads,
                args.think,
                FEED_ROWS,
                deadline,
                args.orm,
            ))
        })
        .collect();
    let mut all = UserStats::default();
    for h in handles {
        let s = h.await.context("a user task panicked")?;
        all.writes += s.writes;
        all.reads += s.reads;
        all.stale += s.stale;
        all.read_backs += s.read_backs;
        all.stale_read_backs += s.stale_read_backs;
        all.replica_reads += s.replica_reads;
        all.errors += s.errors;
        if all.first_error.is_none() {
            all.first_error = s.first_error;
        }
        all.lat_us.extend(s.lat_us);
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(p) = pauser {
        p.await.context("the pause task panicked")??;
    }
    if args.orm && mode.is_tidemark() {
        if let Some((_, port)) = &proxy {
            show_transactions(*port, mode_name, profile).await;
        }
    }
    drop(proxy);
    all.lat_us.sort_unstable();
    let pct = |a: u64, b: u64| {
        if b == 0 {
            f64::NAN
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    Ok(CellResult {
        profile: profile_name(profile),
        mode: mode_name.to_string(),
        statements: statements.name(),
        seconds: secs,
        users: args.users,
        writes: all.writes,
        reads: all.reads,
        stale: all.stale,
        stale_pct: pct(all.stale, all.reads),
        read_backs: all.read_backs,
        stale_read_backs: all.stale_read_backs,
        replica_reads: all.replica_reads,
        replica_pct: pct(all.replica_reads, all.reads),
        read_p50_us: percentile(&all.lat_us, 50.0),
        read_p99_us: percentile(&all.lat_us, 99.0),
        reads_per_s: all.reads as f64 / secs,
        writes_per_s: all.writes as f64 / secs,
        errors: all.errors,
        first_error: all.first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::super::parse_mode;
    use super::*;

    #[test]
    fn pgpool_modes_run_unnamed() {
        for m in ["pgpool-dml_adaptive", "pgpool-transaction", "pgpool-always"] {
            let m = parse_mode(m).unwrap();
            assert_eq!(Statements::for_mode(m, false), Statements::Unnamed);
        }
        for m in [Mode::Tidemark, parse_mode("naive").unwrap()] {
            assert_eq!(Statements::for_mode(m, false), Statements::Prepared);
            assert_eq!(Statements::for_mode(m, true), Statements::Unnamed);
        }
    }
}
