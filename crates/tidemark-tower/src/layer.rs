//! The tower layer: reads the request's token, hands the handler a [`Causality`], and after
//! the handler writes the new token into the response.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, COOKIE, SET_COOKIE};
use http::{HeaderMap, Request, Response};
use tidemark_core::Lsn;
use tokio::sync::Notify;
use tower_layer::Layer;
use tower_service::Service;

use crate::token::TokenKey;

/// Default cookie name.
pub const DEFAULT_COOKIE: &str = "tidemark_lsn";
/// Default header name (request and response).
pub const DEFAULT_HEADER: &str = "x-tidemark-lsn";

#[derive(Clone)]
struct Config {
    key: TokenKey,
    cookie: String,
    header: HeaderName,
    max_age: Duration,
    secure: bool,
    settle_timeout: Duration,
}

/// A tower [`Layer`] that carries a causality token through HTTP requests.
///
/// On each request it reads the token from the cookie (default `tidemark_lsn`) or the header
/// (default `x-tidemark-lsn`); a token that is missing, garbled, forged or signed with
/// another key counts as no token. The handler gets a [`Causality`] (an axum extractor,
/// also in the request's extensions). When the handler's connections committed a write
/// newer than the request's token, the response carries the new signed token in both a
/// `Set-Cookie` and the header.
#[derive(Clone)]
pub struct TidemarkLayer {
    config: Arc<Config>,
}

impl TidemarkLayer {
    /// A layer signing tokens with `key` (HMAC-SHA256; use at least 32 random bytes, the
    /// same in every instance of the app).
    pub fn new(key: impl Into<Vec<u8>>) -> Self {
        TidemarkLayer {
            config: Arc::new(Config {
                key: TokenKey::new(key),
                cookie: DEFAULT_COOKIE.to_string(),
                header: HeaderName::from_static(DEFAULT_HEADER),
                max_age: Duration::from_secs(300),
                secure: false,
                settle_timeout: Duration::from_secs(2),
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The cookie's name (default `tidemark_lsn`).
    pub fn cookie_name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.with(|c| c.cookie = name)
    }

    /// The header's name (default `x-tidemark-lsn`).
    pub fn header_name(self, name: HeaderName) -> Self {
        self.with(|c| c.header = name)
    }

    /// How long the cookie lives (default 5 minutes: a token only matters until every
    /// replica has replayed it).
    pub fn max_age(self, max_age: Duration) -> Self {
        self.with(|c| c.max_age = max_age)
    }

    /// Mark the cookie `Secure` (HTTPS only). Default off.
    pub fn secure(self, secure: bool) -> Self {
        self.with(|c| c.secure = secure)
    }

    /// How long the response waits for connections the handler dropped without
    /// [`TrackedConn::release`](crate::TrackedConn::release) to report their commit position
    /// (default 2 s).
    pub fn settle_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.settle_timeout = timeout)
    }

    /// The signing key, for tokens passed outside HTTP (a job queue, a websocket message).
    pub fn key(&self) -> &TokenKey {
        &self.config.key
    }
}

impl<S> Layer<S> for TidemarkLayer {
    type Service = TidemarkService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TidemarkService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`TidemarkLayer`] wraps around the app.
#[derive(Clone)]
pub struct TidemarkService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, B, R> Service<Request<B>> for TidemarkService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let token = read_token(&self.config, req.headers());
        let causality = Causality::new(token);
        req.extensions_mut().insert(causality.clone());
        let fut = self.inner.call(req);
        let config = self.config.clone();
        Box::pin(async move {
            let mut res = fut.await?;
            causality.settle(config.settle_timeout).await;
            if let Some(lsn) = causality.new_token() {
                write_token(&config, res.headers_mut(), lsn);
            }
            Ok(res)
        })
    }
}

/// The highest valid token in the request's cookie(s) and header(s).
fn read_token(config: &Config, headers: &HeaderMap) -> Option<Lsn> {
    let from_header = headers
        .get_all(&config.header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| config.key.verify(v.trim()));
    let from_cookie = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == config.cookie).then(|| value.trim().trim_matches('"'))
        })
        .filter_map(|v| config.key.verify(v));
    from_header.chain(from_cookie).max()
}

fn write_token(config: &Config, headers: &mut HeaderMap, lsn: Lsn) {
    let token = config.key.sign(lsn);
    let cookie = format!(
        "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
        config.cookie,
        config.max_age.as_secs(),
        if config.secure { "; Secure" } else { "" }
    );
    // Both are ASCII without control characters (an LSN, base64url, a cookie name the app
    // chose); a cookie name that is not a valid header value is skipped, never a panic.
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        headers.append(SET_COOKIE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&token) {
        headers.insert(config.header.clone(), v);
    }
}

struct State {
    /// The request's verified token (0 = none).
    token: u64,
    /// What connections drawn for this request must have replayed: the token, raised by
    /// [`Causality::require`].
    floor: AtomicU64,
    /// The highest commit position the request's connections reported.
    committed: AtomicU64,
    /// Connections dropped without `release`, still reporting their position.
    pending: AtomicUsize,
    settled: Notify,
}

/// One request's causality: the token it came with, and the writes it made.
///
/// An axum extractor (with the `axum` feature); also in the request's extensions. Cheap to
/// clone (all clones share the request's state). Without [`TidemarkLayer`] the extractor
/// fails with 500.
#[derive(Clone)]
pub struct Causality {
    state: Arc<State>,
}

impl std::fmt::Debug for Causality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Causality")
            .field("token", &self.token())
            .field("floor", &self.floor())
            .field("committed", &self.committed())
            .finish()
    }
}

fn opt(v: u64) -> Option<Lsn> {
    (v != 0).then_some(Lsn(v))
}

impl Causality {
    /// A request state with `token` (what the layer builds; also for jobs and tests that
    /// run outside HTTP).
    pub fn new(token: Option<Lsn>) -> Self {
        let t = token.map_or(0, |l| l.0);
        Causality {
            state: Arc::new(State {
                token: t,
                floor: AtomicU64::new(t),
                committed: AtomicU64::new(0),
                pending: AtomicUsize::new(0),
                settled: Notify::new(),
            }),
        }
    }

    /// The verified token the request came with.
    pub fn token(&self) -> Option<Lsn> {
        opt(self.state.token)
    }

    /// What the request's connections must have replayed: the token and every
    /// [`require`](Self::require).
    pub fn floor(&self) -> Option<Lsn> {
        opt(self.state.floor.load(Ordering::Acquire))
    }

    /// Raise the floor for connections drawn from now on, e.g. to the commit position a
    /// cache invalidation recorded (reads then see that write too). Does not change the
    /// token sent back.
    pub fn require(&self, lsn: Lsn) {
        self.state.floor.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// The highest commit position this request's connections reported.
    pub fn committed(&self) -> Option<Lsn> {
        opt(self.state.committed.load(Ordering::Acquire))
    }

    /// Record a commit position obtained some other way (e.g. `SHOW tidemark.commit_lsn`
    /// on a connection not drawn through this crate). It goes out with the response, and
    /// connections drawn later in this request carry it.
    pub fn record(&self, lsn: Lsn) {
        self.state.committed.fetch_max(lsn.0, Ordering::AcqRel);
        self.state.floor.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// The token to send back, if the request wrote past the one it came with.
    pub fn new_token(&self) -> Option<Lsn> {
        let c = self.state.committed.load(Ordering::Acquire);
        (c > self.state.token).then_some(Lsn(c))
    }

    /// A tracked connection drawn at commit position `before` now reports `after`: past
    /// `before`, its use wrote, and the position is recorded in the request. What it wrote.
    #[cfg_attr(
        not(any(feature = "sqlx", feature = "deadpool-postgres")),
        allow(dead_code)
    )]
    pub(crate) fn report(&self, before: Lsn, after: Lsn) -> Option<Lsn> {
        let wrote = (after > before).then_some(after);
        if let Some(l) = wrote {
            self.record(l);
        }
        wrote
    }

    /// A tracked connection dropped without `release`: `read`, which owns the connection,
    /// asks its commit position in the background and gives it back to the pool when done;
    /// the response waits for it (`settle`). Without a runtime the connection just drops.
    #[cfg_attr(
        not(any(feature = "sqlx", feature = "deadpool-postgres")),
        allow(dead_code)
    )]
    pub(crate) fn report_later<F>(self, before: Lsn, read: F)
    where
        F: Future<Output = Option<Lsn>> + Send + 'static,
    {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.state.pending.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            if let Some(after) = read.await {
                self.report(before, after);
            }
            if self.state.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.state.settled.notify_waiters();
            }
        });
    }

    /// Waits (at most `timeout`) until no dropped connection is still reporting.
    pub(crate) async fn settle(&self, timeout: Duration) {
        let wait = async {
            loop {
                let notified = self.state.settled.notified();
                tokio::pin!(notified);
                // Registered before the check: a notify between the check and the await
                // is not lost.
                notified.as_mut().enable();
                if self.state.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }
}

#[cfg(feature = "axum")]
impl<S: Send + Sync> axum_core::extract::FromRequestParts<S> for Causality {
    type Rejection = (http::StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Causality>().cloned().ok_or((
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "tidemark_tower::Causality needs the TidemarkLayer",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            key: TokenKey::new(b"k".repeat(32)),
            cookie: DEFAULT_COOKIE.into(),
            header: HeaderName::from_static(DEFAULT_HEADER),
            max_age: Duration::from_secs(300),
            secure: false,
            settle_timeout: Duration::from_secs(1),
        }
    }

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn reads_the_cookie_among_others() {
        let c = config();
        let t = c.key.sign(Lsn(0x500));
        let h = headers(&[("cookie", format!("a=1; tidemark_lsn={t}; b=2").as_bytes())]);
        assert_eq!(read_token(&c, &h), Some(Lsn(0x500)));
        let h = headers(&[("cookie", format!("tidemark_lsn=\"{t}\"").as_bytes())]);
        assert_eq!(read_token(&c, &h), Some(Lsn(0x500)));
    }

    #[test]
    fn takes_the_highest_valid_token() {
        let c = config();
        let lo = c.key.sign(Lsn(0x100));
        let hi = c.key.sign(Lsn(0x900));
        let h = headers(&[
            ("cookie", format!("tidemark_lsn={lo}").as_bytes()),
            ("x-tidemark-lsn", hi.as_bytes()),
            ("x-tidemark-lsn", b"FFFFFFFF/FFFFFFFF.forged"),
        ]);
        assert_eq!(read_token(&c, &h), Some(Lsn(0x900)));
    }

    #[test]
    fn bad_tokens_are_no_token() {
        let c = config();
        let other = TokenKey::new(b"other".to_vec()).sign(Lsn(0x100));
        for bad in [
            b"tidemark_lsn=".as_slice(),
            b"tidemark_lsn",
            b"tidemark_lsn=0/100",
            b"tidemark_lsn=0/100.AAAA",
            format!("tidemark_lsn={other}").as_bytes(),
            b"tidemark_lsn=\xff\xfe\x80",
            b";;;=;=",
            b"",
        ] {
            let h = headers(&[("cookie", bad), ("x-tidemark-lsn", bad)]);
            assert_eq!(
                read_token(&c, &h),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(read_token(&c, &HeaderMap::new()), None);
    }

    #[test]
    fn writes_a_cookie_and_a_header_that_read_back() {
        let c = config();
        let mut h = HeaderMap::new();
        write_token(&c, &mut h, Lsn(0x1234));
        let cookie = h.get(SET_COOKIE).unwrap().to_str().unwrap();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("Max-Age=300"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap();
        let back = headers(&[("cookie", pair.as_bytes())]);
        assert_eq!(read_token(&c, &back), Some(Lsn(0x1234)));
        let hv = h.get(DEFAULT_HEADER).unwrap().as_bytes().to_vec();
        assert_eq!(
            read_token(&c, &headers(&[("x-tidemark-lsn", &hv)])),
            Some(Lsn(0x1234))
        );
    }

    #[test]
    fn new_token_only_after_a_newer_write() {
        let s = Causality::new(Some(Lsn(0x500)));
        assert_eq!(s.new_token(), None);
        s.require(Lsn(0x900));
        assert_eq!(s.floor(), Some(Lsn(0x900)));
        assert_eq!(s.new_token(), None, "require is not a write");
        s.record(Lsn(0x400));
        assert_eq!(s.new_token(), None, "older than the token");
        s.record(Lsn(0x600));
        assert_eq!(s.new_token(), Some(Lsn(0x600)));
        assert_eq!(s.floor(), Some(Lsn(0x900)));
        let none = Causality::new(None);
        assert_eq!(
            (none.token(), none.floor(), none.new_token()),
            (None, None, None)
        );
    }
}
