//! The accept loop: every connection is served by hyper with a header read timeout, and at
//! most `max_connections` are open at once, so idle or half-sent connections (a slowloris
//! client, 300 half-open sockets) cannot exhaust file descriptors or hold the server; past the
//! limit a new connection gets a short 503 and is closed. Body read timeouts are the handlers'
//! (see `read_body`), because only they know a body is expected.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once; later ones are answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the server starts
    /// waiting for them (a new connection, or the next request on a kept-alive one).
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve_connections(listener: TcpListener, router: Router, limits: ConnLimits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut warned = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors (EMFILE) and the like: wait for connections to
                // close instead of spinning or giving up.
                if !warned {
                    eprintln!("afinar: cannot accept a connection ({e}); retrying");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Answers a connection past the limit with 503 and closes it (within a second).
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = format!(
        r#"{{"error":{{"message":"the server has {limit} connections open (--max-connections); retry later","type":"server_error","param":null,"code":"too_many_connections"}}}}"#
    );
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
}
