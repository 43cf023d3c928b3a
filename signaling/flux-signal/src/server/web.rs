//! The relay's web pages: plain HTML, CSS and JS embedded in the binary, no build step.
//!
//! `relay.js` holds everything that is not DOM (manifest, AES-GCM chunk decryption and
//! encryption, the streaming zip writer, the Service Worker download channel) so a local
//! GUI can reuse it; `app.js` draws the pages.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::http::{Body, full};

/// The page for unknown, used and expired links alike.
pub(crate) const GONE_PAGE: &str = include_str!("../../web/gone.html");

const ASSETS: [(&str, &str, &str); 6] = [
    (
        "/w/_/relay.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/relay.js"),
    ),
    (
        "/w/_/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "/w/_/style.css",
        "text/css; charset=utf-8",
        include_str!("../../web/style.css"),
    ),
    // At the top of /w/ so that its scope covers the download URLs it answers.
    (
        "/w/sw.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/sw.js"),
    ),
    (
        "/w/_/download.html",
        "text/html; charset=utf-8",
        include_str!("../../web/download.html"),
    ),
    (
        "/w/_/upload.html",
        "text/html; charset=utf-8",
        include_str!("../../web/upload.html"),
    ),
];

/// A static asset by path.
pub(crate) fn asset(path: &str) -> Option<Response<Body>> {
    let (_, kind, text) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    Some(respond(kind, text))
}

/// A page by file name (`download.html`, `upload.html`).
pub(crate) fn page(name: &str) -> Response<Body> {
    let path = format!("/w/_/{name}");
    asset(&path).unwrap_or_else(|| {
        let mut r = respond("text/html; charset=utf-8", GONE_PAGE);
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    })
}

fn respond(kind: &'static str, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(text));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    // Only our own scripts; connections back to this origin only.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-src 'self'; worker-src 'self'; base-uri 'none'; form-action 'none'",
        ),
    );
    resp
}
