//! `tidemark-bench pipe`: the least any proxy can do, as a benchmark target (`--targets pipe`).
//!
//! Every client connection gets its own connection to the server, and bytes are copied both
//! ways as they arrive: no protocol decoding, no pooling, no routing, one event loop on one
//! thread (as tidemark and PgBouncer run). What pgbench reaches through it is the ceiling of
//! a proxy process on this machine: the two extra hand-offs per statement and the kernel's
//! work for them, which no proxy design avoids. It is measured, not assumed, so the gap
//! between direct and a real proxy can be split into what the hop costs and what the proxy
//! adds. Written by hand because it is a benchmark instrument that must do nothing else.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args, Debug)]
pub struct PipeArgs {
    /// Address to accept clients on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The server every client is piped to.
    #[arg(long)]
    pub server: SocketAddr,
}

/// Serves until killed (the benchmark stops it with its other processes).
pub fn run(args: PipeArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        loop {
            let (client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pipe: accept: {e}");
                    continue;
                }
            };
            let server = args.server;
            tokio::spawn(async move {
                if let Err(e) = pipe(client, server).await {
                    eprintln!("pipe: {e}");
                }
            });
        }
    })
}

/// Copies bytes both ways until either side closes. One buffer per direction, each write
/// as large as the read that filled it (one `send` per `recv`, as a relaying proxy does).
async fn pipe(mut client: TcpStream, server: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(server).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = cr.read(&mut up) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                sw.write_all(&up[..n]).await?;
            }
            r = sr.read(&mut down) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                cw.write_all(&down[..n]).await?;
            }
        }
    }
}
