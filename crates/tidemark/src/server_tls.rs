//! TLS from tidemark to PostgreSQL (`[server_tls]`, libpq's `sslmode` family): the rustls
//! client configuration of each node, PostgreSQL's SSLRequest exchange, the stream a server
//! connection runs over (plain or TLS), and the same for tokio-postgres (monitor, catalog,
//! replication slots).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::config::{Config, NodeConfig, SslMode};
use crate::server::ServerError;

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// One node's address and TLS settings, built once from the config (files read, rustls
/// configured) and shared by every connection to that node.
pub struct NodeTls {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub mode: SslMode,
    client: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sslmode {})", self.label(), self.mode)
    }
}

impl NodeTls {
    /// `node replica1 (127.0.0.1:5433)`, for messages.
    pub fn label(&self) -> String {
        format!("node {} ({}:{})", self.name, self.host, self.port)
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Builds the settings of `node` (reads the certificate files).
    pub fn build(cfg: &Config, node: &NodeConfig) -> anyhow::Result<NodeTls> {
        let t = cfg.server_tls_for(node);
        let provider = Arc::new(crypto::ring::default_provider());
        let roots = match &t.sslrootcert {
            Some(p) if t.sslmode != SslMode::Disable => {
                let field = format!("{}.sslrootcert", t.field);
                let mut store = rustls::RootCertStore::empty();
                for c in crate::tls::load_certs(p, &field)? {
                    store.add(c).map_err(|e| {
                        anyhow::anyhow!(
                            "{field}: {} holds a certificate rustls refuses: {e}",
                            p.display()
                        )
                    })?;
                }
                Some(Arc::new(store))
            }
            _ => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (t.sslmode, roots) {
            // As libpq: prefer never verifies; require verifies the chain only when a root
            // certificate is configured.
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
                Arc::new(AcceptAnyCert(provider.clone()))
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => anyhow::bail!(
                "{}.sslrootcert: sslmode = \"{}\" (node {}) needs a root certificate",
                t.field,
                t.sslmode,
                node.name
            ),
            (mode, Some(roots)) => {
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| anyhow::anyhow!("{}.sslrootcert: {e}", t.field))?;
                if mode == SslMode::VerifyFull {
                    inner
                } else {
                    Arc::new(ChainOnly(inner))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("server_tls: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client = match (&t.sslcert, &t.sslkey) {
            (Some(cert), Some(key)) if t.sslmode != SslMode::Disable => {
                let certs = crate::tls::load_certs(cert, &format!("{}.sslcert", t.field))?;
                let key = crate::tls::load_key(key, &format!("{}.sslkey", t.field))?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    anyhow::anyhow!(
                        "{}.sslcert and {}.sslkey do not fit together: {e}",
                        t.field,
                        t.field
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        let server_name = ServerName::try_from(node.host.clone()).map_err(|e| {
            anyhow::anyhow!(
                "nodes.{}.host: '{}' is not a host name or IP address TLS can check ({e})",
                node.name,
                node.host
            )
        })?;
        Ok(NodeTls {
            name: node.name.clone(),
            host: node.host.clone(),
            port: node.port,
            mode: t.sslmode,
            client: Arc::new(client),
            server_name,
        })
    }

    /// Every node's settings, in node order.
    pub fn build_all(cfg: &Config) -> anyhow::Result<Vec<Arc<NodeTls>>> {
        cfg.nodes
            .iter()
            .map(|n| NodeTls::build(cfg, n).map(Arc::new))
            .collect()
    }

    /// Opens a TCP connection to the node and negotiates TLS as `sslmode` says.
    pub async fn open(&self) -> Result<ServerStream, ServerError> {
        let addr = self.addr();
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| ServerError::Connect { addr, source })?;
        tcp.set_nodelay(true)?;
        // Detect a server that vanished without a FIN/RST (power loss, partition).
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(1))
            .with_retries(3);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
        self.negotiate(tcp).await
    }

    /// The SSLRequest exchange on a fresh connection, then the TLS handshake if the server
    /// agreed.
    pub async fn negotiate(&self, mut tcp: TcpStream) -> Result<ServerStream, ServerError> {
        if self.mode == SslMode::Disable {
            return Ok(ServerStream::Plain(tcp));
        }
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        // Exactly one byte: anything after 'S' belongs to the TLS handshake.
        if tcp.read(&mut answer).await? == 0 {
            return Err(ServerError::Tls(format!(
                "{} closed the connection after the SSLRequest (server_tls.sslmode is {})",
                self.label(),
                self.mode
            )));
        }
        match answer[0] {
            b'S' => {
                let tls = TlsConnector::from(self.client.clone())
                    .connect(self.server_name.clone(), tcp)
                    .await
                    .map_err(|e| {
                        ServerError::Tls(format!(
                            "TLS handshake with {} failed (server_tls.sslmode is {}): {e}",
                            self.label(),
                            self.mode
                        ))
                    })?;
                Ok(ServerStream::Tls(Box::new(tls)))
            }
            b'N' if self.mode == SslMode::Prefer => Ok(ServerStream::Plain(tcp)),
            b'N' => Err(ServerError::Tls(format!(
                "{} refused TLS but server_tls.sslmode is {}",
                self.label(),
                self.mode
            ))),
            other => Err(ServerError::Tls(format!(
                "{} answered the SSLRequest with {:?} instead of 'S' or 'N' (server_tls.sslmode is {})",
                self.label(),
                other as char,
                self.mode
            ))),
        }
    }

    /// A tokio-postgres client for `pg` on this node, TLS as configured (the connection task
    /// is spawned). Errors name the node and the sslmode.
    pub async fn pg_connect(
        self: &Arc<Self>,
        mut pg: tokio_postgres::Config,
    ) -> anyhow::Result<tokio_postgres::Client> {
        pg.ssl_mode(match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let (client, connection) = pg.connect(PgTls(self.clone())).await.map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            let hint = if msg.contains("no encryption") {
                " (the server accepts only TLS connections)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "{} (server_tls.sslmode is {}): {msg}{hint}",
                self.label(),
                self.mode
            )
        })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// The socket of a server connection: plain TCP or TLS over TCP.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ServerStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerStream::Tls(_))
    }

    /// True when the server sent something (or closed) while nobody was reading. Reads what
    /// is available into `buf` without waiting.
    pub fn poll_unexpected(&mut self, buf: &mut bytes::BytesMut) -> bool {
        match self {
            ServerStream::Plain(s) => {
                let mut probe = [0u8; 1];
                match s.try_read(&mut probe) {
                    Ok(_) => true,
                    Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                }
            }
            ServerStream::Tls(s) => {
                // Decrypted bytes can only be had by reading; a no-op waker polls once.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut probe = [0u8; 512];
                let mut rb = ReadBuf::new(&mut probe);
                match Pin::new(s.as_mut()).poll_read(&mut cx, &mut rb) {
                    Poll::Pending => false,
                    Poll::Ready(Ok(())) => {
                        buf.extend_from_slice(rb.filled());
                        true
                    }
                    Poll::Ready(Err(_)) => true,
                }
            }
        }
    }
}

impl AsyncRead for ServerStream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl ServerStream {
    /// Writes what a plain socket takes right now, without a future: `Ok(0)` when it takes
    /// nothing, and always for TLS (whose records may need a flush the caller's `write_all`
    /// and its waker handle).
    pub fn try_write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => match s.try_write(buf) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) => Err(e),
            },
            ServerStream::Tls(_) => Ok(0),
        }
    }
}

impl AsyncWrite for ServerStream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(s) => s.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// `sslmode = require` without a root certificate (and `prefer`): any certificate is
/// accepted, but the handshake's signatures are still checked (the server must hold the key
/// of the certificate it sent).
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, once the chain and validity are verified.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres' TLS hook: the node's rustls configuration (tokio-postgres does the
/// SSLRequest itself).
#[derive(Clone)]
pub struct PgTls(Arc<NodeTls>);

pub struct PgTlsConnect(Arc<NodeTls>);

pub struct PgTlsStream(tokio_rustls::client::TlsStream<tokio_postgres::Socket>);

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for PgTls {
    type Stream = PgTlsStream;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, _domain: &str) -> io::Result<PgTlsConnect> {
        Ok(PgTlsConnect(self.0.clone()))
    }
}

impl tokio_postgres::tls::TlsConnect<tokio_postgres::Socket> for PgTlsConnect {
    type Stream = PgTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            let tls = TlsConnector::from(self.0.client.clone())
                .connect(self.0.server_name.clone(), stream)
                .await?;
            Ok(PgTlsStream(tls))
        })
    }
}

impl tokio_postgres::tls::TlsStream for PgTlsStream {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl AsyncRead for PgTlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for PgTlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn node_tls(extra: &str, port: u16) -> anyhow::Result<NodeTls> {
        let cfg = Config::parse(&format!(
            "{extra}\n[[nodes]]\nname = \"replica1\"\nport = {port}\n"
        ))?;
        NodeTls::build(&cfg, &cfg.nodes[0])
    }

    #[test]
    fn unreadable_files_name_the_field() {
        let e = node_tls(
            "[server_tls]\nsslmode = \"verify-ca\"\nsslrootcert = \"/nonexistent/ca.pem\"",
            5432,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("server_tls.sslrootcert: cannot read"), "{e}");
        let e = node_tls(
            "[server_tls]\nsslmode = \"require\"\nsslcert = \"/nonexistent/c.pem\"\nsslkey = \"/nonexistent/k.pem\"",
            5432,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("server_tls.sslcert: cannot read"), "{e}");
    }

    /// A server that answers the SSLRequest with `answer`.
    async fn answering(answer: u8) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut req = [0u8; 8];
                if s.read_exact(&mut req).await.is_ok() && req == SSL_REQUEST {
                    let _ = s.write_all(&[answer]).await;
                    let mut rest = [0u8; 64];
                    let _ = s.read(&mut rest).await;
                }
            }
        });
        port
    }

    #[tokio::test]
    async fn sslrequest_answers_follow_sslmode() {
        let port = answering(b'N').await;
        let prefer = node_tls("", port).unwrap();
        assert!(!prefer.open().await.unwrap().is_tls());
        let disable = node_tls("[server_tls]\nsslmode = \"disable\"", port).unwrap();
        assert!(!disable.open().await.unwrap().is_tls());
        let require = node_tls("[server_tls]\nsslmode = \"require\"", port).unwrap();
        let e = require.open().await.err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "node replica1 (127.0.0.1:{port}) refused TLS but server_tls.sslmode is require"
            )
        );
        let odd = answering(b'E').await;
        let e = node_tls("", odd)
            .unwrap()
            .open()
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("instead of 'S' or 'N'"), "{e}");
    }
}
