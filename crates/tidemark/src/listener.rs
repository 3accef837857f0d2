//! Accepting clients: the startup packet (SSLRequest answered `S` and a TLS handshake when
//! `[tls]` is configured, else `N`; GSSENCRequest `N`; CancelRequest forwarded),
//! authentication, hand-off to a [`Session`]; graceful shutdown; the Prometheus endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tidemark_wire::backend::ErrorFields;
use tidemark_wire::StartupPacket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;
use crate::client::{ClientIo, ClientRead, ClientWrite};
use crate::config::{Config, TlsMode};
use crate::monitor::Monitor;
use crate::session::Session;

/// A running proxy.
pub struct Proxy {
    pub app: Arc<App>,
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Binds, starts the monitor and accepts clients in the background.
    pub async fn start(config: Config) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let metrics_listen = config.metrics.listen.clone();
        let tls = crate::tls::acceptor(&config.tls)?;
        let app = App::new(config)?;
        app.tls.store(tls.map(Arc::new));
        Monitor::start(app.clone());
        let metrics_addr = match metrics_listen {
            Some(m) => Some(crate::http::start(app.clone(), &m).await?),
            None => None,
        };
        let a2 = app.clone();
        tokio::spawn(catalog_loader(app.clone()));
        tokio::spawn(reaper(app.clone()));
        tokio::spawn(crate::shared::upkeep(app.clone()));
        let accept = tokio::spawn(async move {
            let mut shutdown = a2.shutting_down.subscribe();
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            // Sockets that have not logged in yet are bounded: beyond the cap
                            // they are closed at once, before any work is spent on them.
                            let Some(pending) = LoginSlot::take(&a2) else {
                                crate::metrics::login_refused();
                                drop(stream);
                                continue;
                            };
                            let app = a2.clone();
                            tokio::spawn(async move { handle(app, stream, peer, pending).await });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        });
        Ok(Proxy {
            app,
            addr,
            metrics_addr,
            accept,
        })
    }

    /// Waits until the monitor has seen a primary (or `timeout` passes).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.app.view.load();
            if v.primary_id().is_some() && v.nodes.iter().all(|n| n.healthy) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting, tells idle clients 57P01, waits for running transactions up to
    /// `limits.shutdown_timeout`.
    pub async fn shutdown(self) {
        let _ = self.app.shutting_down.send(true);
        self.app.shut_down_clients();
        self.accept.abort();
        let limit = self.app.config.load().limits.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        while self.app.client_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Closes idle connections past their timeouts and keeps `pool.min_size` connections
/// open in every pool in use.
async fn reaper(app: Arc<App>) {
    let mut t = tokio::time::interval(Duration::from_secs(1));
    let mut seen = std::collections::HashMap::new();
    loop {
        t.tick().await;
        let (min, idle) = {
            let cfg = app.config.load();
            (cfg.pool.min_size, cfg.pool.idle_timeout)
        };
        if min == 0 {
            app.pools
                .drop_idle(&mut seen, idle, std::time::Instant::now());
        }
        for p in app.pools.all() {
            p.reap();
            if app.view.load().node(p.key.node).is_some_and(|n| n.healthy) {
                p.top_up(min).await;
            }
        }
    }
}

/// Loads function volatility from the primary (at start and every 5 minutes).
async fn catalog_loader(app: Arc<App>) {
    loop {
        let view = app.view.load_full();
        if let Some(p) = view.primary_id() {
            match load_catalog(&app, p).await {
                Ok(n) => {
                    tracing::info!(functions = n, "function catalog loaded");
                    tokio::time::sleep(Duration::from_secs(300)).await;
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "cannot load the function catalog yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn load_catalog(app: &App, node: usize) -> anyhow::Result<usize> {
    let client = app.monitor_client(node, "tidemark-catalog").await?;
    let rows = client
        .simple_query(tidemark_sql::FunctionCatalog::LOAD_SQL)
        .await?;
    let mut cat = tidemark_sql::FunctionCatalog::new();
    for m in rows {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            let (Some(s), Some(f), Some(v)) = (r.get(0), r.get(1), r.get(2)) else {
                continue;
            };
            if let Some(v) = tidemark_sql::Volatility::from_provolatile(v) {
                cat.insert(s, f, v);
            }
        }
    }
    let len = cat.len();
    app.classifier.set_catalog(cat);
    Ok(len)
}

/// Sends a login error on a client connection already framed by `ClientIo`, counted by SQLSTATE.
async fn refuse(io: &mut ClientIo, e: ErrorFields) {
    crate::metrics::error(&e.code);
    let _ = io.send(&e.to_error()).await;
}

async fn reject<S: AsyncWrite + Unpin>(mut stream: S, e: ErrorFields) {
    crate::metrics::error(&e.code);
    let _ = stream.write_all(e.to_error().raw()).await;
    let _ = stream.flush().await;
}

/// An unknown user gets what a wrong password gets (a full SCRAM exchange, then 28P01), so
/// users cannot be enumerated; the reason is logged here only.
async fn unknown_user(
    app: &App,
    io: &mut ClientIo,
    user: &str,
    peer: SocketAddr,
    why: &str,
    deadline: tokio::time::Instant,
) {
    tracing::info!(peer = %peer, user = %user, "login refused: user {why}");
    let fake = app.decoy_secret(user);
    let r = tokio::time::timeout_at(deadline, crate::auth::scram_exchange(io, user, &fake)).await;
    if let Ok(Ok(Err(e))) = r {
        refuse(io, e).await;
    }
}

/// One connection that has not finished logging in; freed when it logs in or goes away.
pub struct LoginSlot(Arc<App>);

impl LoginSlot {
    fn take(app: &Arc<App>) -> Option<LoginSlot> {
        let max = app.config.load().limits.max_pending_logins;
        let n = app
            .pending_logins
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if n >= max {
            app.pending_logins
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return None;
        }
        crate::metrics::pending_logins(1.0);
        Some(LoginSlot(app.clone()))
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        self.0
            .pending_logins
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        crate::metrics::pending_logins(-1.0);
    }
}

/// What came before the startup message.
enum Opening {
    Startup(tidemark_wire::StartupParams),
    /// SSLRequest: answer, then (for `S`) switch to TLS.
    Ssl,
    /// Cancel request handled, or the connection ended / was refused.
    Done,
}

/// Reads up to the startup message on `stream`, answering GSSENCRequest with `N` and
/// handling CancelRequest. `allow_ssl`: an SSLRequest is returned to the caller (plain TCP);
/// otherwise (already inside TLS) it is a protocol violation.
async fn opening<S: AsyncRead + AsyncWrite + Unpin>(
    app: &Arc<App>,
    stream: &mut S,
    buf: &mut BytesMut,
    allow_ssl: bool,
    deadline: tokio::time::Instant,
) -> Opening {
    loop {
        if buf.starts_with(&[b'X', 0, 0, 0, 4]) {
            // A Terminate before any startup packet (a driver closing a connection it has just
            // opened): PostgreSQL closes without a word, and so does tidemark.
            return Opening::Done;
        }
        match StartupPacket::decode(buf) {
            Ok(Some(StartupPacket::Ssl)) if allow_ssl => return Opening::Ssl,
            Ok(Some(StartupPacket::Ssl)) => {
                reject(
                    stream,
                    ErrorFields::fatal("08P01", "unexpected second SSLRequest"),
                )
                .await;
                return Opening::Done;
            }
            Ok(Some(StartupPacket::GssEnc)) => {
                if stream.write_all(b"N").await.is_err() || stream.flush().await.is_err() {
                    return Opening::Done;
                }
            }
            Ok(Some(StartupPacket::Cancel { pid, secret })) => {
                app.cancel(pid, secret).await;
                return Opening::Done;
            }
            Ok(Some(StartupPacket::Startup(p))) => return Opening::Startup(p),
            Ok(None) => {
                let r = tokio::time::timeout_at(deadline, stream.read_buf(buf)).await;
                match r {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Opening::Done,
                    Err(_) => {
                        reject(
                            stream,
                            ErrorFields::fatal("08P01", "timeout waiting for the startup packet"),
                        )
                        .await;
                        return Opening::Done;
                    }
                }
            }
            Err(e) => {
                reject(stream, ErrorFields::fatal("08P01", e.to_string())).await;
                return Opening::Done;
            }
        }
    }
}

async fn handle(app: Arc<App>, mut stream: TcpStream, peer: SocketAddr, slot: LoginSlot) {
    let _ = stream.set_nodelay(true);
    // One deadline for the whole login (startup, TLS, authentication), not one per read.
    let deadline = tokio::time::Instant::now() + app.config.load().limits.login_timeout;
    let mut login = Login {
        peer,
        tls: false,
        deadline,
        slot,
    };
    let mut buf = BytesMut::with_capacity(1024);
    let params = match opening(&app, &mut stream, &mut buf, true, deadline).await {
        Opening::Startup(p) => p,
        Opening::Done => return,
        Opening::Ssl => {
            let Some(acceptor) = app.tls.load_full() else {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
                // Go on in plain text: the client may send its startup message now.
                if let Opening::Startup(p) =
                    opening(&app, &mut stream, &mut buf, false, deadline).await
                {
                    let (rd, wr) = stream.into_split();
                    serve(app, ClientRead::Tcp(rd), Box::new(wr), buf, p, login).await;
                }
                return;
            };
            if !buf.is_empty() {
                // Bytes sent after SSLRequest before the handshake would be read as if they
                // had come through TLS (CVE-2021-23214-style injection): refuse.
                return reject(
                    stream,
                    ErrorFields::fatal("08P01", "unencrypted data after SSLRequest"),
                )
                .await;
            }
            if stream.write_all(b"S").await.is_err() {
                return;
            }
            let mut tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let mut buf = BytesMut::with_capacity(1024);
            match opening(&app, &mut tls, &mut buf, false, deadline).await {
                Opening::Startup(p) => {
                    let (rd, wr) = tokio::io::split(tls);
                    login.tls = true;
                    return serve(
                        app,
                        ClientRead::Other(Box::new(rd)),
                        Box::new(wr),
                        buf,
                        p,
                        login,
                    )
                    .await;
                }
                _ => return,
            }
        }
    };
    let (rd, wr) = stream.into_split();
    serve(app, ClientRead::Tcp(rd), Box::new(wr), buf, params, login).await
}

/// A connection being logged in.
struct Login {
    peer: SocketAddr,
    tls: bool,
    deadline: tokio::time::Instant,
    slot: LoginSlot,
}

/// After the startup message: limits, user and database checks, authentication, then the
/// session (or the admin console).
async fn serve(
    app: Arc<App>,
    rd: ClientRead,
    mut wr: ClientWrite,
    buf: BytesMut,
    params: tidemark_wire::StartupParams,
    login: Login,
) {
    let Login {
        peer,
        tls,
        deadline,
        slot,
    } = login;
    let cfg = app.config.load_full();
    if !tls && cfg.tls.mode == TlsMode::Require {
        return reject(
            &mut wr,
            ErrorFields::fatal(
                "28000",
                "tidemark requires TLS (tls.mode = \"require\"); connect with sslmode=require",
            ),
        )
        .await;
    }
    if app.client_count() >= cfg.limits.max_clients {
        return reject(
            &mut wr,
            ErrorFields::fatal(
                "53300",
                format!(
                    "sorry, too many clients already (limits.max_clients = {})",
                    cfg.limits.max_clients
                ),
            ),
        )
        .await;
    }
    let Some(user) = params.get("user").map(str::to_string) else {
        return reject(
            &mut wr,
            ErrorFields::fatal(
                "28000",
                "no PostgreSQL user name specified in startup packet",
            ),
        )
        .await;
    };
    if params
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        return reject(&mut wr, ErrorFields::fatal("0A000", "replication connections are not supported through tidemark; connect to the primary directly")).await;
    }
    let database = params.get("database").unwrap_or(&user).to_string();
    // Until login completes, messages are small (PostgreSQL's own startup limit).
    let mut io = ClientIo::new(rd, wr, buf, crate::config::MAX_LOGIN_MESSAGE);
    let unknown = |io, why| unknown_user(&app, io, &user, peer, why, deadline);
    let ucfg = cfg.user(&user).cloned();
    // Not in [[users]]: with [auth] configured, its verifier is looked up on the primary.
    let looked_up = match &ucfg {
        Some(_) => None,
        None if !cfg.auth.enabled() => {
            return unknown(&mut io, "is not configured in tidemark").await;
        }
        None => {
            let r = tokio::time::timeout_at(deadline, app.auth_query.lookup(&app, &user)).await;
            match r {
                Ok(Ok(crate::auth_query::Found::Verifier(s))) => Some(s),
                Ok(Ok(crate::auth_query::Found::Refused(why))) => {
                    return unknown(&mut io, why).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(peer = %peer, user = %user, error = %e, "auth_query lookup failed");
                    let e = ErrorFields::fatal(
                        "08006",
                        format!("cannot authenticate user \"{user}\": looking it up on the primary (auth_query) failed: {e}"),
                    );
                    return refuse(&mut io, e).await;
                }
                Err(_) => {
                    let e = ErrorFields::fatal(
                        "08006",
                        "cannot authenticate: looking the user up on the primary (auth_query) timed out",
                    );
                    return refuse(&mut io, e).await;
                }
            }
        }
    };
    let startup = match crate::session::startup_to_sets(&params) {
        Ok(s) => s,
        Err(e) => return refuse(&mut io, ErrorFields::fatal("08P01", e)).await,
    };
    let (auth, secret) = match (&ucfg, looked_up) {
        (Some(u), _) => {
            let secret = app.scram_secret(&user);
            let a = crate::auth::authenticate(&mut io, u, secret.as_deref());
            (tokio::time::timeout_at(deadline, a).await, secret)
        }
        (None, Some(s)) => {
            let a = crate::auth::scram_exchange(&mut io, &user, &s);
            (tokio::time::timeout_at(deadline, a).await, Some(s))
        }
        (None, None) => return,
    };
    match auth {
        Ok(Ok(Ok(key))) => {
            if let (Some(key), Some(secret)) = (key, secret) {
                app.remember_client_key(&user, &secret, key);
            }
        }
        Ok(Ok(Err(e))) => {
            tracing::info!(peer = %peer, user = %user, sqlstate = %e.code, "login refused: {}", e.message);
            return refuse(&mut io, e).await;
        }
        Ok(Err(_)) => return,
        Err(_) => {
            let e = ErrorFields::fatal("08P01", "canceling authentication due to timeout");
            return refuse(&mut io, e).await;
        }
    }
    drop(slot);
    io.set_max_message(cfg.max_message_size());
    io.push(&tidemark_wire::backend::auth_ok());
    let connected = std::time::Instant::now();
    // The address is formatted once, for both lines and the session (formatting it, and the
    // duration's Debug form, showed in the per-login profile).
    let peer = peer.to_string();
    tracing::info!(user = %user, database = %database, client = %peer, "client connected");
    let log_user = user.clone();
    let log_database = database.clone();
    let log_peer = peer.clone();
    let disconnected = move || {
        let duration = connected.elapsed();
        tracing::info!(
            user = %log_user,
            database = %log_database,
            client = %log_peer,
            duration_ms = duration.as_millis() as u64,
            "client disconnected"
        );
    };
    if database == "tidemark" {
        crate::admin::run(app, io, user).await;
        disconnected();
        return;
    }
    let mut session = Session::new(app.clone(), io, user, database, startup, peer);
    // The session runs as a task of its own, and the login task ends: a task's memory is sized
    // for the largest state of its future, and the login's states (TLS, SCRAM) are larger than
    // an idle session's. With `start` and each unit boxed (`Session::run_inner`), an idle
    // client's task holds little more than the `Session` (memory per idle client).
    // `session` is moved in as it is, not rebound inside (`let mut session = session`): a
    // rebinding is a second copy of the `Session` in the task's state, held for the whole
    // session (1 KiB per idle client).
    tokio::spawn(async move {
        match Box::pin(session.start()).await {
            Ok(true) => session.run().await,
            _ => app.unregister_client(session.backend_key()),
        }
        disconnected();
    });
}
