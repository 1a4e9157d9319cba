//! Telling replicas apart: the NSID option (RFC 5001) and the CHAOS-class
//! names `id.server`, `hostname.bind` (RFC 4892) and `version.bind`.
//!
//! Every replica answers the same zone the same way; when one misbehaves,
//! an operator needs to know which one answered. NSID rides on any query
//! whose OPT record asks for it; the CHAOS names are what `dig CH TXT
//! id.server` asks. The version is not told unless configured: it helps an
//! attacker more than a user.

use hickory_proto::op::{Edns, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption, NSIDPayload};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::response::Answer;

/// Size of an NSID option's code and length fields.
const OPTION_HEADER_LEN: usize = 4;

/// Longest NSID payload, as hickory allows.
const MAX_NSID_LEN: usize = 512;

/// What a replica tells about itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    /// The replica's id (`--nsid`): NSID payload and `id.server` TXT.
    pub(crate) nsid: Option<String>,
    /// `version.bind` TXT (`--version-string`); REFUSED when `None`.
    pub(crate) version: Option<String>,
}

impl Identity {
    /// Checks the settings: an id must fit an NSID option and a TXT string.
    pub(crate) fn new(nsid: Option<String>, version: Option<String>) -> Result<Self, String> {
        for (what, value) in [("nsid", &nsid), ("version_string", &version)] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > 255 || v.len() > MAX_NSID_LEN)
            {
                return Err(format!(
                    "{what} must be 1 to 255 bytes, got {} bytes",
                    v.len()
                ));
            }
        }
        Ok(Self { nsid, version })
    }

    /// Adds the NSID option to `edns` when the query's OPT asked for it
    /// (RFC 5001 §2.1: only then); returns the bytes it adds.
    pub(crate) fn add_nsid(&self, query: &Edns, edns: &mut Edns) -> usize {
        let Some(id) = &self.nsid else { return 0 };
        if query.options().get(EdnsCode::NSID).is_none() {
            return 0;
        }
        match NSIDPayload::new(id.as_bytes().to_vec()) {
            Ok(payload) => {
                edns.options_mut().insert(EdnsOption::NSID(payload));
                OPTION_HEADER_LEN + id.len()
            }
            Err(_) => 0,
        }
    }

    /// The answer to a CHAOS-class question: the id at `id.server` and
    /// `hostname.bind`, the version at `version.bind` and `version.server`
    /// when configured; REFUSED for anything else (as before: we serve no
    /// CHAOS zone).
    pub(crate) fn chaos(&self, qname: &Name, qtype: RecordType) -> Answer {
        let lower = qname.to_lowercase().to_ascii();
        let text = match lower.trim_end_matches('.') {
            "id.server" | "hostname.bind" => self.nsid.as_deref(),
            "version.bind" | "version.server" => self.version.as_deref(),
            _ => None,
        };
        let Some(text) = text else {
            return Answer::error(ResponseCode::Refused);
        };
        let records = if matches!(qtype, RecordType::TXT | RecordType::ANY) {
            let mut record = Record::from_rdata(
                qname.clone(),
                0,
                RData::TXT(TXT::new(vec![text.to_string()])),
            );
            record.dns_class = DNSClass::CH;
            vec![record]
        } else {
            Vec::new()
        };
        let mut answer = Answer::relayed(ResponseCode::NoError, records, Vec::new());
        answer.authoritative = true;
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(Identity::new(Some("dns-1".into()), None).is_ok());
        assert!(Identity::new(Some(String::new()), None).is_err());
        assert!(Identity::new(None, Some("x".repeat(256))).is_err());
    }

    #[test]
    fn chaos_names_answer_or_refuse() {
        let id = Identity::new(Some("dns-1".into()), None).unwrap();
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let a = id.chaos(&name("ID.Server."), RecordType::TXT);
        assert_eq!(a.rcode, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].dns_class, DNSClass::CH);
        assert_eq!(a.answers[0].data.to_string(), "dns-1");
        assert!(
            id.chaos(&name("hostname.bind."), RecordType::A)
                .answers
                .is_empty()
        );
        for refused in ["version.bind.", "authors.bind.", "user.xingren.host."] {
            assert_eq!(
                id.chaos(&name(refused), RecordType::TXT).rcode,
                ResponseCode::Refused,
                "{refused}"
            );
        }
        let versioned = Identity::new(None, Some("signpost 1".into())).unwrap();
        assert_eq!(
            versioned
                .chaos(&name("version.bind."), RecordType::TXT)
                .answers
                .len(),
            1
        );
        assert_eq!(
            versioned.chaos(&name("id.server."), RecordType::TXT).rcode,
            ResponseCode::Refused
        );
    }
}
