//! One cluster core per tier: a [`Reconciler`] over a [`KubePool`] in its own
//! task, fed spec changes through a watch channel, publishing the status it
//! computes. Kept by object reference; stopped when the tier is deleted or
//! this replica loses the lease (an aborted core is the core's crash-recovery
//! path: the next leader's core starts from a fresh observation).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cachetier_crds::{CacheTier, CacheTierStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::pool::KubePool;
use crate::cluster::config::Auth;
use crate::cluster::error::Error;
use crate::cluster::{Reconciler, TierConfig};

#[derive(Debug)]
struct Core {
    pool: Arc<KubePool>,
    spec: watch::Sender<TierConfig>,
    status: watch::Receiver<Option<CacheTierStatus>>,
    task: JoinHandle<()>,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The password (and ACL user) from the tier's Secret, when `spec.auth` is set.
async fn credentials(client: &kube::Client, tier: &CacheTier) -> Result<Option<Auth>, Error> {
    let Some(auth) = &tier.spec.auth else {
        return Ok(None);
    };
    let namespace = tier.metadata.namespace.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = secrets
        .get_opt(&auth.secret_name)
        .await
        .map_err(|e| Error::kubernetes(format!("reading Secret {namespace}/{}", auth.secret_name), e))?;
    let secret = secret.ok_or_else(|| {
        Error::AuthSecret(format!("Secret {namespace}/{} does not exist", auth.secret_name))
    })?;
    let value = |key: &str| -> Result<String, Error> {
        let bytes = secret.data.as_ref().and_then(|d| d.get(key)).ok_or_else(|| {
            Error::AuthSecret(format!(
                "Secret {}/{} has no key {key:?}",
                namespace, auth.secret_name
            ))
        })?;
        String::from_utf8(bytes.0.clone()).map_err(|_| {
            Error::AuthSecret(format!(
                "key {key:?} of Secret {}/{} is not UTF-8",
                namespace, auth.secret_name
            ))
        })
    };
    Ok(Some(Auth {
        password: value(&auth.password_key)?,
        username: auth.username_key.as_deref().map(value).transpose()?,
    }))
}

/// The cores of every tier this replica leads.
#[derive(Debug, Default)]
pub struct Cores {
    running: Mutex<HashMap<ObjectRef<CacheTier>, Core>>,
    swept: Mutex<Vec<ObjectRef<CacheTier>>>,
    defaults: crate::reconcile::Defaults,
}

impl Cores {
    /// No cores yet; new shards' StatefulSets are built with `defaults`.
    pub fn new(defaults: crate::reconcile::Defaults) -> Self {
        Self {
            defaults,
            ..Self::default()
        }
    }

    /// Starts the tier's core if it has none, hands it the current spec
    /// (with the credentials from the Secret `spec.auth` names), and returns
    /// the latest status it computed (none before its first round).
    pub async fn ensure(
        &self,
        client: kube::Client,
        tier: &CacheTier,
    ) -> Result<Option<CacheTierStatus>, Error> {
        let mut config = TierConfig::from_tier(tier)?;
        config.auth = credentials(&client, tier).await?;
        let key = ObjectRef::from_obj(tier);
        let mut running = crate::controller::lock(&self.running);
        if let Some(core) = running.get(&key).filter(|c| !c.task.is_finished()) {
            core.pool.update(tier.clone());
            core.spec.send_if_modified(|current| {
                let changed = *current != config;
                *current = config.clone();
                changed
            });
            return Ok(core.status.borrow().clone());
        }
        let pool = Arc::new(KubePool::new(client, tier.clone(), self.defaults.clone()));
        let mut reconciler = Reconciler::new(pool.clone(), config.clone());
        let status = reconciler.subscribe();
        let (spec, specs) = watch::channel(config);
        let task = tokio::spawn(async move { reconciler.run(specs).await });
        running.insert(
            key,
            Core {
                pool,
                spec,
                status,
                task,
            },
        );
        Ok(None)
    }

    /// Stops the tier's core.
    pub fn stop(&self, key: &ObjectRef<CacheTier>) {
        crate::controller::lock(&self.running).remove(key);
    }

    /// Stops every core at once (the lease was lost).
    pub fn stop_all(&self) {
        crate::controller::lock(&self.running).clear();
    }

    /// Stops the cores of tiers not in `alive` (deleted while we were not looking).
    pub fn retain(&self, alive: &[ObjectRef<CacheTier>]) {
        let mut swept = Vec::new();
        crate::controller::lock(&self.running).retain(|k, _| {
            let keep = alive.contains(k);
            if !keep {
                swept.push(k.clone());
            }
            keep
        });
        crate::controller::lock(&self.swept).extend(swept);
    }

    /// The tiers [`Cores::retain`] stopped since the last call.
    pub fn stopped_since_last_sweep(&self) -> Vec<ObjectRef<CacheTier>> {
        std::mem::take(&mut *crate::controller::lock(&self.swept))
    }

    /// How many cores run.
    pub fn len(&self) -> usize {
        crate::controller::lock(&self.running).len()
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::controller::mock::{self, bounded};

    fn tier() -> CacheTier {
        serde_json::from_value(json!({
            "apiVersion": "cachetier.io/v1alpha1", "kind": "CacheTier",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u"},
            "spec": {"shards": 1, "maxMemory": "1Gi", "auth": {"secretName": "t-auth", "usernameKey": "user"}}
        }))
        .unwrap()
    }

    async fn answer_secret(handle: &mut mock::Handle, status: u16, body: serde_json::Value) {
        let (_, uri, _, send) = mock::next(handle).await;
        assert_eq!(
            uri.split('?').next(),
            Some("/api/v1/namespaces/ns/secrets/t-auth")
        );
        mock::respond(send, status, &body);
    }

    #[tokio::test]
    async fn the_tiers_secret_gives_the_core_its_password_and_user() {
        let (client, mut handle) = mock::client();
        let t = tier();
        let asking = tokio::spawn(async move { credentials(&client, &t).await });
        // "s3cret" and "app", base64.
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t-auth"}, "data": {"password": "czNjcmV0", "user": "YXBw"}});
        answer_secret(&mut handle, 200, secret).await;
        let auth = bounded(asking).await.unwrap().unwrap();
        assert_eq!(
            (auth.username.as_deref(), auth.password.as_str()),
            (Some("app"), "s3cret")
        );
    }

    #[tokio::test]
    async fn a_missing_secret_or_key_is_named_in_the_error() {
        let (client, mut handle) = mock::client();
        let t = tier();
        let c = client.clone();
        let asking = tokio::spawn(async move { credentials(&c, &t).await });
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "secrets \"t-auth\" not found"});
        answer_secret(&mut handle, 404, not_found).await;
        let err = bounded(asking).await.unwrap_err().to_string();
        assert!(err.contains("Secret ns/t-auth does not exist"), "{err}");
        let t = tier();
        let asking = tokio::spawn(async move { credentials(&client, &t).await });
        answer_secret(&mut handle, 200, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t-auth"}, "data": {"password": "czNjcmV0"}})).await;
        let err = bounded(asking).await.unwrap_err().to_string();
        assert!(err.contains("has no key \"user\""), "{err}");
    }
}
