//! Swapping a holder's certificate under live configs and connections.

use super::*;
use crate::peer_identity;

#[tokio::test]
async fn rotation_keeps_established_connections_and_serves_the_new_certificate() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_certs = holder(&ca, &id("user"));
    let client_certs = holder(&ca, &id("order"));
    let server_cfg = server(&bundle, server_certs.clone(), ClientAuth::Required);
    let client_cfg = client(&bundle, id("user"), client_certs.clone());

    let old_server_serial = server_certs.current().serial().to_vec();
    let old_client_serial = client_certs.current().serial().to_vec();

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let mut old_server = outcome.server.unwrap();
    let mut old_client = outcome.client.unwrap();
    ping(&mut old_client, &mut old_server).await.unwrap();
    assert_eq!(peer_serial(old_client.get_ref().1), old_server_serial);

    // Renew both sides; the configs are not rebuilt.
    server_certs.replace(ca.issue(&id("user"), TTL).unwrap());
    client_certs.replace(ca.issue(&id("order"), TTL).unwrap());
    let new_server_serial = server_certs.current().serial().to_vec();
    let new_client_serial = client_certs.current().serial().to_vec();
    assert_ne!(new_server_serial, old_server_serial);
    assert_ne!(new_client_serial, old_client_serial);

    // The established connection carries on, still with the old certificates.
    ping(&mut old_client, &mut old_server).await.unwrap();
    assert_eq!(peer_serial(old_client.get_ref().1), old_server_serial);
    assert_eq!(peer_serial(old_server.get_ref().1), old_client_serial);

    // A new connection sees the new certificates on both sides.
    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let mut new_server = outcome.server.unwrap();
    let mut new_client = outcome.client.unwrap();
    assert_eq!(peer_serial(new_client.get_ref().1), new_server_serial);
    assert_eq!(peer_serial(new_server.get_ref().1), new_client_serial);
    assert_eq!(peer_identity(new_server.get_ref().1).unwrap(), id("order"));
    ping(&mut new_client, &mut new_server).await.unwrap();

    // And the old one still works after the new one was made.
    ping(&mut old_client, &mut old_server).await.unwrap();
}
