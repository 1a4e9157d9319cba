//! HTTP/1.1 connections of their own for upgrades (WebSocket and the
//! like), on hyper's client.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{Instrument, Span, debug};

use crate::body::ProxyBody;

/// Sets up HTTP/1.1 over `io` for one upgrade request: the connection's
/// task (in `span`) hands the byte stream over to [`hyper::upgrade::on`]
/// once the response is `101 Switching Protocols`.
pub(crate) async fn handshake<I>(
    io: I,
    span: Span,
) -> Result<hyper::client::conn::http1::SendRequest<ProxyBody>, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(
        async move {
            if let Err(err) = conn.with_upgrades().await {
                debug!(%err, "upgraded connection ended");
            }
        }
        .instrument(span),
    );
    Ok(send)
}
