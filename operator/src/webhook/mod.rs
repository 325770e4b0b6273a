//! The mutating admission webhook: HTTPS on the operator, `POST /mutate-pods`
//! with an `AdmissionReview` of a Pod, answered with [`crate::inject`]'s
//! decision as a JSON patch.
//!
//! Every pod is admitted: an operator problem must never block pod creation
//! (the webhook configuration also says `failurePolicy: Ignore`). A pod that
//! asked for a sidecar and does not get one is admitted with the reason in an
//! annotation and an admission warning.

pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use cachetier_crds::CacheTier;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::Value;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::cluster::error::Error;
use crate::inject::{Decision, SidecarTemplate, decide};

/// The path the webhook configuration points at.
pub const MUTATE_PATH: &str = "/mutate-pods";
/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 4 << 20;

/// Answers one AdmissionReview. `tier` looks a CacheTier up by namespace and name.
pub fn admit(
    review: AdmissionReview<Pod>,
    sidecar: &SidecarTemplate,
    tier: impl Fn(&str, &str) -> Option<Arc<CacheTier>>,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return AdmissionResponse::invalid("not an AdmissionReview with a request").into_review(),
    };
    let response = AdmissionResponse::from(&request);
    let Some(pod) = &request.object else {
        return response.into_review();
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let (ops, warning) = match decide(pod, &namespace, sidecar, tier) {
        Decision::Patch(ops) => (ops, None),
        Decision::Skip { reason, annotate } => {
            let warning = (!annotate.is_empty()).then(|| format!("cachetier: {reason}"));
            (annotate, warning)
        }
    };
    let mut response = if ops.is_empty() {
        response
    } else {
        match serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
            .map(|p| response.clone().with_patch(p))
        {
            Ok(Ok(with_patch)) => with_patch,
            // Our own patch does not serialize: admit unchanged, say so.
            _ => {
                let mut r = response;
                r.warnings = Some(vec![
                    "cachetier: internal error building the patch; pod admitted unchanged".into(),
                ]);
                r
            }
        }
    };
    if let Some(warning) = warning {
        response.warnings.get_or_insert_with(Vec::new).push(warning);
    }
    response.into_review()
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    req: Request<Incoming>,
    sidecar: &SidecarTemplate,
    tiers: &Store<CacheTier>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != MUTATE_PATH {
        return json_response(StatusCode::NOT_FOUND, b"{}".to_vec());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json_response(StatusCode::PAYLOAD_TOO_LARGE, b"{}".to_vec()),
    };
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let invalid =
                AdmissionResponse::invalid(format!("cannot parse the AdmissionReview: {e}")).into_review();
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::to_vec(&invalid).unwrap_or_default(),
            );
        }
    };
    let answer = admit(review, sidecar, |ns, name| {
        tiers.get(&ObjectRef::new(name).within(ns))
    });
    json_response(StatusCode::OK, serde_json::to_vec(&answer).unwrap_or_default())
}

/// Serves the webhook on `addr` with the certificates `certs` resolves, until
/// the returned future is dropped.
pub async fn serve(
    addr: SocketAddr,
    certs: Arc<tls::Certificates>,
    sidecar: SidecarTemplate,
    tiers: Store<CacheTier>,
) -> Result<impl Future<Output = ()>, Error> {
    let listener = TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("binding the webhook address {addr}"),
        source,
    })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(certs.server_config());
    info!(%addr, "webhook listening");
    let sidecar = Arc::new(sidecar);
    Ok(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (acceptor, sidecar, tiers) = (acceptor.clone(), sidecar.clone(), tiers.clone());
            tokio::spawn(async move {
                let stream = match acceptor.accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                };
                let svc = hyper::service::service_fn(move |req| {
                    let (sidecar, tiers) = (sidecar.clone(), tiers.clone());
                    async move { Ok::<_, Infallible>(handle(req, &sidecar, &tiers).await) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests;
