//! `cachetier-operator`: the operator binary.
//!
//! Subcommands:
//! - `crd`: print the CacheTier CustomResourceDefinition as YAML.
//! - `run`: the Kubernetes controller (in a pod, or outside with `KUBECONFIG`).
//! - `render`: print the Kubernetes objects a CacheTier becomes.
//! - `local`: run a CacheTier on local `redis-server` processes with a sidecar in front.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cachetier_operator::Error;
use cachetier_operator::local::{self, LocalOptions, SidecarOptions};
use cachetier_sidecar::logs;
use clap::{Parser, Subcommand};

/// The sidecar image injected by default (built from `sidecar/Dockerfile`).
const DEFAULT_SIDECAR_IMAGE: &str = concat!("ghcr.io/cachetier/sidecar:", env!("CARGO_PKG_VERSION"));

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

// Parsed once at start; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CacheTier CustomResourceDefinition (YAML) on stdout.
    ///
    /// `crds/cachetier.yaml` is exactly this output; `scripts/generate.sh`
    /// rewrites it and `scripts/generate.sh --check` fails on drift.
    Crd,
    /// Run the Kubernetes controller: reconcile every CacheTier into Redis
    /// Cluster pods, with leader election, until SIGTERM.
    ///
    /// In a pod it uses the ServiceAccount; outside a cluster, KUBECONFIG. It
    /// must reach pods by their IPs: in-cluster, or from a host whose network
    /// routes the cluster's pod CIDR (a kind or k3d cluster's pod IPs are not
    /// reachable from the host: run the operator in the cluster there).
    Run {
        /// Serve /metrics, /livez and /readyz here.
        #[arg(long, default_value = "0.0.0.0:8080", env = "CACHETIER_METRICS")]
        metrics: SocketAddr,
        /// Watch only this namespace (default: every namespace).
        #[arg(long, env = "CACHETIER_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Namespace of the leader-election Lease (the operator's own).
        #[arg(long, default_value = "default", env = "POD_NAMESPACE")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "cachetier-operator")]
        lease_name: String,
        /// This replica's identity in the Lease (default: the pod name or host name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Lease duration: how long a standby waits for a silent leader.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
        lease_seconds: u64,
        /// `text` (default) or `json` logs on stderr.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// `text` or `json` logs of the sidecars the webhook injects
        /// (default: the operator's own `--log-format`).
        #[arg(long, value_parser = ["text", "json"])]
        sidecar_log_format: Option<String>,
        /// Serve the sidecar-injection webhook (HTTPS) here.
        #[arg(long, default_value = "0.0.0.0:9443", env = "CACHETIER_WEBHOOK_ADDR")]
        webhook_addr: SocketAddr,
        /// Do not serve the webhook.
        #[arg(long)]
        no_webhook: bool,
        /// Read the webhook's tls.crt and tls.key from this directory (e.g. a
        /// cert-manager Secret) instead of making a certificate.
        #[arg(long, env = "CACHETIER_WEBHOOK_CERT_DIR")]
        webhook_cert_dir: Option<PathBuf>,
        /// Secret (in the operator's namespace) that keeps a made certificate.
        #[arg(long, default_value = "cachetier-webhook-tls")]
        webhook_secret: String,
        /// The webhook's Service (the certificate names its DNS names).
        #[arg(
            long,
            default_value = "cachetier-operator-webhook",
            env = "CACHETIER_WEBHOOK_SERVICE"
        )]
        webhook_service: String,
        /// The MutatingWebhookConfiguration whose caBundle is kept current.
        #[arg(long, default_value = "cachetier-operator")]
        webhook_configuration: String,
        /// The sidecar image the webhook injects.
        #[arg(long, default_value = DEFAULT_SIDECAR_IMAGE, env = "CACHETIER_SIDECAR_IMAGE")]
        sidecar_image: String,
        /// The Redis image of tiers that do not set `spec.image`.
        #[arg(long, default_value = cachetier_crds::DEFAULT_IMAGE, env = "CACHETIER_REDIS_IMAGE")]
        redis_image: String,
    },
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
        /// The Redis image of a tier that does not set `spec.image`.
        #[arg(long, default_value = cachetier_crds::DEFAULT_IMAGE, env = "CACHETIER_REDIS_IMAGE")]
        redis_image: String,
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
        /// With spec.auth: the environment variable that holds the password
        /// (local mode's stand-in for the Secret).
        #[arg(long, value_name = "VAR")]
        auth_password_env: Option<String>,
        /// With spec.auth: a file that holds the password.
        #[arg(long, value_name = "PATH", conflicts_with = "auth_password_env")]
        auth_password_file: Option<PathBuf>,
        /// With spec.auth: the ACL user (default: Redis's default user).
        #[arg(long, value_name = "USER")]
        auth_username: Option<String>,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", cachetier_crds::crd_yaml()?),
        Command::Run {
            metrics,
            namespace,
            lease_namespace,
            lease_name,
            identity,
            lease_seconds,
            log_format,
            sidecar_log_format,
            webhook_addr,
            no_webhook,
            webhook_cert_dir,
            webhook_secret,
            webhook_service,
            webhook_configuration,
            sidecar_image,
            redis_image,
        } => {
            logs::init(&log_format, "info", logs::Stream::Stderr);
            let identity = identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("cachetier-operator-{}", std::process::id()));
            use cachetier_operator::webhook::tls::Source;
            let certificate = match webhook_cert_dir {
                Some(dir) => Source::Files(dir),
                None => Source::Generated {
                    namespace: lease_namespace.clone(),
                    secret: webhook_secret,
                    service: webhook_service,
                    configuration: webhook_configuration,
                },
            };
            let webhook = (!no_webhook).then_some(cachetier_operator::controller::WebhookOptions {
                addr: webhook_addr,
                certificate,
                sidecar_image,
                log_format: sidecar_log_format.unwrap_or_else(|| log_format.clone()),
            });
            let options = cachetier_operator::controller::RunOptions {
                metrics,
                namespace,
                lease_namespace,
                lease_name,
                identity,
                lease_seconds,
                webhook,
                defaults: cachetier_operator::reconcile::Defaults { redis_image },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            if let Err(e) = runtime.block_on(cachetier_operator::controller::run(options)) {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Render { file, redis_image } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let defaults = cachetier_operator::reconcile::Defaults { redis_image };
            match cachetier_operator::reconcile::render_manifest(&text, &defaults) {
                Ok(yaml) => print!("{yaml}"),
                Err(Error::Invalid(invalid)) => return Ok(refused(&file, &invalid)),
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
            auth_password_env,
            auth_password_file,
            auth_username,
        } => {
            logs::init("text", "warn", logs::Stream::Stderr);
            let sidecar = (!no_sidecar && !until_ready).then_some(SidecarOptions {
                port: sidecar_port,
                metrics: sidecar_metrics,
                auth: None,
            });
            let mut options = LocalOptions::new(file.clone());
            options.auth = local::LocalAuth {
                password_env: auth_password_env,
                password_file: auth_password_file,
                username: auth_username,
            };
            options.sidecar = sidecar;
            options.base_port = base_port;
            options.bus_port_offset = bus_port_offset;
            options.redis_server = redis_server;
            options.until_ready = until_ready;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let outcome = runtime.block_on(local::run(options, |_seeds| async {}));
            match outcome {
                Ok(()) => {}
                Err(Error::Invalid(invalid)) => return Ok(refused(&file, &invalid)),
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

/// Says why a manifest was refused, one problem a line; exit status 2.
fn refused(file: &std::path::Path, invalid: &cachetier_crds::validate::Invalid) -> ExitCode {
    eprintln!("{} is not a valid CacheTier:", file.display());
    for problem in &invalid.problems {
        eprintln!("  {problem}");
    }
    ExitCode::from(2)
}
