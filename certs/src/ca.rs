//! The mesh root CA: creating, storing, loading, and signing workload CSRs.
//!
//! On disk a CA is a folder with two files: `ca.pem` (the root certificate,
//! public, may be followed by older roots still trusted during a rotation)
//! and `ca-key.pem` (the root's private key, mode 0600).

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::bundle::{TrustBundle, decode_certificates, encode_certificates};
use crate::error::CertError;
use crate::identity::Identity;
use crate::workload::{WorkloadCert, WorkloadKey};

/// File name of the root certificate inside a CA folder.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the root's private key inside a CA folder.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Lifetime of a new root: 10 years, because replacing a root means
/// distributing a new trust bundle to every workload, which should be rare.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Shortest workload certificate lifetime: below 10 s a certificate could
/// expire before the workload finishes its first handshake with it.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(10);
/// Longest workload certificate lifetime: 30 days. There is no revocation in
/// the mesh, so a short lifetime is what limits a leaked key's usefulness.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How far back a certificate's not-before is set, so a peer whose clock is
/// a little behind does not refuse a certificate issued "in its future".
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A certificate the CA signed for a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// PEM chain: the workload certificate first, then the issuing root.
    pub chain_pem: String,
    /// The certificate's not-after time, to whole seconds.
    pub expires: SystemTime,
}

/// The mesh root CA: signs workload certificates for identities.
pub struct Ca {
    /// The root certificate, DER.
    cert: CertificateDer<'static>,
    /// Name, key identifier and key of the root, for signing.
    issuer: Issuer<'static, KeyPair>,
    /// This root plus any older roots still trusted.
    bundle: TrustBundle,
}

impl fmt::Debug for Ca {
    // Hand-written so that the private key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("roots", &self.bundle.roots().len())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new root CA in `dir` (created if missing, mode 0700) and
    /// writes `ca.pem` and `ca-key.pem` (mode 0600).
    ///
    /// Refuses with [`CertError::AlreadyExists`], naming the file, when either
    /// file already exists: overwriting a root key would orphan every
    /// certificate it ever signed.
    pub fn init(dir: &Path) -> Result<Self, CertError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        // Checked up front so nothing is generated or written when refusing;
        // the create_new below still guards against a racing writer.
        for path in [&key_path, &cert_path] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(CertError::AlreadyExists { path: path.clone() });
            }
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CertError::io(dir, e))?;

        let (ca, key_pem) = Self::generate()?;
        write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        if let Err(err) = write_new(&cert_path, ca.cert_pem().as_bytes(), 0o644) {
            // Without its certificate the key is useless, and leaving it would
            // make the next `init` refuse; it is ours, created just above.
            if let Err(remove) = fs::remove_file(&key_path) {
                warn!(path = %key_path.display(), error = %remove, "cannot remove CA key after failed init");
            }
            return Err(err);
        }
        info!(dir = %dir.display(), "created mesh root CA");
        Ok(ca)
    }

    /// Loads the CA from `dir`.
    ///
    /// `ca.pem` holds the root first; any further certificates in it are
    /// older roots, kept in the trust bundle during a rotation.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let key_pem = read_existing(&key_path)?;
        let cert_pem = read_existing(&cert_path)?;
        warn_if_exposed(&key_path);

        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let certs = decode_certificates(&cert_pem, Some(&cert_path))?;
        let bad_cert = |reason: String| CertError::BadCertificate {
            path: Some(cert_path.clone()),
            reason,
        };
        let cert = certs
            .first()
            .cloned()
            .ok_or_else(|| bad_cert("no certificate".to_owned()))?;
        {
            let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| bad_cert(format!("cannot parse: {e}")))?;
            if !parsed.is_ca() {
                return Err(bad_cert("the first certificate is not a CA".to_owned()));
            }
            if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(CertError::KeyMismatch {
                    path: Some(cert_path.clone()),
                });
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| bad_cert(format!("cannot use as issuer: {e}")))?;
        let bundle = TrustBundle::new(certs)?;
        info!(dir = %dir.display(), roots = bundle.roots().len(), "loaded mesh root CA");
        Ok(Self {
            cert,
            issuer,
            bundle,
        })
    }

    /// Loads the CA from `dir` when it holds a key, otherwise creates one
    /// there, so `signpost server --ca-dir DIR` works on first start.
    pub fn load_or_init(dir: &Path) -> Result<Self, CertError> {
        if fs::symlink_metadata(dir.join(CA_KEY_FILE)).is_ok() {
            Self::load(dir)
        } else {
            Self::init(dir)
        }
    }

    /// A fresh CA that lives only in memory, for `--dev` and tests: nothing
    /// outlives the process, so certificates from a previous run are not
    /// trusted.
    pub fn generate_in_memory() -> Result<Self, CertError> {
        let (ca, _key_pem) = Self::generate()?;
        info!("created in-memory mesh root CA");
        Ok(ca)
    }

    /// The trust bundle workloads need to verify certificates from this CA.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> String {
        encode_certificates(std::slice::from_ref(&self.cert))
    }

    /// Signs a workload CSR for `identity`, valid from one minute ago (clock
    /// skew) for `ttl`.
    ///
    /// Only the CSR's public key is used: the identity always comes from the
    /// caller (who authenticated the requester), never from the CSR's
    /// subject or SANs, so a workload cannot ask for someone else's name.
    /// The CSR's self-signature is verified, proving the requester holds the
    /// private key.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<IssuedCert, CertError> {
        check_ttl(ttl)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            CertError::InvalidCsr {
                reason: e.to_string(),
            }
        })?;
        let now = SystemTime::now();
        self.sign_public_key(&csr.public_key, identity, now - CLOCK_SKEW, now + ttl)
    }

    /// Generates a key, signs a certificate for `identity` and pairs them,
    /// in-process: for `--dev` and tests, where there is no network between
    /// workload and CA.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CertError> {
        let key = WorkloadKey::generate()?;
        let issued = self.sign_csr(&key.csr_pem()?, identity, ttl)?;
        WorkloadCert::new(&key, &issued)
    }

    /// Signs `public_key` for `identity` with an explicit validity period.
    /// Separate from [`Ca::sign_csr`] so tests can make expired certificates.
    pub(crate) fn sign_public_key(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        let not_after = whole_seconds(not_after);
        let mut params = CertificateParams::default();
        params.not_before = whole_seconds(not_before);
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.service());
        params.distinguished_name = name;
        let ia5 = |s: String| Ia5String::try_from(s).map_err(CertError::Generate);
        params.subject_alt_names = vec![
            SanType::URI(ia5(identity.uri())?),
            SanType::DnsName(ia5(identity.dns_name())?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Both: every sidecar is a server for inbound and a client outbound.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;

        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(CertError::Generate)?;
        let expires = SystemTime::from(not_after);
        info!(
            identity = %identity,
            serial = %params.serial_number.as_ref().map(ToString::to_string).unwrap_or_default(),
            expires = %not_after,
            "signed workload certificate"
        );
        Ok(IssuedCert {
            chain_pem: encode_certificates(&[cert.der().clone(), self.cert.clone()]),
            expires,
        })
    }

    /// A new self-signed root and its key in PEM.
    fn generate() -> Result<(Self, String), CertError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.not_before = whole_seconds(now - CLOCK_SKEW);
        params.not_after = whole_seconds(now + CA_VALIDITY);
        params.serial_number = Some(random_serial());
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "Signpost");
        // Every root needs its own name: verifiers pick the issuer by name,
        // so a foreign root with the same name shows up as a bad signature
        // instead of an unknown CA. The creation time also tells an old root
        // from a new one while both sit in a bundle during a rotation.
        let created = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let tag: u32 = rand::random();
        name.push(
            DnType::CommonName,
            format!("Signpost mesh CA {created}-{tag:08x}"),
        );
        params.distinguished_name = name;
        // Path length 0: the root signs workloads directly, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(CertError::Generate)?;
        let key_pem = key.serialize_pem();
        let cert = cert.der().clone();
        let bundle = TrustBundle::new(vec![cert.clone()])?;
        let issuer = Issuer::new(params, key);
        Ok((
            Self {
                cert,
                issuer,
                bundle,
            },
            key_pem,
        ))
    }
}

/// Refuses lifetimes outside [`MIN_CERT_TTL`]..=[`MAX_CERT_TTL`].
fn check_ttl(ttl: Duration) -> Result<(), CertError> {
    if (MIN_CERT_TTL..=MAX_CERT_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(CertError::InvalidTtl {
            ttl,
            min: MIN_CERT_TTL,
            max: MAX_CERT_TTL,
        })
    }
}

/// X.509 times have whole seconds; truncating here makes
/// [`IssuedCert::expires`] equal to what the certificate says.
fn whole_seconds(t: SystemTime) -> OffsetDateTime {
    let t = OffsetDateTime::from(t);
    t - time::Duration::nanoseconds(i64::from(t.nanosecond()))
}

/// A random, positive 128-bit serial: serials must be unique per issuer
/// (RFC 5280), and rcgen's default (a hash of the public key) would repeat
/// when a workload renews with the same key.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the sign bit (serials are positive) and set the next one so the
    // DER length never shrinks.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Writes a file that must not exist yet, created with `mode` so it is
/// never readable by others, not even between create and chmod.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => CertError::AlreadyExists {
                path: path.to_path_buf(),
            },
            _ => CertError::io(path, e),
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| CertError::io(path, e))
}

/// Reads a CA file, telling "missing" apart from other I/O errors.
fn read_existing(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CertError::NotFound {
            path: PathBuf::from(path),
        },
        _ => CertError::io(path, e),
    })
}

/// Warns when the key file is readable by group or others; loading still
/// proceeds, as the operator may have reasons (e.g. a group-owned secret
/// mount), but it should be visible.
fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "CA private key is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn identity(service: &str) -> Identity {
        Identity::new(service, "xingren.host").unwrap()
    }

    fn leaf_of(issued: &IssuedCert) -> CertificateDer<'static> {
        decode_certificates(&issued.chain_pem, None).unwrap()[0].clone()
    }

    #[test]
    fn init_writes_key_with_mode_0600_and_load_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Ca::init(&ca_dir).unwrap();

        let key_mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&ca_dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let loaded = Ca::load(&ca_dir).unwrap();
        assert_eq!(loaded.trust_bundle(), ca.trust_bundle());
        assert_eq!(
            loaded.cert_pem(),
            fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap()
        );
        // A certificate from the loaded CA verifies against the original root.
        let cert = loaded
            .issue(&identity("user"), Duration::from_secs(60))
            .unwrap();
        let certified = cert.certified_key();
        let bundle = ca.trust_bundle();
        let (_, leaf) = x509_parser::parse_x509_certificate(&certified.cert[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&bundle.roots()[0]).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn init_refuses_an_existing_ca_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        Ca::init(dir.path()).unwrap();
        let key_before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();

        let err = Ca::init(dir.path()).unwrap_err();
        match &err {
            CertError::AlreadyExists { path } => assert_eq!(path, &dir.path().join(CA_KEY_FILE)),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), key_before);

        // A lone certificate is refused too: the key may have been moved away.
        let other = tempfile::tempdir().unwrap();
        fs::write(other.path().join(CA_CERT_FILE), "x").unwrap();
        assert!(matches!(
            Ca::init(other.path()),
            Err(CertError::AlreadyExists { path }) if path.ends_with(CA_CERT_FILE)
        ));
        assert!(!other.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn load_reports_missing_files_and_mismatched_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CertError::NotFound { .. })
        ));

        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Ca::init(a.path()).unwrap();
        Ca::init(b.path()).unwrap();
        fs::copy(b.path().join(CA_CERT_FILE), dir.path().join(CA_CERT_FILE)).unwrap();
        fs::copy(a.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CertError::KeyMismatch { .. })
        ));

        fs::write(dir.path().join(CA_KEY_FILE), "not a key").unwrap();
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CertError::BadKey { .. })
        ));
    }

    #[test]
    fn load_or_init_creates_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_init(dir.path()).unwrap();
        let second = Ca::load_or_init(dir.path()).unwrap();
        assert_eq!(first.trust_bundle(), second.trust_bundle());
    }

    #[test]
    fn sign_csr_takes_the_identity_from_the_caller_not_the_csr() {
        let ca = Ca::generate_in_memory().unwrap();
        // A CSR that asks for admin in another zone, by SAN and by CN.
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["admin.z".to_owned(), "evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            Ia5String::try_from("spiffe://z/svc/admin").unwrap(),
        ));
        params.distinguished_name.push(DnType::CommonName, "admin");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let before = SystemTime::now();
        let issued = ca
            .sign_csr(&csr, &identity("user"), Duration::from_secs(3600))
            .unwrap();
        let der = leaf_of(&issued);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();

        let mut uris = Vec::new();
        let mut dns = Vec::new();
        let mut ekus = None;
        let mut key_usage = None;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) => uris.push(u.to_string()),
                            GeneralName::DNSName(d) => dns.push(d.to_string()),
                            other => panic!("unexpected SAN {other:?}"),
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => ekus = Some(eku.clone()),
                ParsedExtension::KeyUsage(ku) => key_usage = Some(*ku),
                _ => {}
            }
        }
        assert_eq!(uris, ["spiffe://xingren.host/svc/user"]);
        assert_eq!(dns, ["user.xingren.host"]);
        let ekus = ekus.unwrap();
        assert!(ekus.server_auth && ekus.client_auth && !ekus.any);
        let key_usage = key_usage.unwrap();
        assert!(key_usage.digital_signature() && !key_usage.key_cert_sign());
        assert!(!cert.is_ca());
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(!cert.subject().to_string().contains("admin"));

        // not-before one minute back for skew; not-after = now + ttl.
        let not_before = SystemTime::from(cert.validity().not_before.to_datetime());
        let not_after = SystemTime::from(cert.validity().not_after.to_datetime());
        assert_eq!(not_after, issued.expires);
        let skew = before.duration_since(not_before).unwrap();
        assert!(
            skew >= Duration::from_secs(59) && skew <= Duration::from_secs(61),
            "{skew:?}"
        );
        let ttl = not_after.duration_since(before).unwrap();
        assert!(
            ttl >= Duration::from_secs(3599) && ttl <= Duration::from_secs(3601),
            "{ttl:?}"
        );

        // The chain carries the issuing root after the leaf.
        let chain = decode_certificates(&issued.chain_pem, None).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.trust_bundle().roots()[0]);
    }

    #[test]
    fn serials_differ_when_a_key_is_reused() {
        let ca = Ca::generate_in_memory().unwrap();
        let key = WorkloadKey::generate().unwrap();
        let csr = key.csr_pem().unwrap();
        let a = ca.sign_csr(&csr, &identity("user"), MIN_CERT_TTL).unwrap();
        let b = ca.sign_csr(&csr, &identity("user"), MIN_CERT_TTL).unwrap();
        let serial = |i: &IssuedCert| {
            let der = leaf_of(i);
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            c.raw_serial().to_vec()
        };
        assert_ne!(serial(&a), serial(&b));
    }

    #[test]
    fn malformed_csrs_are_refused_as_bad_requests() {
        let ca = Ca::generate_in_memory().unwrap();
        let id = identity("user");
        let ttl = Duration::from_secs(60);
        for bad in [
            "",
            "not pem at all",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = ca.sign_csr(bad, &id, ttl).unwrap_err();
            assert!(
                matches!(err, CertError::InvalidCsr { .. }),
                "{bad:?}: {err:?}"
            );
            assert!(err.is_bad_request());
        }

        // A certificate is not a CSR.
        assert!(matches!(
            ca.sign_csr(&ca.cert_pem(), &id, ttl),
            Err(CertError::InvalidCsr { .. })
        ));

        // A CSR whose self-signature does not verify: flip a bit in the
        // signature at the end of the DER.
        let csr = WorkloadKey::generate().unwrap().csr_pem().unwrap();
        let mut der = pem::parse(&csr).unwrap().into_contents();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(
            ca.sign_csr(&tampered, &id, ttl),
            Err(CertError::InvalidCsr { .. })
        ));
    }

    #[test]
    fn ttl_outside_the_allowed_range_is_refused() {
        let ca = Ca::generate_in_memory().unwrap();
        let csr = WorkloadKey::generate().unwrap().csr_pem().unwrap();
        let id = identity("user");
        for ttl in [
            Duration::ZERO,
            Duration::from_secs(9),
            MAX_CERT_TTL + Duration::from_secs(1),
        ] {
            let err = ca.sign_csr(&csr, &id, ttl).unwrap_err();
            assert!(matches!(err, CertError::InvalidTtl { .. }), "{ttl:?}");
            assert!(err.is_bad_request());
        }
        ca.sign_csr(&csr, &id, MIN_CERT_TTL).unwrap();
        ca.sign_csr(&csr, &id, MAX_CERT_TTL).unwrap();
    }

    #[test]
    fn the_root_is_a_long_lived_p256_ca() {
        let ca = Ca::generate_in_memory().unwrap();
        let bundle = ca.trust_bundle();
        let (_, root) = x509_parser::parse_x509_certificate(&bundle.roots()[0]).unwrap();
        assert!(root.is_ca());
        let lifetime =
            root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(lifetime >= CA_VALIDITY.as_secs() as i64);
        assert_eq!(
            root.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
    }
}
