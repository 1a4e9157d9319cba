//! A peer sidecar's HTTP/2 connection, served on the `h2` crate inside the
//! connection's own task (see [`super`] for why not hyper's server).
//!
//! The connection and all its streams are one future, polled by one task:
//! a [`FuturesUnordered`] holds the streams in progress, and one pass
//! first lets every stream that can make progress do so (their answers go
//! into the connection's buffers), then lets the connection read what came
//! in and write everything queued at once. The trade-off: a connection's
//! streams never run on two worker threads at once, and a handler that
//! holds the thread holds every stream of its connection; the handlers
//! here only wait on I/O.

use std::future::Future;
use std::task::Poll;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::http2;
use crate::body::ProxyBody;
use crate::inbound::HANDSHAKE_TIMEOUT;
use crate::serve::Closing;
use crate::wake::OnWake;

/// Serves the HTTP/2 connection on `io`, answering each stream with
/// `handle`, until the peer closes it, it fails, its keep-alive goes
/// unanswered, or `closing` asks for a graceful close (GOAWAY: streams in
/// flight finish, new ones go elsewhere).
pub(crate) async fn serve<I, H, F>(io: I, closing: Closing, handle: H)
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<ProxyBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let handshake = http2::server_builder().handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            debug!(%err, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            debug!("no HTTP/2 preface in time");
            return;
        }
    };
    // Both polled only when they fire, not at every pass.
    let keepalive = OnWake::new(http2::keepalive(conn.ping_pong()));
    tokio::pin!(keepalive);
    let close_requested = OnWake::new(closing.requested());
    tokio::pin!(close_requested);
    let mut goaway_sent = false;
    let mut streams = FuturesUnordered::new();
    // One pass: every answer the app finished goes into the connection's
    // buffers first, then the connection reads what came in and writes
    // everything queued at once. `Batched` lets the app connections that
    // are ready finish before the pass.
    let served = std::future::poll_fn(|cx| {
        loop {
            while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            if !goaway_sent && close_requested.as_mut().poll(cx).is_ready() {
                // GOAWAY: the peer opens no new streams here and moves to
                // other endpoints; the ones in flight finish.
                conn.graceful_shutdown();
                goaway_sent = true;
            }
            if let Poll::Ready(err) = keepalive.as_mut().poll(cx) {
                debug!(%err, "closing the connection");
                return Poll::Ready(());
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    // Boxed before the push, which moves what it is given
                    // several times: a pointer is cheaper to move than
                    // the stream's future.
                    streams.push(Box::pin(serve_stream(req, respond, &handle)));
                }
                Poll::Ready(Some(Err(err))) => {
                    debug!(%err, "HTTP/2 connection failed");
                    return Poll::Ready(());
                }
                // Closed, and every stream answered.
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    http2::Batched::new(served).await;
    // The connection is gone: answers still pending cannot be sent.
    // Dropping it fails their streams, and dropping them cancels their
    // requests to the app.
    drop(conn);
    drop(streams);
}

/// Serves one stream: its request to `handle`, the answer back, unless the
/// caller resets the stream first.
async fn serve_stream<H, F>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    handle: &H,
) where
    H: Fn(Request<ProxyBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let (parts, recv) = req.into_parts();
    let body = http2::boxed(recv, &parts.headers);
    let handled = handle(Request::from_parts(parts, body));
    tokio::pin!(handled);
    // A caller that gives up resets the stream: stop waiting for the app.
    let rsp = tokio::select! {
        rsp = &mut handled => rsp,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!("the caller reset the request");
            return;
        }
    };
    let (parts, body) = rsp.into_parts();
    let end = body.is_end_stream();
    let mut send = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) => send,
        Err(err) => {
            debug!(%err, "response not sent");
            return;
        }
    };
    if !end && let Err(err) = http2::send_body(body, &mut send).await {
        debug!(%err, "response body not sent whole");
    }
}
