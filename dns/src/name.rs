//! Names as index keys.
//!
//! The answer index is keyed by the lower-cased, uncompressed wire form of a
//! name (length-prefixed labels, ending with the root's zero byte). That form
//! can be produced from a hickory [`Name`] and, without any allocation, from
//! the raw bytes of a question, so every path that answers a query can look
//! up the same index with one hash.

use hickory_proto::rr::Name;

/// Longest name on the wire (RFC 1035 §3.1).
pub(crate) const MAX_NAME_LEN: usize = 255;

/// A name's key: lower-case wire form, no compression.
pub(crate) type NameKey = Box<[u8]>;

/// A stack buffer holding one key, so a lookup allocates nothing.
#[derive(Clone)]
pub(crate) struct KeyBuf {
    buf: [u8; MAX_NAME_LEN],
    len: usize,
}

impl KeyBuf {
    /// The key of `name`, or `None` if it would exceed 255 bytes (a decoded
    /// name never does; this guards names built by hand).
    pub(crate) fn from_name(name: &Name) -> Option<Self> {
        let mut key = Self {
            buf: [0; MAX_NAME_LEN],
            len: 0,
        };
        for label in name.iter() {
            let len = u8::try_from(label.len()).ok()?;
            if key.len + 1 + label.len() >= MAX_NAME_LEN {
                return None;
            }
            key.buf[key.len] = len;
            key.len += 1;
            for (dst, src) in key.buf[key.len..key.len + label.len()]
                .iter_mut()
                .zip(label)
            {
                *dst = src.to_ascii_lowercase();
            }
            key.len += label.len();
        }
        key.buf[key.len] = 0;
        key.len += 1;
        Some(key)
    }

    /// The key bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Hashes index keys. SipHash, the standard map's default, resists keys
/// chosen to collide; the index's keys come from the catalog (registered by
/// token holders), never from queries, which only look up. A multiply-xor
/// hash over 8-byte words (as rustc's FxHash) costs a fraction of SipHash on
/// the 10 to 40-byte names of every query.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xF135_7AEA_2E62_A9C5;
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(26) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        // Fold the high bits, which the multiplication mixes best, into
        // the low ones the table uses.
        self.0 ^ (self.0 >> 29)
    }
}

/// A map keyed by names.
pub(crate) type KeyMap<V> =
    std::collections::HashMap<Box<[u8]>, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// The key of `name` as an owned value (for building the index).
pub(crate) fn key_of(name: &Name) -> NameKey {
    match KeyBuf::from_name(name) {
        Some(k) => k.as_bytes().into(),
        // Names in the index are built from validated labels under a zone
        // that was itself parsed; an over-long one cannot be queried anyway.
        None => Box::from(&[][..]),
    }
}

/// Whether `key` is `zone` or below it, checked on label boundaries (a byte
/// suffix match alone could be fooled by label contents).
pub(crate) fn is_at_or_below(key: &[u8], zone: &[u8]) -> bool {
    let mut at = 0;
    while at < key.len() {
        if key[at..] == *zone {
            return true;
        }
        let len = usize::from(key[at]);
        if len == 0 {
            return false;
        }
        at += 1 + len;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn keys_ignore_case_and_trailing_dot() {
        let a = KeyBuf::from_name(&name("User.XingRen.HOST.")).unwrap();
        let b = KeyBuf::from_name(&name("user.xingren.host")).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_eq!(a.as_bytes(), b"\x04user\x07xingren\x04host\x00");
        assert_eq!(
            KeyBuf::from_name(&Name::root()).unwrap().as_bytes(),
            b"\x00"
        );
    }

    #[test]
    fn zone_membership_is_label_aligned() {
        let zone = key_of(&name("xingren.host."));
        let k = |s: &str| key_of(&name(s));
        assert!(is_at_or_below(&k("xingren.host."), &zone));
        assert!(is_at_or_below(&k("a.b.XINGREN.host."), &zone));
        assert!(!is_at_or_below(&k("xxingren.host."), &zone));
        assert!(!is_at_or_below(&k("host."), &zone));
        assert!(!is_at_or_below(&k("."), &zone));
        // A label whose bytes look like the zone's wire form is not the zone.
        let tricky = Name::from_labels(vec![&b"a\x07xingren\x04host"[..]]).unwrap();
        assert!(!is_at_or_below(&key_of(&tricky), &zone));
    }
}
