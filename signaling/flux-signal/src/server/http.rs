//! HTTP side: one request per TCP connection, the WebSocket upgrade and plain routes.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use flux_signal_proto::{ErrorCode, WS_PATH};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::debug;

use super::metrics::Gauges;
use super::state::Shared;
use super::{conn, relay};

/// Every response body: whole (pages, JSON) or a relay pipe.
pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves the HTTP side of one connection: a WebSocket upgrade, or one plain request
/// answered with `Connection: close`. The caller bounds the time it may take.
pub(crate) async fn serve<IO>(
    io: IO,
    peer: SocketAddr,
    shared: Arc<Shared>,
    long_lived: Arc<std::sync::atomic::AtomicBool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let long_lived = long_lived.clone();
        async move { Ok::<_, Infallible>(route(req, peer, &shared, &long_lived).await) }
    });
    let result = http1::Builder::new()
        // Keep-alive must stay on: with it off hyper rewrites `Connection: Upgrade` on the
        // 101 to `close`. Plain responses carry `Connection: close` instead.
        .keep_alive(true)
        // Request heads above 16 KiB get 431; hyper's minimum buffer is 8 KiB.
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(error) = result {
        debug!(%peer, %error, "HTTP connection ended with an error");
    }
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    long_lived: &std::sync::atomic::AtomicBool,
) -> Response<Body> {
    if shared.relays.config.enabled && relay::is_relay_path(req.uri().path()) {
        let ip = client_ip(
            req.headers(),
            peer,
            shared.config.is_trusted_proxy(peer.ip()),
        );
        return relay::route(req, ip, shared, long_lived).await;
    }
    match (req.method(), req.uri().path()) {
        // A fleet instance that cannot reach Redis reports unhealthy so that the load
        // balancer sends new clients elsewhere; its open connections go on.
        (&Method::GET, "/healthz") if !shared.store_healthy() => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "redis unreachable\n".into(),
        ),
        (&Method::GET, "/healthz") => {
            text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into())
        }
        (&Method::GET, "/metrics") => {
            let gauges = Gauges {
                ws_connections: shared.ws_connections(),
                pending_handshakes: shared.pending_handshakes(),
                sessions: shared.live_sessions(),
                relays: shared.relays.live(),
                relay_streams: shared.relays.streams(),
            };
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.render(&gauges, &shared.relays.metrics),
            )
        }
        (_, WS_PATH) => upgrade(req, peer, shared).await,
        _ => refuse(
            shared,
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such path",
        ),
    }
}

/// Validates an RFC 6455 §4.2.1 opening handshake, applies the connect limits, answers
/// 101 and hands the upgraded stream to a connection task.
async fn upgrade(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket");
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| is_upgrade)
    else {
        return refuse(
            shared,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "expected a WebSocket upgrade",
        );
    };
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut resp = refuse(
            shared,
            StatusCode::UPGRADE_REQUIRED,
            ErrorCode::BadRequest,
            "WebSocket version 13 required",
        );
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let accept = derive_accept_key(key.as_bytes());
    let ip = client_ip(headers, peer, shared.config.is_trusted_proxy(peer.ip()));

    if *shared.shutdown.borrow() {
        return refuse(
            shared,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServerShutdown,
            "shutting down",
        );
    }
    if !shared.allow_connect(ip).await {
        debug!(%ip, "connect rate limited");
        let mut resp = refuse(
            shared,
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ConnectRateLimited,
            "too many connections from this address; slow down",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    let Some(slot) = shared.try_reserve_ws(ip) else {
        debug!(%ip, "connection cap reached");
        return refuse(
            shared,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::TooManyConnections,
            "server is full",
        );
    };

    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared = shared.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => conn::run(TokioIo::new(upgraded), ip, shared, slot).await,
            Err(error) => debug!(%ip, %error, "upgrade failed"),
        }
    });

    // No Sec-WebSocket-Extensions: permessage-deflate is never negotiated (compression
    // would let a small frame inflate to a large message, and we relay small JSON anyway).
    let mut resp = Response::new(Body::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The address per-IP limits are keyed on. From a trusted proxy, the rightmost
/// parseable `X-Forwarded-For` entry: the one the trusted proxy appended (entries to its
/// left are whatever the client claimed).
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_forwarded_for: bool) -> IpAddr {
    if trust_forwarded_for {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .next_back();
        if let Some(ip) = forwarded {
            return ip.to_canonical();
        }
    }
    peer.ip().to_canonical()
}

pub(crate) fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn refuse(shared: &Shared, status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    shared.metrics.reject(code);
    let body = serde_json::json!({ "error": { "code": code, "message": message } }).to_string();
    text(status, "application/json", body)
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // One plain request per connection: hyper closes after writing this response.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_uses_rightmost_entry_only_when_trusted() {
        let peer: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.9"),
        );
        assert_eq!(
            client_ip(&h, peer, false),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(&h, peer, true),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(
            client_ip(&h, peer, true),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn connection_header_tokens() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(header_has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!header_has_token(&h, header::CONNECTION, "close"));
    }
}
