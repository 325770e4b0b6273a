//! `cachetier-sidecar`: flags/env → [`Config`], then serve until SIGTERM/ctrl-c.

use anyhow::Context;
use cachetier_sidecar::Config;
use cachetier_sidecar::config::Args;
use clap::Parser;

/// Every pipelined request allocates a handful of short-lived objects (its
/// future, its reply channel, its argument list); with glibc's allocator that
/// was about a third of the sidecar's instructions at `-P 16` (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let kind = e.kind();
            let _ = e.print();
            if !matches!(
                kind,
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                match e.get(clap::error::ContextKind::InvalidArg) {
                    Some(arg) => eprintln!(
                        "note: {arg} can also be set with the environment variable {}",
                        env_twin(&arg.to_string())
                    ),
                    None => eprintln!("note: every flag has a CACHETIER_* environment twin; see --help"),
                }
                std::process::exit(2);
            }
            return Ok(());
        }
    };
    cachetier_sidecar::logs::init(&args.log_format, "info", cachetier_sidecar::logs::Stream::Stdout);
    let workers = args.worker_threads;
    let config = Config::from(args);
    config.validate().context("invalid configuration")?;
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        cachetier_sidecar::run(config, shutdown_signal())
            .await
            .context("sidecar failed")
    })
}

/// `--read-policy <READ_POLICY>` → `CACHETIER_READ_POLICY`.
fn env_twin(arg: &str) -> String {
    let flag = arg
        .trim_start_matches('-')
        .split([' ', '='])
        .next()
        .unwrap_or_default();
    match flag {
        "seed" => "CACHETIER_SEEDS (comma-separated)".to_string(),
        "cache-prefix" => "CACHETIER_CACHE_PREFIXES (comma-separated)".to_string(),
        f => format!("CACHETIER_{}", f.replace('-', "_").to_ascii_uppercase()),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
