//! Handshakes that succeed, and each way one is refused.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::server::danger::ClientCertVerifier;

use super::*;
use crate::{
    ClientIdentityVerifier, HandshakeFailure, ServerIdentityVerifier, VerifyError, classify_io,
    crypto_provider, peer_identity, rustls_error, verify_error,
};

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(&bundle, holder(&ca, &id("user")), ClientAuth::Required);
    let client_cfg = client(&bundle, id("user"), holder(&ca, &id("order")));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let mut server = outcome.server.unwrap();
    let mut client = outcome.client.unwrap();

    assert_eq!(peer_identity(server.get_ref().1).unwrap(), id("order"));
    assert_eq!(peer_identity(client.get_ref().1).unwrap(), id("user"));
    assert_eq!(client.get_ref().1.alpn_protocol(), Some(crate::ALPN_H2));
    assert_eq!(
        server.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    ping(&mut client, &mut server).await.unwrap();
}

#[tokio::test]
async fn alpn_list_is_configurable() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let opaque = b"signpost-tcp".to_vec();
    let mut alpn = default_alpn();
    alpn.push(opaque.clone());
    let server_cfg = server_config(
        &bundle,
        ZONE,
        holder(&ca, &id("db")),
        ClientAuth::Required,
        alpn,
    )
    .unwrap();
    let client_cfg = client_config(
        &bundle,
        id("db"),
        holder(&ca, &id("user")),
        vec![opaque.clone()],
    )
    .unwrap();

    let outcome = handshake(&server_cfg, &client_cfg, &id("db")).await;
    let client = outcome.client.unwrap();
    outcome.server.unwrap();
    assert_eq!(client.get_ref().1.alpn_protocol(), Some(opaque.as_slice()));
}

#[tokio::test]
async fn a_server_from_another_ca_is_refused_as_unknown_ca() {
    let ours = Ca::generate_in_memory().unwrap();
    let theirs = Ca::generate_in_memory().unwrap();
    let server_cfg = server(
        &theirs.trust_bundle(),
        holder(&theirs, &id("user")),
        ClientAuth::Required,
    );
    let client_cfg = client(
        &ours.trust_bundle(),
        id("user"),
        holder(&ours, &id("order")),
    );

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let client_err = outcome.client.unwrap_err();
    assert_eq!(classify_io(&client_err), HandshakeFailure::UnknownCa);
    assert_eq!(
        rustls_error(&client_err),
        Some(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        ))
    );
    // The server learns why from the alert.
    assert_eq!(
        classify_io(&outcome.server.unwrap_err()),
        HandshakeFailure::UnknownCa
    );
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused_as_unknown_ca() {
    let ours = Ca::generate_in_memory().unwrap();
    let theirs = Ca::generate_in_memory().unwrap();
    let server_cfg = server(
        &ours.trust_bundle(),
        holder(&ours, &id("user")),
        ClientAuth::Required,
    );
    // The client trusts our root but presents a certificate from theirs.
    let client_cfg = client(
        &ours.trust_bundle(),
        id("user"),
        holder(&theirs, &id("order")),
    );

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(classify_io(&server_err), HandshakeFailure::UnknownCa);
    let client_err = client_error_after_handshake(outcome.client).await;
    assert_eq!(classify_io(&client_err), HandshakeFailure::UnknownCa);
}

#[tokio::test]
async fn a_rotated_bundle_trusts_both_roots() {
    let old = Ca::generate_in_memory().unwrap();
    let new = Ca::generate_in_memory().unwrap();
    let mut bundle = old.trust_bundle();
    bundle.merge(&new.trust_bundle());
    let server_cfg = server(&bundle, holder(&new, &id("user")), ClientAuth::Required);
    let client_cfg = client(&bundle, id("user"), holder(&old, &id("order")));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let mut server = outcome.server.unwrap();
    let mut client = outcome.client.unwrap();
    ping(&mut client, &mut server).await.unwrap();
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_as_expired() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(
        &bundle,
        expired_holder(&ca, &id("user")),
        ClientAuth::Required,
    );
    let client_cfg = client(&bundle, id("user"), holder(&ca, &id("order")));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    assert_eq!(
        classify_io(&outcome.client.unwrap_err()),
        HandshakeFailure::Expired
    );
    assert_eq!(
        classify_io(&outcome.server.unwrap_err()),
        HandshakeFailure::Expired
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused_as_expired() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(&bundle, holder(&ca, &id("user")), ClientAuth::Required);
    let client_cfg = client(&bundle, id("user"), expired_holder(&ca, &id("order")));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(classify_io(&server_err), HandshakeFailure::Expired);
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_as_wrong_identity() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    // The client meant to reach `user`; `order` answered.
    let server_cfg = server(&bundle, holder(&ca, &id("order")), ClientAuth::Required);
    let client_cfg = client(&bundle, id("user"), holder(&ca, &id("web")));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let client_err = outcome.client.unwrap_err();
    assert_eq!(classify_io(&client_err), HandshakeFailure::WrongIdentity);
    let detail = rustls_error(&client_err).and_then(verify_error).unwrap();
    assert_eq!(
        detail,
        &VerifyError::WrongIdentity {
            expected: id("user"),
            presented: id("order"),
        }
    );
    // The generic alert tells the server nothing more specific.
    assert_eq!(
        classify_io(&outcome.server.unwrap_err()),
        HandshakeFailure::Other
    );
}

#[tokio::test]
async fn a_client_from_another_zone_is_refused_as_wrong_identity() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(&bundle, holder(&ca, &id("user")), ClientAuth::Required);
    let stranger = Identity::new("order", "elsewhere.example").unwrap();
    let client_cfg = client(&bundle, id("user"), holder(&ca, &stranger));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(classify_io(&server_err), HandshakeFailure::WrongIdentity);
    assert!(matches!(
        rustls_error(&server_err).and_then(verify_error),
        Some(VerifyError::WrongZone { presented, .. }) if presented == &stranger
    ));
}

/// A client config that verifies the server but presents no certificate.
fn anonymous_client(bundle: &TrustBundle, expected: Identity) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            ServerIdentityVerifier::new(bundle, expected).unwrap(),
        ))
        .with_no_client_auth();
    config.alpn_protocols = default_alpn();
    config
}

#[tokio::test]
async fn a_strict_server_refuses_a_client_without_a_certificate() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(&bundle, holder(&ca, &id("user")), ClientAuth::Required);
    let client_cfg = anonymous_client(&bundle, id("user"));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let server_err = outcome.server.unwrap_err();
    assert_eq!(classify_io(&server_err), HandshakeFailure::NoClientCert);
    let client_err = client_error_after_handshake(outcome.client).await;
    assert_eq!(classify_io(&client_err), HandshakeFailure::NoClientCert);
}

#[tokio::test]
async fn a_permissive_server_accepts_a_client_without_a_certificate() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let server_cfg = server(&bundle, holder(&ca, &id("user")), ClientAuth::Optional);
    let client_cfg = anonymous_client(&bundle, id("user"));

    let outcome = handshake(&server_cfg, &client_cfg, &id("user")).await;
    let mut server = outcome.server.unwrap();
    let mut client = outcome.client.unwrap();
    assert_eq!(
        peer_identity(server.get_ref().1),
        Err(VerifyError::NoPeerCertificate)
    );
    ping(&mut client, &mut server).await.unwrap();

    // A client that does present a certificate is still verified.
    let with_cert = client_config(
        &bundle,
        id("user"),
        holder(&ca, &id("order")),
        default_alpn(),
    )
    .unwrap();
    let outcome = handshake(&server_cfg, &with_cert, &id("user")).await;
    assert_eq!(
        peer_identity(outcome.server.unwrap().get_ref().1).unwrap(),
        id("order")
    );
    let other_ca = Ca::generate_in_memory().unwrap();
    let foreign = client_config(
        &bundle,
        id("user"),
        holder(&other_ca, &id("order")),
        default_alpn(),
    )
    .unwrap();
    let outcome = handshake(&server_cfg, &foreign, &id("user")).await;
    assert_eq!(
        classify_io(&outcome.server.unwrap_err()),
        HandshakeFailure::UnknownCa
    );
}

#[test]
fn client_auth_mandatory_follows_the_mode() {
    let ca = Ca::generate_in_memory().unwrap();
    let bundle = ca.trust_bundle();
    let strict = ClientIdentityVerifier::new(&bundle, ZONE, ClientAuth::Required).unwrap();
    let permissive = ClientIdentityVerifier::new(&bundle, ZONE, ClientAuth::Optional).unwrap();
    assert!(strict.offer_client_auth() && strict.client_auth_mandatory());
    assert!(permissive.offer_client_auth() && !permissive.client_auth_mandatory());
    assert!(ClientIdentityVerifier::new(&bundle, "bad zone", ClientAuth::Required).is_err());
}
