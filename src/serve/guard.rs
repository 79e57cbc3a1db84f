//! What a request must pass before a handler sees it, against web pages and hostile clients:
//! the `Host` check that stops DNS rebinding of a loopback server, CORS only for the origins
//! given with `--cors`, JSON as the only accepted request body type (a cross-origin
//! `text/plain` POST needs no preflight, so it must not be served), and the API key compared in
//! constant time.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::ApiError;

/// The request checks of one server.
#[derive(Debug, Clone)]
pub struct Guard {
    /// Host names (without port) the server answers to; `None` accepts any (not on loopback).
    pub hosts: Option<Vec<String>>,
    /// Origins allowed to call the API from a browser (`--cors`); `*` allows any.
    pub cors: Vec<String>,
}

impl Guard {
    /// The checks for a server bound to `bind` (the `--host` value) with these `--cors` origins.
    /// Bound to a loopback address or `localhost`, only local names are answered: a page on
    /// `evil.example` whose DNS later points at 127.0.0.1 sends `Host: evil.example`.
    pub fn new(bind: &str, cors: Vec<String>) -> Self {
        let bare = bind.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let hosts = loopback.then(|| {
            let mut h: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
                .map(String::from)
                .to_vec();
            let own = if bare.contains(':') {
                format!("[{bare}]")
            } else {
                bare.to_ascii_lowercase()
            };
            if !h.contains(&own) {
                h.push(own);
            }
            h
        });
        Self { hosts, cors }
    }

    /// Whether the `Host` header (if any) names this server.
    fn host_ok(&self, headers: &HeaderMap) -> Result<(), String> {
        let Some(hosts) = &self.hosts else {
            return Ok(());
        };
        let Some(value) = headers.get(header::HOST) else {
            return Ok(()); // HTTP/1.0 without Host: not a browser.
        };
        let host = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
        // Strip the port: `[::1]:8080` → `[::1]`, `localhost:8080` → `localhost`.
        let name = match host.rfind(':') {
            Some(i) if !host[i..].contains(']') => &host[..i],
            _ => host.as_str(),
        };
        let name = name.trim_end_matches('.');
        let local_ip = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        if local_ip || hosts.iter().any(|h| h == name) {
            Ok(())
        } else {
            Err(host)
        }
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, when it is allowed.
    fn allowed_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        let origin = origin?;
        let text = origin.to_str().ok()?;
        if self.cors.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        self.cors
            .iter()
            .any(|o| o.trim_end_matches('/').eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }
}

/// Whether a `Content-Type` value is JSON (`application/json`, any parameters, any case).
pub fn is_json(value: Option<&HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .is_some_and(|mime| mime.eq_ignore_ascii_case("application/json"))
}

/// The middleware: Host, then CORS preflight, then the body type; CORS headers are added to
/// the answer for allowed origins only.
pub async fn check(
    State(guard): State<std::sync::Arc<Guard>>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(host) = guard.host_ok(req.headers()) {
        return error(
            403,
            format!(
                "Host `{host}` is not this server: bound to loopback, afinar answers only to localhost, 127.0.0.1 and [::1] (protection against DNS rebinding); use those names, or --host to serve on another address"
            ),
            "forbidden_host",
        );
    }
    let allow = guard.allowed_origin(req.headers().get(header::ORIGIN));
    if req.method() == Method::OPTIONS {
        let Some(allow) = allow else {
            return error(
                403,
                "cross-origin requests are not allowed; start the server with --cors ORIGIN to allow a web page's origin".into(),
                "cors_forbidden",
            );
        };
        let mut resp = StatusCode::NO_CONTENT.into_response();
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return resp;
    }
    if req.method() == Method::POST && !is_json(req.headers().get(header::CONTENT_TYPE)) {
        let got = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map_or_else(|| "none".to_string(), |v| format!("`{v}`"));
        return error(
            415,
            format!(
                "the request body must be JSON: send `Content-Type: application/json` (got {got})"
            ),
            "unsupported_media_type",
        );
    }
    let mut resp = next.run(req).await;
    if let Some(allow) = allow {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

fn error(status: u16, message: String, code: &'static str) -> Response {
    ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
    }
    .into_response()
}

/// Whether `headers` carry `Authorization: Bearer KEY` (the scheme in any case) for `key`,
/// compared in time independent of where the first difference is.
pub fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return false;
    };
    let (scheme, given) = value.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer") && constant_time_eq(given.trim_ascii(), key.as_bytes())
}

/// Byte equality that reads every byte of both inputs (only the lengths leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn host_names_of_a_loopback_server() {
        let g = Guard::new("127.0.0.1", vec![]);
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:80",
            "127.0.0.2",
        ] {
            assert!(g.host_ok(&headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "evil.example",
            "10.0.0.1:8080",
            "localhost.evil.example",
        ] {
            assert!(g.host_ok(&headers(&[("host", bad)])).is_err(), "{bad}");
        }
        assert!(Guard::new("0.0.0.0", vec![]).hosts.is_none());
        assert!(Guard::new("::1", vec![]).hosts.is_some());
    }

    #[test]
    fn bearer_is_case_insensitive_and_exact() {
        for ok in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret "] {
            assert!(
                bearer_matches(&headers(&[("authorization", ok)]), "s3cret"),
                "{ok}"
            );
        }
        for bad in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Basic s3cret",
            "s3cret",
            "Bearer ",
        ] {
            assert!(
                !bearer_matches(&headers(&[("authorization", bad)]), "s3cret"),
                "{bad}"
            );
        }
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"abc", b"abc"));
    }

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "Application/JSON; charset=utf-8"] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }
}
