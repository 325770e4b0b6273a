//! `cachetier-operator`: the operator binary.
//!
//! Subcommands:
//! - `crd`: print the CacheTier CustomResourceDefinition as YAML.
//! - `render`: print the Kubernetes objects a CacheTier becomes.
//! - `local`: run a CacheTier on local `redis-server` processes with a sidecar in front.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cachetier_operator::Error;
use cachetier_operator::local::{self, LocalOptions, SidecarOptions};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cachetier-operator",
    version,
    about = "The cachetier operator: Redis Cluster cache tiers that survive silent node failures"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CacheTier CustomResourceDefinition (YAML) on stdout.
    ///
    /// `crds/cachetier.yaml` is exactly this output; `scripts/generate.sh`
    /// rewrites it and `scripts/generate.sh --check` fails on drift.
    Crd,
    /// Print the Kubernetes objects (YAML) the operator applies for a CacheTier
    /// manifest: ConfigMap, Services, a StatefulSet and a PodDisruptionBudget
    /// per shard.
    ///
    /// Offline, like `helm template`: a manifest without `metadata.namespace`
    /// renders into `default`, and the owner reference carries a placeholder
    /// UID (the API server assigns the real one).
    Render {
        /// The CacheTier manifest (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Run a CacheTier on local redis-server processes, with a sidecar in
    /// front, until Ctrl-C.
    ///
    /// Nodes listen on 127.0.0.1 from --base-port upward, with cluster bus
    /// ports at port + --bus-port-offset. Once the tier serves every slot, the
    /// sidecar listens on 127.0.0.1:<spec.sidecar.port> (6379 by default), so
    /// `redis-cli -p 6379` reaches the sharded tier. Edit the manifest while it
    /// runs to reshard live; Ctrl-C or SIGTERM stops the sidecar and every node
    /// and removes their data.
    Local {
        /// The CacheTier manifest (YAML).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// First client port.
        #[arg(long, default_value_t = 7000, env = "CACHETIER_BASE_PORT")]
        base_port: u16,
        /// Cluster bus port = client port + this offset.
        #[arg(long, default_value_t = 10000)]
        bus_port_offset: u16,
        /// The redis-server program to run.
        #[arg(long, default_value = "redis-server", env = "CACHETIER_REDIS_SERVER")]
        redis_server: PathBuf,
        /// Exit (stopping every node) once the tier is first Ready, after
        /// printing how long that took.
        #[arg(long)]
        until_ready: bool,
        /// Port of the sidecar on 127.0.0.1 (default: the manifest's
        /// spec.sidecar.port, 6379 unless set).
        #[arg(long, env = "CACHETIER_SIDECAR_PORT")]
        sidecar_port: Option<u16>,
        /// Serve the sidecar's /metrics, /livez and /readyz on this address.
        #[arg(long, env = "CACHETIER_SIDECAR_METRICS")]
        sidecar_metrics: Option<SocketAddr>,
        /// Run the tier without a sidecar.
        #[arg(long, conflicts_with_all = ["sidecar_port", "sidecar_metrics"])]
        no_sidecar: bool,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", cachetier_crds::crd_yaml()?),
        Command::Render { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            match cachetier_operator::reconcile::render_manifest(&text) {
                Ok(yaml) => print!("{yaml}"),
                Err(Error::Invalid(invalid)) => {
                    eprintln!("{} is not a valid CacheTier:", file.display());
                    for problem in &invalid.problems {
                        eprintln!("  {problem}");
                    }
                    return Ok(ExitCode::from(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Local {
            file,
            base_port,
            bus_port_offset,
            redis_server,
            until_ready,
            sidecar_port,
            sidecar_metrics,
            no_sidecar,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .init();
            let sidecar = (!no_sidecar && !until_ready).then_some(SidecarOptions {
                port: sidecar_port,
                metrics: sidecar_metrics,
            });
            let mut options = LocalOptions::new(file);
            options.sidecar = sidecar;
            options.base_port = base_port;
            options.bus_port_offset = bus_port_offset;
            options.redis_server = redis_server;
            options.until_ready = until_ready;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let outcome = runtime.block_on(local::run(options, |_seeds| async {}));
            match outcome {
                Ok(()) => {}
                Err(Error::Invalid(invalid)) => {
                    eprintln!("the manifest is not a valid CacheTier:");
                    for problem in &invalid.problems {
                        eprintln!("  {problem}");
                    }
                    return Ok(ExitCode::from(2));
                }
                Err(e @ Error::RedisServerMissing { .. }) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(1));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
