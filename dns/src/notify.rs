//! NOTIFY (RFC 1996): telling secondaries that the zone changed, so that
//! they transfer it at once rather than at their next SOA refresh.
//!
//! Changes are coalesced: the sender follows the latest serial only, waits
//! [`COALESCE`] after a change for the ones that come with it (a burst of
//! registrations is one NOTIFY), and while it is notifying, further changes
//! collapse into the next round. Each secondary gets [`ATTEMPTS`] tries,
//! [`REPLY_TIMEOUT`] apart, until it acknowledges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long after a change the NOTIFY waits for the changes that come
/// with it.
pub(crate) const COALESCE: Duration = Duration::from_millis(50);

/// How long to wait for a secondary's acknowledgement.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Tries per secondary and change (RFC 1996 §3.6 wants retries; a
/// secondary that stays silent refreshes on its own timer anyway).
const ATTEMPTS: usize = 3;

/// Notifies `targets` of every new serial of `zone` until `cancel` fires.
pub(crate) async fn run(
    zone: Name,
    targets: Vec<SocketAddr>,
    mut serials: watch::Receiver<u32>,
    cancel: CancellationToken,
) {
    // Once at start-up too: a restarted primary may have moved on while
    // it was down, and an up-to-date secondary only checks the SOA.
    loop {
        tokio::time::sleep(COALESCE).await;
        let serial = *serials.borrow_and_update();
        let sends = targets.iter().map(|&target| notify(&zone, target, serial));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = futures::future::join_all(sends) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = serials.changed() => if changed.is_err() { return },
        }
    }
}

/// Sends one NOTIFY for `serial` to `target`, retrying until acknowledged.
async fn notify(zone: &Name, target: SocketAddr, serial: u32) {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = match UdpSocket::bind(SocketAddr::new(any, 0)).await {
        Ok(socket) => socket,
        Err(error) => {
            tracing::warn!(%error, %target, "NOTIFY: cannot open a UDP socket");
            return;
        }
    };
    for attempt in 1..=ATTEMPTS {
        let id: u16 = rand::random();
        let mut msg = Message::new(id, MessageType::Query, OpCode::Notify);
        msg.metadata.authoritative = true;
        msg.add_query(Query::query(zone.clone(), RecordType::SOA));
        let Ok(bytes) = msg.to_vec() else { return };
        if let Err(error) = socket.send_to(&bytes, target).await {
            tracing::debug!(%error, %target, attempt, "NOTIFY: cannot send");
        } else if let Some(rcode) = reply(&socket, target, id).await {
            if rcode == ResponseCode::NoError {
                tracing::debug!(%target, serial, "NOTIFY acknowledged");
            } else {
                tracing::warn!(%target, serial, %rcode, "NOTIFY refused by the secondary");
            }
            return;
        }
    }
    tracing::warn!(%target, serial, "NOTIFY not acknowledged; the secondary will refresh on its own timer");
}

/// The response code of `target`'s reply to message `id`, or `None` if it
/// does not come within [`REPLY_TIMEOUT`].
async fn reply(socket: &UdpSocket, target: SocketAddr, id: u16) -> Option<ResponseCode> {
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.ok()?;
            if from != target {
                continue;
            }
            match Message::from_vec(&buf[..n]) {
                Ok(m)
                    if m.metadata.id == id && m.metadata.message_type == MessageType::Response =>
                {
                    return Some(m.metadata.response_code);
                }
                _ => continue,
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, wait)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake secondary: acknowledges NOTIFYs and reports their serials'
    /// arrival.
    #[tokio::test]
    async fn changes_are_notified_and_coalesced() {
        let secondary = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = secondary.local_addr().unwrap();
        let (tx, rx) = watch::channel(1u32);
        let cancel = CancellationToken::new();
        let zone = Name::from_ascii("xingren.host.").unwrap();
        let task = tokio::spawn(run(zone, vec![target], rx, cancel.clone()));

        let mut buf = [0u8; 512];
        let mut acknowledge = async |what: &str| {
            let (n, from) =
                tokio::time::timeout(Duration::from_secs(2), secondary.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("no NOTIFY: {what}"))
                    .unwrap();
            let msg = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(msg.metadata.op_code, OpCode::Notify);
            assert!(msg.metadata.authoritative);
            assert_eq!(msg.queries[0].query_type(), RecordType::SOA);
            assert_eq!(msg.queries[0].name().to_ascii(), "xingren.host.");
            let mut ack = Message::new(msg.metadata.id, MessageType::Response, OpCode::Notify);
            ack.add_query(msg.queries[0].clone());
            secondary
                .send_to(&ack.to_vec().unwrap(), from)
                .await
                .unwrap();
        };
        acknowledge("at start-up").await;
        // A burst of changes: one NOTIFY.
        for serial in 2..=6 {
            tx.send(serial).unwrap();
        }
        acknowledge("after the burst").await;
        let mut buf = [0u8; 512];
        let again =
            tokio::time::timeout(Duration::from_millis(400), secondary.recv_from(&mut buf)).await;
        assert!(
            again.is_err(),
            "acknowledged and coalesced: no second NOTIFY"
        );

        // Unacknowledged: retried.
        tx.send(7).unwrap();
        for _ in 0..2 {
            let got =
                tokio::time::timeout(Duration::from_secs(2), secondary.recv_from(&mut buf)).await;
            assert!(got.is_ok(), "NOTIFY sent again until acknowledged");
        }
        cancel.cancel();
        task.await.unwrap();
    }
}
