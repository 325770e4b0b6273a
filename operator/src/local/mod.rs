//! Local mode: a CacheTier on `redis-server` processes on this machine, driven
//! by the same core as on Kubernetes.
//!
//! [`LocalTier`] runs one tier in the background (for tests and embedding);
//! [`run`] is the `cachetier-operator local` command: it also watches the
//! manifest file, prints the live status table, hands the seed addresses to a
//! hook once the tier serves, and cleans up on Ctrl-C / SIGTERM. Not
//! responsible for the sidecar: the hook is where a caller starts one.

pub mod pool;
pub mod sidecar;
pub mod table;

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cachetier_crds::{CacheTierSpec, CacheTierStatus, NodeRole, Phase};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

pub use pool::{LocalPool, LocalPoolOptions, PortSource, SequentialPorts};
pub use sidecar::SidecarOptions;

use crate::cluster::{Reconciler, TierConfig, Timing};
use crate::{Error, Result};

/// A tier running on local processes, reconciled by a background task.
#[derive(Debug)]
pub struct LocalTier {
    pool: Arc<LocalPool>,
    tiers: watch::Sender<TierConfig>,
    status: watch::Receiver<Option<CacheTierStatus>>,
    task: JoinHandle<()>,
}

impl LocalTier {
    /// Starts reconciling `tier` on a new local pool. Returns at once; use
    /// [`LocalTier::wait_ready`] to wait for the cluster.
    pub fn start(tier: TierConfig, options: LocalPoolOptions) -> Result<Self> {
        let pool = Arc::new(LocalPool::new(&tier.name, options)?);
        let (tiers, tiers_rx) = watch::channel(tier.clone());
        let mut reconciler = Reconciler::new(pool.clone(), tier);
        let status = reconciler.subscribe();
        let task = tokio::spawn(async move { reconciler.run(tiers_rx).await });
        Ok(Self {
            pool,
            tiers,
            status,
            task,
        })
    }

    /// The pool (for its processes and directories).
    pub fn pool(&self) -> &Arc<LocalPool> {
        &self.pool
    }

    /// The latest status.
    pub fn status(&self) -> Option<CacheTierStatus> {
        self.status.borrow().clone()
    }

    /// A receiver of every new status.
    pub fn subscribe(&self) -> watch::Receiver<Option<CacheTierStatus>> {
        self.status.clone()
    }

    /// Changes the desired tier (e.g. a new shard count: live resharding).
    pub fn update(&self, tier: TierConfig) {
        self.tiers.send_replace(tier);
    }

    /// The desired tier.
    pub fn tier(&self) -> TierConfig {
        self.tiers.borrow().clone()
    }

    /// Waits until the status says Ready, or fails after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<CacheTierStatus> {
        let mut rx = self.status.clone();
        let wait = async {
            loop {
                if let Some(s) = rx.borrow_and_update().clone()
                    && s.phase == Some(Phase::Ready)
                {
                    return Some(s);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Some(s)) => Ok(s),
            _ => Err(Error::Deadline {
                what: format!(
                    "tier not ready; last phase {:?}",
                    self.status().and_then(|s| s.phase)
                ),
                waited: timeout,
            }),
        }
    }

    /// Stops reconciling, every process, and removes every directory.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        self.pool.shutdown().await;
    }
}

/// Addresses of the nodes that serve, primaries first: what a cluster client
/// (or the sidecar) needs to discover the cluster.
pub fn seeds(status: &CacheTierStatus) -> Vec<SocketAddr> {
    let mut primaries = Vec::new();
    let mut replicas = Vec::new();
    for node in status.shards.iter().flat_map(|s| s.nodes.iter()) {
        let Ok(addr) = node.address.parse::<SocketAddr>() else {
            continue;
        };
        match node.role {
            NodeRole::Primary if node.serving => primaries.push(addr),
            NodeRole::Replica if node.serving => replicas.push(addr),
            _ => {}
        }
    }
    primaries.extend(replicas);
    primaries
}

/// Options of `cachetier-operator local`.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The CacheTier manifest.
    pub manifest: PathBuf,
    /// First client port; nodes take the following ones.
    pub base_port: u16,
    /// Cluster bus port = client port + this.
    pub bus_port_offset: u16,
    /// The `redis-server` program.
    pub redis_server: PathBuf,
    /// How often the manifest is checked for changes.
    pub watch_interval: Duration,
    /// How often the status table is refreshed.
    pub print_interval: Duration,
    /// Internal timings (node timeout etc.).
    pub timing: Timing,
    /// Stop (and clean up) as soon as the tier is first Ready, after printing
    /// how long it took: for scripts and benchmarks.
    pub until_ready: bool,
    /// The sidecar to start in front of the tier once it serves every slot;
    /// `None` runs the tier alone.
    pub sidecar: Option<SidecarOptions>,
    /// Where the password comes from when the manifest sets `spec.auth`
    /// (local mode has no Secrets).
    pub auth: LocalAuth,
}

/// Local-mode stand-in for the Secret that `spec.auth` names.
#[derive(Debug, Clone, Default)]
pub struct LocalAuth {
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (one trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// ACL user name; without it the `default` user (`requirepass`).
    pub username: Option<String>,
}

impl LocalAuth {
    /// The credentials, read now; `Ok(None)` when no source is set.
    pub fn resolve(&self) -> Result<Option<crate::cluster::config::Auth>> {
        let invalid = |p: String| cachetier_crds::validate::Invalid { problems: vec![p] };
        let password = match (&self.password_env, &self.password_file) {
            (Some(var), _) => std::env::var(var)
                .map_err(|_| invalid(format!("spec.auth: environment variable {var} is not set")))?,
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|source| Error::Io {
                context: format!("spec.auth: cannot read {}", path.display()),
                source,
            })?,
            (None, None) => return Ok(None),
        };
        let password = password.strip_suffix('\n').unwrap_or(&password);
        let password = password.strip_suffix('\r').unwrap_or(password).to_string();
        if password.is_empty() {
            return Err(invalid("spec.auth: the password is empty".into()).into());
        }
        Ok(Some(crate::cluster::config::Auth {
            username: self.username.clone(),
            password,
        }))
    }
}

impl LocalOptions {
    /// Defaults for `manifest`: base port 7000, bus ports at +10000.
    pub fn new(manifest: impl Into<PathBuf>) -> Self {
        Self {
            manifest: manifest.into(),
            base_port: 7000,
            bus_port_offset: 10000,
            redis_server: PathBuf::from("redis-server"),
            watch_interval: Duration::from_millis(500),
            print_interval: Duration::from_secs(1),
            timing: Timing::default(),
            until_ready: false,
            sidecar: None,
            auth: LocalAuth::default(),
        }
    }
}

/// Validates a manifest once and gives both views of it: the spec (for the
/// sidecar) and the core's tier configuration.
fn parse(options: &LocalOptions, text: &str) -> Result<(CacheTierSpec, TierConfig)> {
    let tier = cachetier_crds::validate::parse_manifest(text)?;
    let mut config = TierConfig::from_tier(&tier)?;
    config.timing = options.timing;
    if tier.spec.auth.is_some() {
        config.auth = options.auth.resolve()?;
        if config.auth.is_none() {
            return Err(cachetier_crds::validate::Invalid {
                problems: vec![
                    "spec.auth is set: in local mode give the password with --auth-password-env VAR or --auth-password-file PATH (and --auth-username for an ACL user)".into(),
                ],
            }
            .into());
        }
    }
    Ok((tier.spec, config))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
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

/// Runs the tier of `options.manifest` until Ctrl-C / SIGTERM: reconciles,
/// re-reads the manifest when it changes (an invalid edit is reported and the
/// running tier kept), prints the status table, and — once the tier is
/// first Ready (every slot served, cluster state ok) — starts the sidecar when
/// `options.sidecar` asks for one, calls `on_ready` with the seed addresses and runs the
/// future it returns alongside (it is dropped at shutdown).
pub async fn run<F, Fut>(options: LocalOptions, on_ready: F) -> Result<()>
where
    F: FnOnce(Vec<SocketAddr>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_until(options, on_ready, shutdown_signal()).await
}

/// [`run`], stopping when `stop` completes instead of on a signal.
pub async fn run_until<F, Fut>(
    options: LocalOptions,
    on_ready: F,
    stop: impl Future<Output = ()>,
) -> Result<()>
where
    F: FnOnce(Vec<SocketAddr>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut text = std::fs::read_to_string(&options.manifest).map_err(|source| Error::Io {
        context: format!("cannot read {}", options.manifest.display()),
        source,
    })?;
    // `spec` is the spec last applied; the sidecar is configured from it.
    let (mut spec, config) = parse(&options, &text)?;
    let name = config.name.clone();
    // The sidecar's port is fixed at start (from the command line or the
    // manifest) and checked before any node starts; later edits of
    // spec.sidecar.port do not move it.
    let mut options = options;
    if let Some(sidecar) = &mut options.sidecar {
        sidecar::check_listen_address(&spec, sidecar)?;
        sidecar.port = Some(sidecar.listen(&spec).port());
    }
    if let Some(auth) = &config.auth {
        println!(
            "spec.auth: every node requires the password{}; the sidecar presents it",
            auth.username
                .as_deref()
                .map(|u| format!(" of ACL user {u}"))
                .unwrap_or_default()
        );
        if let Some(sidecar) = &mut options.sidecar {
            sidecar.auth = Some(cachetier_sidecar::config::Credentials {
                username: auth.username.clone(),
                password: auth.password.clone(),
            });
        }
    }
    let mut pool_options = LocalPoolOptions::new(options.base_port, options.bus_port_offset);
    pool_options.redis_server = options.redis_server.clone();
    let tier = LocalTier::start(config, pool_options)?;
    let tty = std::io::stdout().is_terminal();
    println!(
        "cachetier local: tier {name}, nodes from port {} (bus ports +{}), data under {}",
        options.base_port,
        options.bus_port_offset,
        tier.pool().root().display()
    );

    let mut on_ready = Some(on_ready);
    let mut proxy: Option<sidecar::RunningSidecar> = None;
    let mut failure: Option<Error> = None;
    let mut extra: Option<JoinHandle<()>> = None;
    let mut watch_tick = tokio::time::interval(options.watch_interval);
    let mut print_tick = tokio::time::interval(options.print_interval);
    let mut last_printed = String::new();
    let started = tokio::time::Instant::now();
    let mut statuses = tier.subscribe();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = statuses.changed(), if options.until_ready => {
                let ready = statuses.borrow_and_update().as_ref().is_some_and(|s| s.phase == Some(Phase::Ready));
                if changed.is_err() || ready {
                    let nodes = tier.status().map_or(0, |s| s.total_nodes);
                    println!("{name}: {nodes} node(s) ready after {:.2} s", started.elapsed().as_secs_f64());
                    break;
                }
            }
            _ = watch_tick.tick() => {
                let Ok(new_text) = std::fs::read_to_string(&options.manifest) else { continue };
                if new_text == text {
                    continue;
                }
                text = new_text;
                match parse(&options, &text) {
                    Ok((new_spec, config)) => {
                        println!("{}: changed; now {} shard(s) x {} replica(s)", options.manifest.display(), config.shards, config.replicas_per_shard);
                        tier.update(config);
                        let old_spec = std::mem::replace(&mut spec, new_spec);
                        if let (Some(running), Some(sidecar_options)) = (proxy.take(), &options.sidecar) {
                            if sidecar::sidecar_config(&old_spec, sidecar_options, &[]) == sidecar::sidecar_config(&spec, sidecar_options, &[]) {
                                proxy = Some(running);
                                continue;
                            }
                            println!("sidecar settings changed: restarting the sidecar (client connections are closed)");
                            running.shutdown().await;
                            let seeds = tier.status().map(|s| seeds(&s)).unwrap_or_default();
                            match sidecar::start(&spec, sidecar_options, &seeds).await {
                                Ok(s) => proxy = Some(s),
                                Err(e) => {
                                    failure = Some(e);
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        println!("{}: not applied, the tier keeps running as before: {e}", options.manifest.display());
                    }
                }
            }
            _ = print_tick.tick() => {
                let Some(status) = tier.status() else { continue };
                let seeds = seeds(&status);
                // The Ready condition (every slot served, cluster_state ok on
                // the primaries), not bare slot coverage: a sidecar started
                // earlier may read a slot map the nodes have not agreed on yet.
                let serving = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == cachetier_crds::CONDITION_READY && c.status == "True");
                if serving
                    && let Some(hook) = on_ready.take()
                {
                    info!(?seeds, "tier serves every slot");
                    if let Some(sidecar_options) = &options.sidecar {
                        match sidecar::start(&spec, sidecar_options, &seeds).await {
                            Ok(s) => proxy = Some(s),
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                    extra = Some(tokio::spawn(hook(seeds.clone())));
                }
                let connect = match (&proxy, seeds.first()) {
                    (Some(p), Some(node)) => Some(format!(
                        "redis-cli -h {} -p {}   (the sidecar; a cluster-aware client may use {})",
                        p.local_addr().ip(),
                        p.local_addr().port(),
                        table::cluster_connect(&node.to_string())
                    )),
                    (Some(p), None) => Some(format!("redis-cli -h {} -p {}", p.local_addr().ip(), p.local_addr().port())),
                    (None, Some(node)) => Some(table::cluster_connect(&node.to_string())),
                    (None, None) => None,
                };
                let table = table::render(&name, &status, connect.as_deref());
                // On a terminal the table is redrawn in place; in a log only
                // when something other than timings changed.
                let key: String = table
                    .lines()
                    .map(|l| l.split_whitespace().filter(|w| !w.ends_with("µs") && !w.ends_with("ms")).collect::<Vec<_>>().join(" "))
                    .collect::<Vec<_>>()
                    .join("\n");
                if tty {
                    print!("\x1b[H\x1b[2J{table}");
                } else if key != last_printed {
                    println!("{table}");
                }
                last_printed = key;
            }
        }
    }
    println!("stopping: every node of {name} is being shut down and its data removed");
    if let Some(proxy) = proxy {
        proxy.shutdown().await;
    }
    if let Some(task) = extra {
        task.abort();
    }
    tier.shutdown().await;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
