//! The `tidemark` command line: `tidemark --config FILE` (or `tidemark run`) serves,
//! `tidemark dev` runs the embedded local cluster with the proxy in front.

use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "dev")]
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidemark::config::Config;

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "PostgreSQL proxy: reads go to replicas only once they have replayed what the reader depends on"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Override the listen address (host:port).
    #[arg(long, global = true)]
    listen: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve with the config file (the default).
    Run,
    /// Parse and validate a config file as startup does; print "ok" or the errors.
    /// Exit code 0 valid, 1 invalid (or a --connect check failed), 2 unreadable file.
    CheckConfig {
        /// The config file (TOML).
        file: PathBuf,
        /// Also log in to every node with the monitor's and each user's credentials.
        #[arg(long)]
        connect: bool,
    },
    /// Start a local primary + replicas and tidemark in front of them, until Ctrl-C.
    #[cfg(feature = "dev")]
    Dev {
        /// Number of replicas.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// recovery_min_apply_delay of the second replica, e.g. 500ms, 2s (0 for none).
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        replica_delay: Duration,
        /// Keep the cluster in this directory (a new temporary one by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep the data directory on exit.
        #[arg(long)]
        keep: bool,
        /// Prometheus endpoint and status page address.
        #[arg(long, default_value = "127.0.0.1:9187")]
        metrics_listen: String,
        /// Nodes accept TLS only (ssl = on, hostssl-only pg_hba, a throwaway CA); tidemark
        /// connects to them with server_tls.sslmode = verify-full.
        #[arg(long)]
        server_tls: bool,
        /// Where transactions run (routing.transactions): primary, read_only (the default)
        /// or optimistic (plain transactions start on replicas; docs/routing.md).
        #[arg(long)]
        transactions: Option<tidemark::config::TxMode>,
    },
}

#[cfg(feature = "dev")]
fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 200ms, 2s, 1m)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::CheckConfig { file, connect }) = &cli.cmd {
        return check_config(file, *connect);
    }
    let open_files = tidemark::signals::raise_open_file_limit();
    // RUST_LOG wins; else the config's log_level; else info.
    let raw = cli
        .config
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok());
    let setting = |key: &str| {
        raw.as_ref()
            .and_then(|v| v.get(key))
            .and_then(|l| l.as_str())
            .map(str::to_string)
    };
    let from_config = setting("log_level");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| {
            tracing_subscriber::EnvFilter::try_new(from_config.as_deref().unwrap_or("info"))
        })
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: a log file or journald gets plain text (escape codes there
    // are noise, and formatting them was a third of a short session's cost).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if setting("log_format").as_deref() == Some("json") {
        logs.json().init();
    } else {
        logs.init();
    }
    // One event loop on one thread (like PgBouncer) costs fewer wake-ups and context
    // switches per statement than a work-stealing pool; TIDEMARK_WORKER_THREADS=N > 1
    // selects the multi-threaded runtime.
    // By default: one loop on a machine of up to 2 cores (where a second worker measured no
    // gain: the servers and clients need those cores), one worker per core beyond that.
    let threads: usize = std::env::var("TIDEMARK_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(default_worker_threads);
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        match cli.cmd {
            #[cfg(feature = "dev")]
            Some(Cmd::Dev {
                replicas,
                replica_delay,
                data_dir,
                keep,
                metrics_listen,
                server_tls,
                transactions,
            }) => {
                if let Some(path) = &cli.config {
                    // It would otherwise be accepted (the flag is global) and silently unused.
                    anyhow::bail!(
                        "tidemark dev writes its own config for the cluster it starts and does not read {}: \
                         use its flags (--transactions, --listen, ...), or run `tidemark --config {}` against your own servers",
                        path.display(),
                        path.display()
                    );
                }
                tidemark::dev::run(tidemark::dev::DevOptions {
                    listen: cli.listen.unwrap_or_else(|| "127.0.0.1:6432".into()),
                    replicas,
                    replica_delay,
                    data_dir,
                    keep,
                    metrics_listen: Some(metrics_listen),
                    server_tls,
                    transactions,
                })
                .await
            }
            Some(Cmd::CheckConfig { .. }) => Ok(()),
            Some(Cmd::Run) | None => {
                let Some(path) = cli.config else {
                    anyhow::bail!("no config file given: run `tidemark --config tidemark.toml`, or `tidemark dev` for a local cluster");
                };
                // Installed first: from here on SIGHUP reloads instead of killing.
                let mut signals = tidemark::signals::Signals::install()
                    .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
                let mut cfg = Config::load(&path)?;
                if let Some(w) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| tidemark::config_file::permission_warning(&path, &t))
                {
                    tracing::warn!("{w}");
                }
                if let Some(l) = cli.listen {
                    cfg.listen = l;
                    cfg.validate()?;
                }
                tidemark::app::set_config_path(path);
                let proxy = tidemark::listener::Proxy::start(cfg).await?;
                tracing::info!(addr = %proxy.addr, open_files, "tidemark is listening");
                signals.serve(&proxy.app).await;
                tracing::info!("shutting down");
                proxy.shutdown().await;
                Ok(())
            }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tidemark check-config FILE [--connect]` (see [`tidemark::check`]).
fn check_config(file: &std::path::Path, connect: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(rt.block_on(tidemark::check::run(file, connect)))
}

/// Runtime threads when `TIDEMARK_WORKER_THREADS` is not set: 1 on up to 2 cores, else one per
/// core.
fn default_worker_threads() -> usize {
    match std::thread::available_parallelism().map(|n| n.get()) {
        Ok(n) if n > 2 => n,
        _ => 1,
    }
}
