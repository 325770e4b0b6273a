//! kube's mock API server for the controller's tests (the ApiServerVerifier
//! pattern): a client whose every request the test reads and answers.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::Value;
use tower_test::mock::SendResponse;

/// The test's side of the mock API server.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client talking to the mock, and the mock's handle.
pub fn client() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// The next request (method, path with query, JSON body or null), within 5 s.
pub async fn next(handle: &mut Handle) -> (String, String, Value, SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("no further request came")
        .expect("the client went away");
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (method, uri, body, send)
}

/// Answers a request with `status` and a JSON body.
pub fn respond(send: SendResponse<Response<Body>>, status: u16, body: &Value) {
    let response = Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()));
    send.send_response(response.expect("a valid response"));
}

/// A spawned call's result, or a failure after 10 s (a request the test did
/// not answer would otherwise hang the test for ever).
pub async fn bounded<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the call did not finish: a request went unanswered?")
        .expect("the call panicked")
}
