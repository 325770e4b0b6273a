//! The webhook's TLS without manual steps.
//!
//! By default the operator makes its own CA and serving certificate (rcgen),
//! keeps them in a Secret so every replica serves the same one, renews them a
//! month before they expire, and writes the CA into the
//! MutatingWebhookConfiguration's `caBundle`. With cert-manager (or any other
//! issuer), the certificate comes from files in a directory instead and is
//! reloaded when they change. Either way the server picks up a new certificate
//! without a restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tracing::{info, warn};

use crate::cluster::error::Error;
use crate::reconcile::FIELD_MANAGER;

/// How long a generated certificate is valid.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Renew when less than this is left.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Annotation on the Secret: when its certificate expires (Unix seconds).
const NOT_AFTER_ANNOTATION: &str = "cachetier.io/not-after";

/// PEM-encoded CA, certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The CA that signed `cert` (the webhook configuration's `caBundle`).
    pub ca: String,
    /// The serving certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
    /// When `cert` expires, Unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn tls_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Render(format!("webhook certificate: {what}: {e}"))
}

/// A CA and a serving certificate for `dns_names`, valid from now for a year.
pub fn generate(dns_names: &[String]) -> Result<Pem, Error> {
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + VALIDITY;
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| tls_error("CA parameters", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cachetier-operator webhook CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = now - Duration::from_secs(300);
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(|e| tls_error("CA key", e))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| tls_error("CA certificate", e))?;

    let mut params =
        CertificateParams::new(dns_names.to_vec()).map_err(|e| tls_error("certificate parameters", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
    params.not_before = now - Duration::from_secs(300);
    params.not_after = not_after;
    let key = KeyPair::generate().map_err(|e| tls_error("key", e))?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| tls_error("certificate", e))?;
    Ok(Pem {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_after: not_after.unix_timestamp(),
    })
}

fn certified_key(pem: &Pem) -> Result<Arc<CertifiedKey>, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error("parsing the certificate", e))?;
    let key =
        PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).map_err(|e| tls_error("parsing the key", e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| tls_error("the key's type", e))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The certificate the server presents; replaced in place on renewal.
#[derive(Debug)]
pub struct Certificates {
    current: RwLock<Arc<CertifiedKey>>,
    pem: RwLock<Pem>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

impl Certificates {
    /// Serves `pem`.
    pub fn new(pem: Pem) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified_key(&pem)?),
            pem: RwLock::new(pem),
        }))
    }

    /// Switches to `pem` if it differs from what is served.
    pub fn replace(&self, pem: Pem) -> Result<bool, Error> {
        if self.pem.read().is_ok_and(|p| *p == pem) {
            return Ok(false);
        }
        let key = certified_key(&pem)?;
        if let (Ok(mut current), Ok(mut stored)) = (self.current.write(), self.pem.write()) {
            *current = key;
            *stored = pem;
        }
        Ok(true)
    }

    /// The CA of what is served.
    pub fn ca(&self) -> String {
        self.pem.read().map(|p| p.ca.clone()).unwrap_or_default()
    }

    /// A rustls server configuration that resolves through `self`.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_no_client_auth().with_cert_resolver(self.clone()));
        match config {
            Ok(mut c) => {
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(c)
            }
            // The ring provider supports the default versions; this is unreachable.
            Err(_) => Arc::new(
                rustls::ServerConfig::builder()
                    .with_no_client_auth()
                    .with_cert_resolver(self.clone()),
            ),
        }
    }
}

/// Where the webhook's certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Made by the operator and kept in this Secret of the operator's namespace.
    Generated {
        /// The Secret's namespace (the operator's).
        namespace: String,
        /// The Secret's name.
        secret: String,
        /// The webhook Service's name (the certificate names its DNS names).
        service: String,
        /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
        configuration: String,
    },
    /// `tls.crt`, `tls.key` (and `ca.crt`) in this directory, e.g. a
    /// cert-manager Secret mounted into the pod; cert-manager's CA injector
    /// keeps the `caBundle`.
    Files(PathBuf),
}

fn secret_pem(secret: &Secret) -> Option<Pem> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    let not_after = secret
        .metadata
        .annotations
        .as_ref()?
        .get(NOT_AFTER_ANNOTATION)?
        .parse()
        .ok()?;
    Some(Pem {
        ca: text("ca.crt")?,
        cert: text("tls.crt")?,
        key: text("tls.key")?,
        not_after,
    })
}

fn due(pem: &Pem) -> bool {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    pem.not_after - now < i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX)
}

/// The current certificate: from the files, or the Secret (made or renewed
/// when missing or due; another replica's concurrent renewal wins a race).
pub async fn load(client: &kube::Client, source: &Source) -> Result<Pem, Error> {
    match source {
        Source::Files(dir) => {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name)).map_err(|source| Error::Io {
                    context: format!("reading the webhook certificate {}", dir.join(name).display()),
                    source,
                })
            };
            Ok(Pem {
                cert: read("tls.crt")?,
                key: read("tls.key")?,
                ca: read("ca.crt").unwrap_or_default(),
                not_after: i64::MAX,
            })
        }
        Source::Generated {
            namespace,
            secret,
            service,
            ..
        } => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let existing = secrets
                .get_opt(secret)
                .await
                .map_err(|e| Error::kubernetes("reading the webhook Secret", e))?;
            if let Some(pem) = existing.as_ref().and_then(secret_pem).filter(|p| !due(p)) {
                return Ok(pem);
            }
            let names = vec![
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ];
            let pem = generate(&names)?;
            let data = BTreeMap::from([
                ("ca.crt".to_string(), ByteString(pem.ca.clone().into_bytes())),
                ("tls.crt".to_string(), ByteString(pem.cert.clone().into_bytes())),
                ("tls.key".to_string(), ByteString(pem.key.clone().into_bytes())),
            ]);
            let mut object = Secret {
                type_: Some("kubernetes.io/tls".to_string()),
                data: Some(data),
                ..Secret::default()
            };
            object.metadata.name = Some(secret.clone());
            object.metadata.annotations = Some(BTreeMap::from([(
                NOT_AFTER_ANNOTATION.to_string(),
                pem.not_after.to_string(),
            )]));
            let written = match existing {
                Some(old) => {
                    object.metadata.resource_version = old.metadata.resource_version;
                    secrets.replace(secret, &PostParams::default(), &object).await
                }
                None => secrets.create(&PostParams::default(), &object).await,
            };
            match written {
                Ok(_) => {
                    info!(secret = %secret, "generated the webhook certificate");
                    Ok(pem)
                }
                // Another replica wrote it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let theirs = secrets
                        .get(secret)
                        .await
                        .map_err(|e| Error::kubernetes("re-reading the webhook Secret", e))?;
                    secret_pem(&theirs)
                        .ok_or_else(|| tls_error("the Secret", "written by another replica but unreadable"))
                }
                Err(e) => Err(Error::kubernetes("writing the webhook Secret", e)),
            }
        }
    }
}

/// Writes `ca` into every webhook of the configuration (server-side apply of
/// the `caBundle` fields only).
pub async fn publish_ca(client: &kube::Client, configuration: &str, ca: &str) -> Result<(), Error> {
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = configurations.get(configuration).await.map_err(|e| {
        Error::kubernetes(
            format!("reading MutatingWebhookConfiguration {configuration} (installed by the Helm chart)"),
            e,
        )
    })?;
    let bundle = ByteString(ca.as_bytes().to_vec());
    let webhooks: Vec<_> = current
        .webhooks
        .iter()
        .flatten()
        .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    let patch = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": configuration},
        "webhooks": webhooks,
    });
    configurations
        .patch(
            configuration,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| Error::kubernetes(format!("writing the caBundle of {configuration}"), e))?;
    Ok(())
}

/// Keeps `certs` current: re-reads (and renews) every `every`, and keeps the
/// webhook configuration's `caBundle` in step with a generated CA. A
/// failure is retried sooner (5 s, doubling up to `every`): until the
/// caBundle is written the API server cannot call the webhook, and with
/// `failurePolicy: Ignore` pods would be created without their sidecar.
/// `published`: whether the first `caBundle` write (at start) succeeded.
pub async fn keep_current(
    client: kube::Client,
    source: Source,
    certs: Arc<Certificates>,
    every: Duration,
    published: bool,
) {
    let mut failures = u32::from(!published);
    loop {
        tokio::time::sleep(retry_after(failures, every)).await;
        let mut failed = false;
        match load(&client, &source).await.and_then(|pem| certs.replace(pem)) {
            Ok(true) => info!("webhook certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                failed = true;
                warn!(error = %e, "cannot refresh the webhook certificate");
            }
        }
        if let Source::Generated { configuration, .. } = &source
            && let Err(e) = publish_ca(&client, configuration, &certs.ca()).await
        {
            failed = true;
            warn!(error = %e, "cannot update the webhook caBundle");
        }
        failures = if failed { failures.saturating_add(1) } else { 0 };
    }
}

/// The pause before the next refresh after `failures` failed ones in a row.
fn retry_after(failures: u32, every: Duration) -> Duration {
    if failures == 0 {
        return every;
    }
    crate::backoff::doubling(Duration::from_secs(5), failures, every)
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn a_failed_refresh_is_retried_after_5_s_doubling_up_to_the_period() {
        let every = Duration::from_secs(600);
        let pauses: Vec<u64> = (0..9).map(|n| retry_after(n, every).as_secs()).collect();
        assert_eq!(pauses, vec![600, 5, 10, 20, 40, 80, 160, 320, 600]);
        assert_eq!(retry_after(u32::MAX, every), every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_certificate_is_served_and_names_the_webhook_service() {
        let pem = generate(&["hook.ops.svc".to_string()]).unwrap();
        assert!(pem.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pem.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!due(&pem), "a fresh certificate is not due for renewal");
        let certs = Certificates::new(pem.clone()).unwrap();
        assert!(
            !certs.replace(pem).unwrap(),
            "the same certificate is not a change"
        );
        let other = generate(&["hook.ops.svc".to_string()]).unwrap();
        assert!(certs.replace(other.clone()).unwrap());
        assert_eq!(certs.ca(), other.ca);
    }

    #[test]
    fn a_certificate_close_to_expiry_is_due() {
        let mut pem = generate(&["x.y.svc".to_string()]).unwrap();
        pem.not_after = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
        assert!(due(&pem));
    }
}
