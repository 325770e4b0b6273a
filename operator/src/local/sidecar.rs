//! The sidecar in front of a local tier, so `redis-cli -p 6379` (or any plain,
//! non-cluster Redis client) reaches the sharded tier in one step.
//!
//! Responsible for turning the manifest's `spec.sidecar`, `spec.health` and
//! `spec.readGate` into the sidecar's [`Config`], and for starting and stopping
//! the in-process sidecar. The proxy itself is the `cachetier-sidecar` crate.

use std::net::SocketAddr;

use cachetier_crds::{CacheTierSpec, ReadPolicy};
use cachetier_sidecar::config::Credentials;
use cachetier_sidecar::{CacheConfig, Config, Sidecar};

use crate::{Error, Result};

/// Where the local sidecar listens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SidecarOptions {
    /// Port on 127.0.0.1 applications connect to; `None` takes the manifest's
    /// `spec.sidecar.port`.
    pub port: Option<u16>,
    /// Where `/metrics`, `/livez` and `/readyz` are served; `None` for none.
    pub metrics: Option<SocketAddr>,
    /// The tier's credentials when `spec.auth` is set (filled in by local mode
    /// from the same source the nodes' password comes from).
    pub auth: Option<Credentials>,
}

impl SidecarOptions {
    /// The address applications connect to for a tier with this spec.
    pub fn listen(&self, spec: &CacheTierSpec) -> SocketAddr {
        // The schema bounds spec.sidecar.port to 1..=65535.
        let port = self
            .port
            .unwrap_or_else(|| u16::try_from(spec.sidecar.port).unwrap_or(6379));
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// The sidecar configuration a CacheTier asks for, with `seeds` as its seed nodes.
pub fn sidecar_config(spec: &CacheTierSpec, options: &SidecarOptions, seeds: &[SocketAddr]) -> Config {
    let cache = &spec.sidecar.local_cache;
    Config {
        listen: options.listen(spec),
        seeds: seeds.iter().map(ToString::to_string).collect(),
        metrics: options.metrics,
        read_policy: match spec.sidecar.read_policy {
            ReadPolicy::Random => cachetier_sidecar::ReadPolicy::Random,
            ReadPolicy::BestOfTwo => cachetier_sidecar::ReadPolicy::BestOfTwo,
            ReadPolicy::Primary => cachetier_sidecar::ReadPolicy::Primary,
            ReadPolicy::ReplicasOnly => cachetier_sidecar::ReadPolicy::ReplicasOnly,
        },
        response_timeout: spec.health.response_timeout.into(),
        read_your_writes: spec.sidecar.read_your_writes,
        split_transactions: spec.sidecar.split_transactions,
        // The schema bounds maxLagBytes at >= 0; a negative value cannot get here.
        max_lag_bytes: u64::try_from(spec.read_gate.max_lag_bytes).unwrap_or(0),
        cache: if cache.enabled {
            CacheConfig {
                prefixes: cache.key_prefixes.clone(),
                ttl: cache.ttl.into(),
                max_bytes: u64::try_from(cache.max_bytes).unwrap_or(0),
            }
        } else {
            CacheConfig::default()
        },
        auth: options.auth.clone(),
        ..Config::default()
    }
}

/// Fails at once, before any node starts, when the sidecar's address is taken:
/// finding out only after the tier has bootstrapped would waste the user's time.
pub fn check_listen_address(spec: &CacheTierSpec, options: &SidecarOptions) -> Result<()> {
    for (what, addr) in [
        ("listen", Some(options.listen(spec))),
        ("metrics", options.metrics),
    ] {
        let Some(addr) = addr else { continue };
        if addr.port() == 0 {
            continue;
        }
        std::net::TcpListener::bind(addr).map_err(|e| Error::Sidecar {
            detail: format!(
                "cannot {what} on {addr}: {e} (is another Redis or sidecar running there? choose another port with --sidecar-port / --sidecar-metrics)"
            ),
        })?;
    }
    Ok(())
}

/// The sidecar running in front of a local tier, on a thread of its own.
///
/// The standalone sidecar measured fastest as one single-threaded event loop
/// (see `sidecar/BENCHMARKS.md`); embedding it in the operator's multi-threaded
/// runtime would lose that, so it gets its own current-thread runtime here.
#[derive(Debug)]
pub struct RunningSidecar {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningSidecar {
    /// Where applications connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drains in-flight requests (bounded) and joins the thread.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts the sidecar in front of the tier whose nodes include `seeds`.
pub async fn start(
    spec: &CacheTierSpec,
    options: &SidecarOptions,
    seeds: &[SocketAddr],
) -> Result<RunningSidecar> {
    let config = sidecar_config(spec, options, seeds);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<Result<SocketAddr>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("cachetier-sidecar".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    let _ = bound_tx.send(Err(Error::Sidecar {
                        detail: format!("cannot start its runtime: {e}"),
                    }));
                    return;
                }
            };
            runtime.block_on(async move {
                match Sidecar::bind(config).await {
                    Ok(sidecar) => {
                        let _ = bound_tx.send(Ok(sidecar.local_addr()));
                        let _ = stop_rx.await;
                        sidecar.shutdown().await;
                    }
                    Err(e) => {
                        let _ = bound_tx.send(Err(Error::Sidecar {
                            detail: e.to_string(),
                        }));
                    }
                }
            });
        })
        .map_err(|e| Error::Sidecar {
            detail: format!("cannot start its thread: {e}"),
        })?;
    let addr = bound_rx.await.map_err(|_| Error::Sidecar {
        detail: "its thread ended before it was listening".into(),
    })??;
    Ok(RunningSidecar {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> CacheTierSpec {
        cachetier_crds::validate::parse_manifest(yaml).unwrap().spec
    }

    fn spec_default() -> CacheTierSpec {
        spec(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec: {shards: 1, maxMemory: 64Mi}\n",
        )
    }

    const OPTIONS: SidecarOptions = SidecarOptions {
        port: None,
        metrics: None,
        auth: None,
    };

    #[test]
    fn the_manifest_sidecar_section_becomes_the_sidecar_config() {
        let spec = spec(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec:\n  shards: 3\n  maxMemory: 64Mi\n  health: {responseTimeout: 750ms}\n  readGate: {maxLagBytes: 4096}\n  sidecar:\n    readPolicy: bestOfTwo\n    readYourWrites: false\n    splitTransactions: false\n    localCache: {enabled: true, keyPrefixes: ['p:'], ttl: 30s, maxBytes: 2048}\n",
        );
        let seeds: Vec<SocketAddr> = vec!["127.0.0.1:7000".parse().unwrap()];
        let config = sidecar_config(&spec, &OPTIONS, &seeds);
        assert_eq!(config.seeds, vec!["127.0.0.1:7000".to_string()]);
        assert_eq!(config.read_policy, cachetier_sidecar::ReadPolicy::BestOfTwo);
        assert_eq!(config.response_timeout, std::time::Duration::from_millis(750));
        assert_eq!(config.max_lag_bytes, 4096);
        assert_eq!(config.cache.prefixes, vec!["p:".to_string()]);
        assert_eq!(config.cache.ttl, std::time::Duration::from_secs(30));
        assert_eq!(config.cache.max_bytes, 2048);
        assert!(!config.read_your_writes);
        assert!(!config.split_transactions);
        let defaults = sidecar_config(&spec_default(), &OPTIONS, &seeds);
        assert!(defaults.read_your_writes, "on unless the spec turns it off");
        assert!(defaults.split_transactions, "on unless the spec turns it off");
        config.validate().unwrap();
    }

    #[test]
    fn the_sidecar_listens_on_the_manifest_port_unless_overridden() {
        let spec = spec(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec:\n  shards: 1\n  maxMemory: 64Mi\n  sidecar: {port: 6400}\n",
        );
        assert_eq!(
            OPTIONS.listen(&spec),
            "127.0.0.1:6400".parse::<SocketAddr>().unwrap()
        );
        let overridden = SidecarOptions {
            port: Some(6500),
            metrics: None,
            auth: None,
        };
        assert_eq!(
            overridden.listen(&spec),
            "127.0.0.1:6500".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn a_disabled_local_cache_caches_nothing_even_with_prefixes() {
        let spec = spec(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec:\n  shards: 1\n  maxMemory: 64Mi\n  sidecar:\n    localCache: {enabled: false, keyPrefixes: ['p:']}\n",
        );
        let config = sidecar_config(&spec, &OPTIONS, &[]);
        assert!(config.cache.prefixes.is_empty());
    }

    #[test]
    fn a_taken_sidecar_port_is_refused_before_anything_starts() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let options = SidecarOptions {
            port: Some(taken.local_addr().unwrap().port()),
            metrics: None,
            auth: None,
        };
        let spec = spec(
            "apiVersion: cachetier.io/v1alpha1\nkind: CacheTier\nmetadata: {name: t}\nspec: {shards: 1, maxMemory: 64Mi}\n",
        );
        let err = check_listen_address(&spec, &options).unwrap_err().to_string();
        assert!(err.contains(&taken.local_addr().unwrap().to_string()), "{err}");
        assert!(err.contains("--sidecar-port"), "{err}");
    }
}
