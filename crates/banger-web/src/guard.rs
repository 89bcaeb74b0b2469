//! The checks every request goes through before its handler, and the
//! headers every response carries.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use banger_wire::OpId;
use tracing::warn;

use crate::api::{App, error_response};

/// Scripts only from this server. Styles may also be inline: xterm.js's DOM
/// renderer themes the terminal (its colours, its cell sizes) through
/// `<style>` elements it creates at run time, and offers no nonce. The page
/// never turns guest text into markup (text only, through `textContent`),
/// so no one else's `<style>` can get in to use this.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'";

pub(crate) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn is_upgrade(h: &HeaderMap) -> bool {
    header_str(h, header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Host, Origin and session checks; security headers on every answer.
pub(crate) async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut resp = match refusal(&app, &req) {
        Some(r) => r,
        None => next.run(req).await,
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn refusal(app: &App, req: &Request) -> Option<Response> {
    let access = &app.backend.access;
    let h = req.headers();
    let path = req.uri().path();
    let refuse = |status: StatusCode, code: &str, message: String| {
        let op_id = OpId::mint();
        warn!(%op_id, path, %status, "web request refused: {message}");
        error_response(status, code, &message, &op_id)
    };
    let host = header_str(h, header::HOST);
    if !access.host_ok(host) {
        return Some(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "permission_denied",
            format!(
                "Host {:?} is not this server's address (it answers only to {} and localhost:{})",
                host.unwrap_or(""),
                access.bound().map(|a| a.to_string()).unwrap_or_default(),
                access.bound().map(|a| a.port()).unwrap_or_default(),
            ),
        ));
    }
    let changes_state = !matches!(*req.method(), Method::GET | Method::HEAD) || is_upgrade(h);
    if changes_state && !access.origin_ok(header_str(h, header::ORIGIN)) {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "permission_denied",
            format!(
                "Origin {:?} may not {} here: only pages this server served may",
                header_str(h, header::ORIGIN).unwrap_or("(none)"),
                if is_upgrade(h) {
                    "open a WebSocket"
                } else {
                    "change state"
                },
            ),
        ));
    }
    if path == "/login" || access.cookie_ok(header_str(h, header::COOKIE)) {
        return None;
    }
    if path.starts_with("/api/") {
        return Some(refuse(
            StatusCode::UNAUTHORIZED,
            "permission_denied",
            "not logged in: run `banger web` and open the URL it prints".into(),
        ));
    }
    Some(unauthorized_page())
}

pub(crate) fn unauthorized_page() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>banger: log in</title></head>\
             <body><p>Not logged in: run <code>banger web</code> and open the URL it prints.</p></body></html>",
        ),
    )
        .into_response()
}
