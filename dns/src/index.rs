//! The answer index: every record the zone can answer, built once per catalog
//! snapshot.
//!
//! A query is then two lookups of its lower-cased name — the service under
//! the zone's apex (by a hash of its label), then the name among the
//! service's (a binary search of the few it has) — a pick of the record set
//! for its type, a weighted shuffle, and the records written from their
//! data ([`crate::wire`]). Each service's names
//! are built apart and shared from one index to the next while the service
//! does not change, so that a registration costs a rebuild of its service
//! and of the zone's few shared names, not of every service. The index also
//! holds every name that exists without records of its own (empty
//! non-terminals such as `tag.<svc>.Z` or `_tcp.<svc>.Z`), so that a miss
//! can tell NODATA (the name exists) from NXDOMAIN (RFC 8020: nothing exists
//! below it either).
//!
//! What is in the zone `Z` (see ../shared/CONTRACT.md):
//!
//! | name | records |
//! |---|---|
//! | `Z` | SOA, NS (`ns.Z`, with glue when the server's address is known) |
//! | `ns.Z` | A or AAAA of the server, when configured |
//! | `_services._dns-sd._udp.Z` | PTR to every service type `_<svc>._tcp.Z` |
//! | `b._dns-sd._udp.Z`, `lb._dns-sd._udp.Z` | PTR to `Z` (DNS-SD browsing domains) |
//! | `_<svc>._tcp.Z` | PTR to `<id>._<svc>._tcp.Z` per healthy instance |
//! | `<id>._<svc>._tcp.Z` | SRV (to `<id>.<svc>.Z`) and TXT (metadata) of that healthy instance |
//! | `<svc>.Z` | A, AAAA, SRV of healthy instances |
//! | `_<port>._<tcp,udp>.<svc>.Z` | SRV of healthy instances with that named port |
//! | `<id>.<svc>.Z` | A or AAAA, TXT (metadata) of that instance, healthy or not |
//! | `<tag>.tag.<svc>.Z` | A, AAAA, SRV of healthy instances with that tag |
//!
//! Reverse names (`in-addr.arpa`, `ip6.arpa`) of every instance address hold
//! PTR records to `<id>.<svc>.Z`; they are outside `Z`, so any other type at
//! them, and any other reverse name, is left to forwarding.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, NameEncoding,
};
use imbl::ordmap::DiffItem;
use signpost_control_plane::catalog::{InstanceEntry, ServiceEntry, Snapshot};
use signpost_control_plane::model::{ServiceName, Text};
use signpost_control_plane::store::Revision;
use smallvec::SmallVec;
use triomphe::ThinArc;

use crate::name::{KeyMap, NameKey, is_at_or_below, key_of};
use crate::wire::{self, Chunk, Owner, WireRecord};

/// SRV priority of every instance: one tier, weights decide (CONTRACT.md).
pub(crate) const SRV_PRIORITY: u16 = 10;

/// SOA timers. There are no secondary servers to refresh from us (every
/// replica reads etcd), so these only matter to tools that read them; they
/// are the usual RIPE-203 values.
const SOA_REFRESH: i32 = 3600;
const SOA_RETRY: i32 = 600;
const SOA_EXPIRE: i32 = 86400;

/// What the index needs to know about the zone, fixed for a server's life.
#[derive(Debug, Clone)]
pub(crate) struct ZoneConfig {
    /// The apex, lower-case, fully qualified.
    pub(crate) origin: Name,
    /// TTL of positive answers.
    pub(crate) ttl: Duration,
    /// SOA minimum, the TTL of negative answers (RFC 2308 §5).
    pub(crate) negative_ttl: Duration,
    /// The server's own address, published as `ns.Z`.
    pub(crate) ns_address: Option<IpAddr>,
}

/// One record of a set, with what travels with it.
///
/// Instance records are kept as their data only (an address, an SRV's port
/// and target, TXT bytes): the owner is the question's name and the TTL the
/// zone's, so both paths write them from this at answer time. That keeps
/// an instance at a few dozen bytes per name it appears at, instead of a
/// hickory [`Record`] and its pre-encoded bytes per name. The weight lives
/// in the data, where the variants have room for it, so that an item takes
/// 16 bytes.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// The record.
    pub(crate) data: Data,
}

// The layout the comment above promises, on 64-bit targets.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Item>() == 16);

impl Item {
    /// Its weight in the weighted shuffle (instance weight, summed for an
    /// address several instances share; 1 for records that are not
    /// instances).
    pub(crate) fn weight(&self) -> u32 {
        match &self.data {
            Data::A(_, weight) | Data::Aaaa(_, weight) => *weight,
            Data::Srv { weight, .. } => u32::from(*weight),
            Data::Txt(_) | Data::Ptr(_) | Data::Whole(_) => 1,
        }
    }
}

/// The data of one record.
#[derive(Debug, Clone)]
pub(crate) enum Data {
    /// An A record, and its weight.
    A(Ipv4Addr, u32),
    /// An AAAA record, and its weight (boxed: most addresses are IPv4, and
    /// this keeps every record of every set at 16 bytes).
    Aaaa(Box<Ipv6Addr>, u32),
    /// An SRV record (priority [`SRV_PRIORITY`]); its glue is the
    /// target's address.
    Srv {
        /// SRV weight, and the record's weight in the shuffle.
        weight: u16,
        /// Port.
        port: u16,
        /// Target, shared by every record that names the instance.
        target: Target,
    },
    /// A TXT record: the instance's metadata ([`Target::txt`]).
    Txt(Target),
    /// A PTR record, no glue.
    Ptr(Target),
    /// A record of the zone's own (SOA, NS and its glue), kept whole.
    Whole(Arc<Whole>),
}

/// A name records point at: an instance (SRV and reverse PTR targets) or a
/// service (the DNS-SD enumeration), with its address (an SRV's glue) and,
/// for an instance, its TXT RDATA. One allocation behind a thin pointer:
/// the index holds one per instance, shared by every record that names it.
#[derive(Debug, Clone)]
pub(crate) struct Target(ThinArc<TargetHead, u8>);

/// What a [`Target`] holds besides its bytes (the name, then the TXT).
#[derive(Debug)]
pub(crate) struct TargetHead {
    /// Its address, the glue of an SRV that targets it.
    address: IpAddr,
    /// Where the zone's labels start in the name, if it is in the zone: a
    /// PTR target is compressed to the zone there.
    zone_at: Option<u8>,
    /// The name's length in the bytes.
    name_len: u8,
}

impl Target {
    /// `name`, with `txt` as its TXT RDATA (empty for none).
    fn new(name: &Name, origin_key: &[u8], address: IpAddr, txt: &[u8]) -> Self {
        let name = key_of(name);
        let zone_at = name
            .len()
            .checked_sub(origin_key.len())
            .filter(|&at| name[at..] == *origin_key && crate::wire::on_label_boundary(&name, at))
            .and_then(|at| u8::try_from(at).ok());
        // A name key is at most 255 bytes (`KeyBuf`).
        let name_len = u8::try_from(name.len()).unwrap_or(u8::MAX);
        let head = TargetHead {
            address,
            zone_at,
            name_len,
        };
        let bytes = name[..usize::from(name_len)].iter().chain(txt).copied();
        Self(ThinArc::from_header_and_iter(
            head,
            bytes.collect::<Vec<u8>>().into_iter(),
        ))
    }

    fn head(&self) -> &TargetHead {
        &self.0.header.header
    }

    /// The name, lower-case wire form.
    pub(crate) fn name(&self) -> &[u8] {
        &self.0.slice[..usize::from(self.head().name_len)]
    }

    /// Where the zone's labels start in [`Target::name`], if it is in the
    /// zone.
    pub(crate) fn zone_at(&self) -> Option<u8> {
        self.head().zone_at
    }

    /// Its address.
    pub(crate) fn address(&self) -> IpAddr {
        self.head().address
    }

    /// The TXT RDATA (an instance's metadata, the character-strings as on
    /// the wire), empty if none.
    pub(crate) fn txt(&self) -> &[u8] {
        &self.0.slice[usize::from(self.head().name_len)..]
    }

    /// The name as hickory's.
    fn to_name(&self) -> Name {
        name_of_key(self.name())
    }
}

/// The hickory name of a key (a name in uncompressed wire form).
fn name_of_key(key: &[u8]) -> Name {
    // Keys are built from valid names, so this cannot fail; the root is a
    // harmless stand-in.
    Name::read(&mut BinDecoder::new(key)).unwrap_or_else(|_| Name::root())
}

/// A record kept whole, with its glue and pre-encoded form.
#[derive(Debug)]
pub(crate) struct Whole {
    /// The record, owner name lower-case.
    pub(crate) record: Record,
    /// Records for the additional section (the glue of an NS).
    pub(crate) glue: Vec<Record>,
    /// Upper bound of the encoded size of the record plus its glue.
    pub(crate) wire_len: usize,
    /// The record and its glue pre-encoded for the UDP fast path; `None`
    /// if they could not be, and then the hickory path answers.
    pub(crate) wire: Option<WireRecord>,
}

impl Data {
    /// Its record type.
    pub(crate) fn record_type(&self) -> RecordType {
        match self {
            Data::A(..) => RecordType::A,
            Data::Aaaa(..) => RecordType::AAAA,
            Data::Srv { .. } => RecordType::SRV,
            Data::Txt(_) => RecordType::TXT,
            Data::Ptr(_) => RecordType::PTR,
            Data::Whole(w) => w.record.record_type(),
        }
    }

    /// The record owned by `owner`, for the hickory path.
    pub(crate) fn record(&self, owner: &Name, ttl: u32) -> Record {
        let data = match self {
            Data::A(ip, _) => RData::A(A(*ip)),
            Data::Aaaa(ip, _) => RData::AAAA(AAAA(**ip)),
            Data::Srv {
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(SRV_PRIORITY, *weight, *port, target.to_name())),
            Data::Txt(target) => {
                RData::TXT(TXT::from_bytes(character_strings(target.txt()).collect()))
            }
            Data::Ptr(target) => RData::PTR(PTR(target.to_name())),
            Data::Whole(w) => {
                let mut record = w.record.clone();
                record.name = owner.clone();
                return record;
            }
        };
        Record::from_rdata(owner.clone(), ttl, data)
    }

    /// Its glue, for the hickory path.
    pub(crate) fn glue(&self, ttl: u32) -> Vec<Record> {
        match self {
            Data::Srv { target, .. } => vec![Record::from_rdata(
                target.to_name(),
                ttl,
                address_rdata(target.address()),
            )],
            Data::Whole(w) => w.glue.clone(),
            _ => Vec::new(),
        }
    }

    /// Upper bound of the encoded size of the record and its glue, names
    /// uncompressed, when its owner takes `owner_len` bytes.
    pub(crate) fn wire_len(&self, owner_len: usize) -> usize {
        let address_len = |ip: IpAddr| if ip.is_ipv4() { 4 } else { 16 };
        owner_len
            + 10
            + match self {
                Data::A(..) => 4,
                Data::Aaaa(..) => 16,
                Data::Srv { target, .. } => {
                    6 + target.name().len()
                        + target.name().len()
                        + 10
                        + address_len(target.address())
                }
                Data::Txt(target) => target.txt().len(),
                Data::Ptr(target) => target.name().len(),
                Data::Whole(w) => return w.wire_len,
            }
    }
}

/// The character-strings of TXT RDATA.
fn character_strings(rdata: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(*rdata.get(at)?);
        let s = rdata.get(at + 1..at + 1 + len)?;
        at += 1 + len;
        Some(s)
    })
}

/// TXT RDATA for an instance's metadata, one `key=value` string per entry
/// (RFC 6763 §6). A pair longer than a character-string (255 bytes) is
/// left out: DNS cannot carry it in one string, and split it would read as
/// two pairs; the API still has it.
fn meta_txt<'m>(meta: impl Iterator<Item = (&'m Text, &'m Text)>) -> Vec<u8> {
    let mut rdata = Vec::new();
    for (k, v) in meta {
        let Ok(len) = u8::try_from(k.len() + 1 + v.len()) else {
            continue;
        };
        rdata.push(len);
        rdata.extend_from_slice(k.as_bytes());
        rdata.push(b'=');
        rdata.extend_from_slice(v.as_bytes());
    }
    rdata
}

/// The records of one type at one name, as the index holds them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordSet<'a> {
    /// Their type.
    pub(crate) rtype: RecordType,
    /// The records.
    pub(crate) items: &'a [Item],
}

/// A set of a [`Names`], as it is packed: its type (`u16`), two spare
/// bytes, and where it ends among its names' items (`u32`; it starts where
/// the set before it ends), little-endian.
const SET_LEN: usize = 8;

/// A set of a [`Names`], packed.
fn set_bytes(rtype: RecordType, end: u32) -> [u8; SET_LEN] {
    let mut set = [0; SET_LEN];
    set[..2].copy_from_slice(&u16::from(rtype).to_le_bytes());
    set[4..].copy_from_slice(&end.to_le_bytes());
    set
}

/// The little-endian `u32` at `at` (0 past the end, which the packing
/// never reads).
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

/// One name of the index: its record sets, one per type; none for an
/// empty non-terminal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node<'a> {
    /// Its sets, packed ([`SET_LEN`] bytes each).
    sets: &'a [u8],
    /// The items of every name these sets are among.
    items: &'a [Item],
    /// Where the first set starts in `items`.
    start: u32,
}

impl<'a> Node<'a> {
    /// The set of `rtype`, if any.
    pub(crate) fn set(self, rtype: RecordType) -> Option<RecordSet<'a>> {
        let code = u16::from(rtype).to_le_bytes();
        let mut start = self.start as usize;
        for set in self.sets.chunks_exact(SET_LEN) {
            let end = u32_at(set, 4) as usize;
            if set[..2] == code {
                let items = self.items.get(start..end).unwrap_or_default();
                return Some(RecordSet { rtype, items });
            }
            start = end;
        }
        None
    }

    /// Its sets.
    pub(crate) fn sets(self) -> impl Iterator<Item = RecordSet<'a>> {
        let mut start = self.start as usize;
        self.sets.chunks_exact(SET_LEN).map(move |set| {
            let end = u32_at(set, 4) as usize;
            let items = self.items.get(start..end).unwrap_or_default();
            start = end;
            RecordSet {
                rtype: RecordType::from(u16::from_le_bytes([set[0], set[1]])),
                items,
            }
        })
    }
}

/// A name's sets while a [`Builder`] collects them.
type BuildNode = SmallVec<[(RecordType, Vec<Item>); 2]>;

/// How the index answers one name and type.
#[derive(Debug)]
pub(crate) enum Resolution<'a> {
    /// The name is ours: these sets (none means NODATA, RFC 2308 §2.2).
    Found {
        /// The sets to answer, in order.
        sets: Vec<RecordSet<'a>>,
    },
    /// The name is in the zone but does not exist.
    NxDomain,
    /// Not ours: forward it or refuse it.
    Outside,
}

/// How the index answers one name and one type other than ANY.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Single<'a> {
    /// The name is ours: this set, or none (NODATA).
    Found(Option<RecordSet<'a>>),
    /// The name is in the zone but does not exist.
    NxDomain,
    /// Not ours: forward it or refuse it.
    Outside,
}

/// The immutable index of one snapshot.
#[derive(Debug)]
pub(crate) struct Index {
    /// The zone's key.
    pub(crate) origin_key: NameKey,
    /// The snapshot revision (SOA serial).
    pub(crate) revision: Revision,
    /// When the snapshot was built (for the age metric).
    pub(crate) built: SystemTime,
    /// Whether the snapshot came from the store ([`Snapshot::is_loaded`]);
    /// until then, names in the zone are answered SERVFAIL.
    pub(crate) loaded: bool,
    /// SOA record, for the authority section of negative answers.
    pub(crate) soa: Record,
    /// TTL of every record but the SOA.
    pub(crate) ttl: u32,
    /// Upper bound of the SOA record's encoded size.
    pub(crate) soa_len: usize,
    /// The SOA pre-encoded for the authority section of negative answers.
    pub(crate) soa_wire: Option<Chunk>,
    /// The names of the zone that belong to no service: the apex, `ns.Z`
    /// and the DNS-SD names.
    zone_nodes: Names,
    /// Every service's names, by the service's label. Shared in structure
    /// with the previous index, like the maps below: a new index copies
    /// nothing of the services that did not change.
    pub(crate) services: Services,
    /// The catalog's services this index was built from, to tell what the
    /// next snapshot changed ([`imbl::OrdMap::diff`] skips what is shared).
    from: imbl::OrdMap<ServiceName, Arc<ServiceEntry>>,
    /// The key of `_services._dns-sd._udp.Z`.
    browse_key: Option<NameKey>,
    /// Its PTR records, one per service. Built on first use: a name whose
    /// answer holds every service, and which browsers ask for seldom, is
    /// not rebuilt on every registration.
    browse: OnceLock<([u8; SET_LEN], Box<[Item]>)>,
    /// Reverse names of instance addresses, kept up to date service by
    /// service.
    reverse: Reverse,
}

/// Reverse names of instance addresses, by address: each a PTR set (an
/// address may be shared by instances of several services). Keyed by the
/// address rather than the name, so that an entry allocates nothing of its
/// own; a query's name is read back into an address ([`reverse_address`]).
/// A B-tree, not a hash trie: the trie's nodes keep a slot for each of
/// 32 hash values, mostly empty near the leaves, which cost several times
/// the entries they held.
type Reverse = imbl::OrdMap<IpAddr, SmallVec<[Item; 1]>>;

/// The services of an index by name (the catalog's, shared: a service's
/// label costs the index nothing of its own).
///
/// A persistent B-tree keyed by a hash of the name: every query looks a
/// service up here, and comparing hashes stored in the node itself visits
/// a few cache lines per level, where comparing names would follow a
/// pointer per comparison. (A hash trie would need no comparisons, but its
/// nodes keep a slot for each of 32 hash values, mostly empty near the
/// leaves.) Names whose hashes collide share a bucket.
#[derive(Debug, Clone, Default)]
pub(crate) struct Services(imbl::OrdMap<u64, ServiceBucket>);

/// The services whose names hash alike: almost always one.
type ServiceBucket = SmallVec<[(ServiceName, Arc<ServicePart>); 1]>;

impl Services {
    fn hash(name: &[u8]) -> u64 {
        use std::hash::Hasher;
        let mut hasher = crate::name::KeyHasher::default();
        hasher.write(name);
        hasher.finish()
    }

    /// The part of the service named `name` (a label, lower-case).
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<ServicePart>> {
        self.get_bytes(name.as_bytes())
    }

    fn get_bytes(&self, name: &[u8]) -> Option<&Arc<ServicePart>> {
        self.0
            .get(&Self::hash(name))?
            .iter()
            .find(|(n, _)| n.as_str().as_bytes() == name)
            .map(|(_, part)| part)
    }

    /// Whether a service is named `name`.
    pub(crate) fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Sets the part of `name`, returning the one it replaces.
    fn insert(&mut self, name: ServiceName, part: Arc<ServicePart>) -> Option<Arc<ServicePart>> {
        let bucket = self
            .0
            .entry(Self::hash(name.as_str().as_bytes()))
            .or_default();
        match bucket.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) => Some(std::mem::replace(old, part)),
            None => {
                bucket.push((name, part));
                None
            }
        }
    }

    /// Removes the part of `name`, returning it.
    fn remove(&mut self, name: &ServiceName) -> Option<Arc<ServicePart>> {
        let hash = Self::hash(name.as_str().as_bytes());
        let bucket = self.0.get_mut(&hash)?;
        let at = bucket.iter().position(|(n, _)| n == name)?;
        let (_, part) = bucket.remove(at);
        if bucket.is_empty() {
            self.0.remove(&hash);
        }
        Some(part)
    }

    /// Whether there is none.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every service's part, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<ServicePart>> {
        self.0
            .values()
            .flat_map(|bucket| bucket.iter().map(|(_, part)| part))
    }
}

/// The names of one service (or of the zone's own), sorted by key. Each
/// is kept without the zone's labels, which every name shares. A service
/// has a few names with a few sets of a few records each, and a query
/// reads its names, one name's sets and one set's records: so the names,
/// the sets and the keys are packed in one buffer, which a lookup reads
/// from end to end, and the records in one more.
#[derive(Debug, Default)]
pub(crate) struct Names {
    /// For each name, where its prefix ends among the keys and where its
    /// sets end among the sets (two little-endian `u32`s); then the sets
    /// ([`SET_LEN`] bytes each); then the keys' prefixes (wire-form
    /// labels), in order, back to back.
    bytes: Box<[u8]>,
    /// The number of names.
    names: u32,
    /// The number of sets.
    sets: u32,
    /// Every set's records, in set order.
    items: Box<[Item]>,
}

/// A name of a [`Names`], packed: the ends of its key and of its sets.
const NAME_LEN: usize = 8;

/// A count or offset within one service's names, which are far below
/// 4 GiB of anything.
fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Names {
    /// From `(prefix, node)` pairs.
    fn new(mut nodes: Vec<(&[u8], BuildNode)>) -> Self {
        nodes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let set_count: usize = nodes.iter().map(|(_, n)| n.len()).sum();
        let key_len: usize = nodes.iter().map(|(k, _)| k.len()).sum();
        let mut names = Vec::with_capacity(nodes.len() * NAME_LEN + set_count * SET_LEN + key_len);
        let mut sets = Vec::with_capacity(set_count * SET_LEN);
        let mut keys = Vec::with_capacity(key_len);
        let mut items = Vec::with_capacity(
            nodes
                .iter()
                .flat_map(|(_, n)| n.iter().map(|(_, i)| i.len()))
                .sum(),
        );
        let count = nodes.len();
        for (prefix, node) in nodes {
            keys.extend_from_slice(prefix);
            for (rtype, set) in node {
                items.extend(set);
                sets.extend_from_slice(&set_bytes(rtype, offset(items.len())));
            }
            names.extend_from_slice(&offset(keys.len()).to_le_bytes());
            names.extend_from_slice(&offset(sets.len() / SET_LEN).to_le_bytes());
        }
        names.extend_from_slice(&sets);
        names.extend_from_slice(&keys);
        Self {
            bytes: names.into(),
            names: offset(count),
            sets: offset(sets.len() / SET_LEN),
            items: items.into(),
        }
    }

    /// Where the sets start in `bytes`.
    fn sets_at(&self) -> usize {
        self.names as usize * NAME_LEN
    }

    /// Where the keys start in `bytes`.
    fn keys_at(&self) -> usize {
        self.sets_at() + self.sets as usize * SET_LEN
    }

    /// The prefix of the `i`th name.
    fn prefix(&self, i: usize) -> &[u8] {
        let start = i
            .checked_sub(1)
            .map_or(0, |p| u32_at(&self.bytes, p * NAME_LEN) as usize);
        let end = u32_at(&self.bytes, i * NAME_LEN) as usize;
        let keys = self.keys_at();
        self.bytes.get(keys + start..keys + end).unwrap_or_default()
    }

    /// The `i`th name.
    fn node(&self, i: usize) -> Node<'_> {
        let first = i
            .checked_sub(1)
            .map_or(0, |p| u32_at(&self.bytes, p * NAME_LEN + 4) as usize);
        let end = u32_at(&self.bytes, i * NAME_LEN + 4) as usize;
        let at = self.sets_at();
        let sets = self
            .bytes
            .get(at + first * SET_LEN..at + end * SET_LEN)
            .unwrap_or_default();
        let start = first
            .checked_sub(1)
            .map_or(0, |p| u32_at(&self.bytes, at + p * SET_LEN + 4));
        Node {
            sets,
            items: &self.items,
            start,
        }
    }

    /// The node of the name whose key, without the zone's labels, is
    /// `prefix`.
    fn get(&self, prefix: &[u8]) -> Option<Node<'_>> {
        let (mut lo, mut hi) = (0, self.names as usize);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.prefix(mid).cmp(prefix) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.node(mid)),
            }
        }
        None
    }

    /// Every name, as (prefix, node), in prefix order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], Node<'_>)> {
        (0..self.names as usize).map(|i| (self.prefix(i), self.node(i)))
    }
}

/// The names at and below `<svc>.Z` of one service, kept from one index to
/// the next while the service does not change: a registration rebuilds its
/// own service, not the zone, so that the time from registration to answer
/// does not grow with the number of services.
#[derive(Debug)]
pub(crate) struct ServicePart {
    /// Its names.
    nodes: Names,
    /// Its record in the DNS-SD enumeration.
    browse: Option<Item>,
    /// The PTR records of its instances' reverse names, by address.
    reverse: Vec<(IpAddr, Item)>,
}

/// The service a reverse name's PTR record belongs to: the second label of
/// its target, `<id>.<svc>.Z`.
fn ptr_service(item: &Item) -> &[u8] {
    match &item.data {
        Data::Ptr(target) => {
            let name = target.name();
            let first = usize::from(name.first().copied().unwrap_or(0));
            let second = name.get(1 + first).map_or(0, |&l| usize::from(l));
            name.get(2 + first..2 + first + second).unwrap_or(&[])
        }
        _ => &[],
    }
}

/// The PTR set of a reverse name, in target order whatever order the
/// services came in.
fn reverse_set(mut items: Vec<Item>) -> SmallVec<[Item; 1]> {
    items.sort_by(|a, b| match (&a.data, &b.data) {
        (Data::Ptr(a), Data::Ptr(b)) => a.name().cmp(b.name()),
        _ => std::cmp::Ordering::Equal,
    });
    // Collected, not converted: a vector's buffer would be kept (with its
    // spare room) even for the one record that fits inline.
    items.into_iter().collect()
}

/// Moves service `label`'s reverse names from `old` (its part in the last
/// index) to `new` (its part now): only the reverse names of its own
/// addresses are touched.
fn update_reverse(
    reverse: &mut Reverse,
    label: &[u8],
    old: Option<&ServicePart>,
    new: Option<&ServicePart>,
) {
    let mut now: std::collections::BTreeMap<IpAddr, Vec<Item>> = Default::default();
    for (ip, item) in new.map_or(&[][..], |p| &p.reverse[..]) {
        now.entry(*ip).or_default().push(item.clone());
    }
    let gone = old
        .map_or(&[][..], |p| &p.reverse[..])
        .iter()
        .map(|(ip, _)| *ip)
        .filter(|ip| !now.contains_key(ip))
        .collect::<std::collections::BTreeSet<_>>();
    let others = |set: Option<&SmallVec<[Item; 1]>>| -> Vec<Item> {
        set.iter()
            .flat_map(|s| s.iter())
            .filter(|item| ptr_service(item) != label)
            .cloned()
            .collect()
    };
    for ip in gone {
        let rest = others(reverse.get(&ip));
        if rest.is_empty() {
            reverse.remove(&ip);
        } else {
            reverse.insert(ip, reverse_set(rest));
        }
    }
    for (ip, mut items) in now {
        items.extend(others(reverse.get(&ip)));
        reverse.insert(ip, reverse_set(items));
    }
}

/// The address whose reverse name has the key `key`: `d.c.b.a.in-addr.arpa.`
/// with decimal octets as [`Name::from`] writes them (no leading zeros), or
/// the 32 nibbles of `ip6.arpa.` (lower-case, as keys are). Any other form
/// is no reverse name of ours.
fn reverse_address(key: &[u8]) -> Option<IpAddr> {
    let mut labels: [&[u8]; 34] = [&[]; 34];
    let mut count = 0;
    let mut at = 0;
    loop {
        let len = usize::from(*key.get(at)?);
        if len == 0 {
            break;
        }
        *labels.get_mut(count)? = key.get(at + 1..at + 1 + len)?;
        count += 1;
        at += 1 + len;
    }
    let labels = &labels[..count];
    match labels {
        [d, c, b, a, in_addr, arpa] if *in_addr == b"in-addr" && *arpa == b"arpa" => {
            let octet = |label: &[u8]| -> Option<u8> {
                if label.is_empty() || label.len() > 3 || (label.len() > 1 && label[0] == b'0') {
                    return None;
                }
                std::str::from_utf8(label).ok()?.parse().ok()
            };
            Some(IpAddr::from([octet(a)?, octet(b)?, octet(c)?, octet(d)?]))
        }
        [nibbles @ .., ip6, arpa] if nibbles.len() == 32 && *ip6 == b"ip6" && *arpa == b"arpa" => {
            let mut octets = [0u8; 16];
            for (i, label) in nibbles.iter().rev().enumerate() {
                let [digit] = label else {
                    return None;
                };
                let value = match digit {
                    b'0'..=b'9' => digit - b'0',
                    b'a'..=b'f' => digit - b'a' + 10,
                    _ => return None,
                };
                octets[i / 2] |= if i % 2 == 0 { value << 4 } else { value };
            }
            Some(IpAddr::from(octets))
        }
        _ => None,
    }
}

/// Appends a record of `rtype` to the node of `name`, creating both as
/// needed, and the empty non-terminals between `name` and the apex.
struct Builder<'z> {
    zone: &'z ZoneConfig,
    origin_key: NameKey,
    nodes: KeyMap<BuildNode>,
    /// PTR records of reverse names (outside the zone), by address.
    reverse: Vec<(IpAddr, Item)>,
    ttl: u32,
}

impl Builder<'_> {
    fn new<'z>(zone: &'z ZoneConfig, origin_key: &NameKey) -> Builder<'z> {
        Builder {
            zone,
            origin_key: origin_key.clone(),
            nodes: KeyMap::default(),
            reverse: Vec::new(),
            ttl: secs(zone.ttl),
        }
    }

    /// The node of `name`, a name in the zone, and the empty non-terminals
    /// between it and the apex.
    fn node(&mut self, name: &Name) -> &mut BuildNode {
        let key = key_of(name);
        debug_assert!(is_at_or_below(&key, &self.origin_key));
        let mut parent = name.base_name();
        while parent.num_labels() > self.zone.origin.num_labels() {
            self.nodes.entry(key_of(&parent)).or_default();
            parent = parent.base_name();
        }
        self.nodes.entry(key).or_default()
    }

    /// Adds `data` at `name`, a name in the zone.
    fn add(&mut self, name: &Name, data: Data) {
        let rtype = data.record_type();
        let node = self.node(name);
        push_item(node, rtype, Item { data });
    }

    /// A record of the zone's own, kept whole.
    fn whole(&self, name: &Name, data: RData, glue: Vec<Record>) -> Item {
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        let wire_len = encoded_len(&record) + glue.iter().map(encoded_len).sum::<usize>();
        let wire = self.wire(&record, &glue);
        Item {
            data: Data::Whole(Arc::new(Whole {
                record,
                glue,
                wire_len,
                wire,
            })),
        }
    }

    /// Adds a record of the zone's own at `name`.
    fn add_whole(&mut self, name: &Name, data: RData, glue: Vec<Record>) {
        let item = self.whole(name, data, glue);
        let rtype = item.data.record_type();
        push_item(self.node(name), rtype, item);
    }

    /// `record` and its glue as the fast path writes them.
    fn wire(&self, record: &Record, glue: &[Record]) -> Option<WireRecord> {
        let chunk = wire::encode_record(record, Owner::Question, &self.origin_key)?;
        let glue = glue
            .iter()
            .map(|g| wire::encode_glue(g, record))
            .collect::<Option<_>>()?;
        Some(WireRecord { chunk, glue })
    }

    /// Makes `name` exist without records (NODATA rather than NXDOMAIN).
    fn touch(&mut self, name: &Name) {
        self.node(name);
    }

    /// The names built, their vectors trimmed: an index holds many small
    /// services for a long time.
    /// Every name built ends in `Z`, which the names are kept without.
    fn finish(mut self) -> (Names, Vec<(IpAddr, Item)>) {
        let suffix = self.origin_key.len();
        let mut nodes: Vec<(NameKey, BuildNode)> = self.nodes.into_iter().collect();
        let names = Names::new(
            nodes
                .iter_mut()
                .map(|(key, node)| {
                    let prefix = &key[..key.len().saturating_sub(suffix)];
                    (prefix, std::mem::take(node))
                })
                .collect(),
        );
        self.reverse.shrink_to_fit();
        (names, self.reverse)
    }
}

/// Adds `item` to the set of `rtype` at `node`.
fn push_item(node: &mut BuildNode, rtype: RecordType, item: Item) {
    match node.iter_mut().find(|(t, _)| *t == rtype) {
        Some((_, items)) => items.push(item),
        None => node.push((rtype, vec![item])),
    }
}

/// Size of `record` encoded alone with no name compression: an upper bound
/// of its size in any message.
pub(crate) fn encoded_len(record: &Record) -> usize {
    let mut buf = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    match record.emit(&mut encoder) {
        Ok(()) => buf.len(),
        // Cannot happen for the record types built here; an unknown size
        // only means the exact fit check always runs.
        Err(_) => usize::MAX / 4,
    }
}

/// `label.parent`, for labels the catalog has validated.
fn child(parent: &Name, label: &str) -> Option<Name> {
    parent.prepend_label(label).ok()
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn address_data(ip: IpAddr, weight: u32) -> Data {
    match ip {
        IpAddr::V4(v4) => Data::A(v4, weight),
        IpAddr::V6(v6) => Data::Aaaa(Box::new(v6), weight),
    }
}

fn address_rdata(ip: IpAddr) -> RData {
    match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    }
}

/// The address records of a set of instances at `name`, one per distinct
/// address: an RRset must not repeat a record (RFC 2181 §5), and a host
/// that runs several instances gets their weights summed, so it draws the
/// share of traffic its instances together were given.
fn add_addresses<'e>(
    b: &mut Builder<'_>,
    name: &Name,
    instances: impl Iterator<Item = &'e InstanceEntry>,
) {
    let mut seen: Vec<(IpAddr, u32)> = Vec::new();
    for e in instances {
        let ip = e.instance.address;
        let w = u32::from(e.instance.weight);
        match seen.iter_mut().find(|(a, _)| *a == ip) {
            Some((_, total)) => *total = total.saturating_add(w),
            None => seen.push((ip, w)),
        }
    }
    for (ip, w) in seen {
        b.add(name, address_data(ip, w));
    }
}

/// The names of service `svc` (its part of the index), or `None` if its
/// name is not a valid label below the zone.
fn build_service(
    zone: &ZoneConfig,
    origin_key: &NameKey,
    svc: &str,
    entry: &Arc<ServiceEntry>,
) -> Option<ServicePart> {
    let origin = &zone.origin;
    let svc_name = child(origin, svc)?;
    let mut b = Builder::new(zone, origin_key);
    b.touch(&svc_name);
    let targets = add_instances(&mut b, &svc_name, entry);

    // The service name.
    add_addresses(&mut b, &svc_name, entry.healthy());
    for e in entry.healthy() {
        targets.add_srv(&mut b, &svc_name, e, e.instance.port);
    }

    let dnssd_type = dnssd_type_name(origin, svc);
    if let Some(dnssd_type) = &dnssd_type {
        add_dnssd(&mut b, dnssd_type, entry, &targets);
    }
    if let Some(tag_root) = child(&svc_name, "tag") {
        add_tags(&mut b, &tag_root, entry, &targets);
    }
    add_named_ports(&mut b, &svc_name, entry, &targets);

    // Its record in the DNS-SD enumeration: the service type
    // `_<svc>._tcp.Z`.
    let browse = browse_name(origin)
        .and(dnssd_type.as_ref())
        .map(|dnssd_type| Item {
            data: Data::Ptr(Target::new(
                dnssd_type,
                origin_key,
                IpAddr::from([0, 0, 0, 0]),
                &[],
            )),
        });
    let (nodes, reverse) = b.finish();
    Some(ServicePart {
        nodes,
        browse,
        reverse,
    })
}

/// The targets of a service's instances, by id: each instance has one,
/// shared by every record that names it.
struct Targets<'e>(HashMap<&'e str, Target>);

impl Targets<'_> {
    /// Adds at `at` the SRV record of `e` on `port`.
    fn add_srv(&self, b: &mut Builder<'_>, at: &Name, e: &InstanceEntry, port: u16) {
        if let Some(target) = self.0.get(e.instance.id.as_str()) {
            let data = Data::Srv {
                weight: e.instance.weight,
                port,
                target: target.clone(),
            };
            b.add(at, data);
        }
    }
}

/// Each instance's own name `<id>.<svc>.Z` (address record and metadata)
/// and reverse name, healthy or not; returns their targets. A target's TXT
/// is the metadata, or one empty string when there is none (what DNS-SD
/// wants, RFC 6763 §6.1; `<id>.<svc>.Z` then has no TXT).
fn add_instances<'e>(b: &mut Builder<'_>, svc_name: &Name, entry: &'e ServiceEntry) -> Targets<'e> {
    let mut targets = HashMap::new();
    for (id, e) in &entry.instances {
        let Some(inst_name) = child(svc_name, id.as_str()) else {
            continue;
        };
        let address = e.instance.address;
        b.add(
            &inst_name,
            address_data(address, u32::from(e.instance.weight)),
        );
        let mut txt = meta_txt(e.instance.meta.iter());
        let has_meta = !txt.is_empty();
        if !has_meta {
            txt.push(0);
        }
        let target = Target::new(&inst_name, &b.origin_key, address, &txt);
        if has_meta {
            b.add(&inst_name, Data::Txt(target.clone()));
        }
        b.reverse.push((
            address,
            Item {
                data: Data::Ptr(target.clone()),
            },
        ));
        targets.insert(id.as_str(), target);
    }
    Targets(targets)
}

/// DNS-SD browsing (RFC 6763): `_<svc>._tcp.Z` PTR to `<id>._<svc>._tcp.Z`
/// per healthy instance, each with SRV (to `<id>.<svc>.Z`) and TXT (its
/// instance's).
fn add_dnssd(b: &mut Builder<'_>, dnssd_type: &Name, entry: &ServiceEntry, targets: &Targets<'_>) {
    b.touch(dnssd_type);
    for e in entry.healthy() {
        let Some(dnssd_inst) = child(dnssd_type, e.instance.id.as_str()) else {
            continue;
        };
        let Some(target) = targets.0.get(e.instance.id.as_str()) else {
            continue;
        };
        // The PTR's target is only a name: the TXT is the instance's own.
        let name = Target::new(&dnssd_inst, &b.origin_key, e.instance.address, &[]);
        b.add(dnssd_type, Data::Ptr(name));
        targets.add_srv(b, &dnssd_inst, e, e.instance.port);
        b.add(&dnssd_inst, Data::Txt(target.clone()));
    }
}

/// `<tag>.tag.<svc>.Z` for every tag. A tag name exists while any instance
/// carries it, so a tag whose instances are all unhealthy is NODATA, not
/// NXDOMAIN.
fn add_tags(b: &mut Builder<'_>, tag_root: &Name, entry: &ServiceEntry, targets: &Targets<'_>) {
    let mut tags: Vec<&str> = entry
        .instances
        .values()
        .flat_map(|e| e.instance.tags.iter().map(Text::as_str))
        .collect();
    tags.sort_unstable();
    tags.dedup();
    for tag in tags {
        let Some(tag_name) = child(tag_root, tag) else {
            continue;
        };
        b.touch(&tag_name);
        let with_tag = || {
            entry
                .healthy()
                .filter(move |e| e.instance.tags.iter().any(|t| t == tag))
        };
        add_addresses(b, &tag_name, with_tag());
        for e in with_tag() {
            targets.add_srv(b, &tag_name, e, e.instance.port);
        }
    }
}

/// `_<port>._<tcp,udp>.<svc>.Z` for every named port, the same under `_tcp`
/// and `_udp`: the catalog does not record a port's protocol, and a client
/// asks for the one it speaks.
fn add_named_ports(
    b: &mut Builder<'_>,
    svc_name: &Name,
    entry: &ServiceEntry,
    targets: &Targets<'_>,
) {
    let mut ports: Vec<&str> = entry
        .instances
        .values()
        .flat_map(|e| e.instance.ports.keys().map(Text::as_str))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    for proto in ["_tcp", "_udp"] {
        let Some(proto_name) = child(svc_name, proto) else {
            continue;
        };
        for port in &ports {
            let Some(port_name) = child(&proto_name, &format!("_{port}")) else {
                continue;
            };
            b.touch(&port_name);
            for e in entry.healthy() {
                if let Some(&p) = e.instance.ports.get(*port) {
                    targets.add_srv(b, &port_name, e, p);
                }
            }
        }
    }
}

/// `_<svc>._tcp.Z`, the DNS-SD service type of `svc` (`None` when `_<svc>`
/// is longer than a label).
fn dnssd_type_name(origin: &Name, svc: &str) -> Option<Name> {
    child(&child(origin, "_tcp")?, &format!("_{svc}"))
}

/// `b._dns-sd._udp.Z` and `lb._dns-sd._udp.Z`: the browsing domains a
/// DNS-SD client asks for (RFC 6763 §11), both pointing at the zone.
fn browsing_domain_names(origin: &Name) -> Vec<Name> {
    let Some(dns_sd) = child(origin, "_udp").and_then(|n| child(&n, "_dns-sd")) else {
        return Vec::new();
    };
    ["b", "lb"]
        .iter()
        .filter_map(|l| child(&dns_sd, l))
        .collect()
}

/// The service whose DNS-SD names `key` is at or below: the label above
/// `_tcp.Z` without its `_` (`user` for `u1._user._tcp.Z`).
fn dnssd_service<'k>(key: &'k [u8], zone: &[u8]) -> Option<&'k [u8]> {
    let mut labels: SmallVec<[(usize, usize); 8]> = SmallVec::new();
    let mut at = 0;
    while at < key.len() {
        if key[at..] == *zone {
            let (start, len) = *labels.get(labels.len().checked_sub(2)?)?;
            return key.get(start..start + len)?.strip_prefix(b"_");
        }
        let len = usize::from(key[at]);
        if len == 0 {
            return None;
        }
        labels.push((at + 1, len));
        at += 1 + len;
    }
    None
}

/// `_services._dns-sd._udp.Z`.
fn browse_name(origin: &Name) -> Option<Name> {
    ["_udp", "_dns-sd", "_services"]
        .iter()
        .try_fold(origin.clone(), |n, l| child(&n, l))
}

/// Where a name is relative to the zone.
enum Place<'k> {
    /// Outside it.
    Outside,
    /// The apex.
    Apex,
    /// Below it, under this label of the apex (a service's, or the
    /// zone's own such as `ns` and `_udp`).
    Below(&'k [u8]),
}

/// Where `key` is relative to the zone whose key is `zone`, on label
/// boundaries.
fn service_label<'k>(key: &'k [u8], zone: &[u8]) -> Place<'k> {
    let mut previous: Option<(usize, usize)> = None;
    let mut at = 0;
    while at < key.len() {
        if key[at..] == *zone {
            return match previous {
                None => Place::Apex,
                Some((start, len)) => Place::Below(&key[start..start + len]),
            };
        }
        let len = usize::from(key[at]);
        if len == 0 {
            return Place::Outside;
        }
        previous = Some((at + 1, len));
        at += 1 + len;
    }
    Place::Outside
}

/// A name looked up in the index.
enum Lookup<'a> {
    /// It exists in the zone.
    Node(Node<'a>),
    /// A reverse name of an instance address: its PTR set.
    Reverse(RecordSet<'a>),
    /// In the zone, but it does not exist.
    NxDomain,
    /// Outside the zone, and not a reverse name we know.
    Outside,
}

impl Index {
    /// Builds the index of `snapshot` for `zone`.
    pub(crate) fn build(snapshot: &Snapshot, zone: &ZoneConfig) -> Self {
        Self::build_from(snapshot, zone, None)
    }

    /// Builds the index of `snapshot` for `zone` from `previous` (an index
    /// of the same zone): only the services the catalog changed since are
    /// built, and the maps are shared in structure with `previous`'s, so
    /// the work is that of the change, not of the zone.
    pub(crate) fn build_from(
        snapshot: &Snapshot,
        zone: &ZoneConfig,
        previous: Option<&Index>,
    ) -> Self {
        let origin = &zone.origin;
        let origin_key = key_of(origin);
        let ttl = secs(zone.ttl);

        let (mut services, mut reverse, from) = match previous {
            Some(p) => (p.services.clone(), p.reverse.clone(), p.from.clone()),
            None => Default::default(),
        };
        for change in from.diff(&snapshot.services) {
            let (svc, entry) = match change {
                DiffItem::Add(svc, entry)
                | DiffItem::Update {
                    new: (svc, entry), ..
                } => (svc, Some(entry)),
                DiffItem::Remove(svc, _) => (svc, None),
            };
            let part = entry
                .and_then(|entry| build_service(zone, &origin_key, svc.as_str(), entry))
                .map(Arc::new);
            let old = match &part {
                Some(part) => services.insert(svc.clone(), part.clone()),
                None => services.remove(svc),
            };
            let label = svc.as_str().as_bytes();
            update_reverse(&mut reverse, label, old.as_deref(), part.as_deref());
        }

        let mut b = Builder::new(zone, &origin_key);
        let fallback = || origin.clone();
        let ns_name = child(origin, "ns").unwrap_or_else(fallback);
        let hostmaster = child(origin, "hostmaster").unwrap_or_else(fallback);
        // The serial is the store revision: it grows with every change, as a
        // serial should; RFC 1982 arithmetic copes with the u32 wrap.
        let serial = (snapshot.revision & 0xFFFF_FFFF) as u32;
        let soa = Record::from_rdata(
            origin.clone(),
            // In a negative answer the SOA's TTL is the negative TTL (RFC 2308 §3).
            secs(zone.negative_ttl),
            RData::SOA(SOA::new(
                ns_name.clone(),
                hostmaster,
                serial,
                SOA_REFRESH,
                SOA_RETRY,
                SOA_EXPIRE,
                secs(zone.negative_ttl),
            )),
        );
        b.add_whole(origin, soa.data.clone(), Vec::new());

        // `ns.Z` is the server itself, unless a service took that name: the
        // service's records win (its users asked for them), and the NS then
        // goes without glue.
        let ns_is_service = services.contains_key("ns");
        let ns_glue = match zone.ns_address {
            Some(ip) if !ns_is_service => {
                let glue = Record::from_rdata(ns_name.clone(), ttl, address_rdata(ip));
                b.add(&ns_name, address_data(ip, 1));
                vec![glue]
            }
            Some(_) => {
                tracing::warn!("a service is named `ns`: ns.<zone> answers it, not this server");
                Vec::new()
            }
            None => Vec::new(),
        };
        b.add_whole(origin, RData::NS(NS(ns_name)), ns_glue);

        // DNS-SD service enumeration (RFC 6763 §9): the name exists now,
        // its records come with `browse()`.
        let browse_name = browse_name(origin);
        if let Some(browse) = &browse_name {
            b.touch(browse);
        }
        for domain in browsing_domain_names(origin) {
            b.add_whole(&domain, RData::PTR(PTR(origin.clone())), Vec::new());
        }
        // `_tcp.Z` exists while a service type below it does (RFC 8020).
        if !services.is_empty()
            && let Some(tcp) = child(origin, "_tcp")
        {
            b.touch(&tcp);
        }

        let zone_nodes = b.finish().0;
        Index {
            soa_wire: wire::encode_record(&soa, Owner::Zone, &origin_key),
            origin_key,
            revision: snapshot.revision,
            built: snapshot.built,
            loaded: snapshot.is_loaded(),
            soa_len: encoded_len(&soa),
            soa,
            zone_nodes,
            ttl,
            services,
            from: snapshot.services.clone(),
            browse_key: browse_name.as_ref().map(key_of),
            browse: OnceLock::new(),
            reverse,
        }
    }

    /// `_services._dns-sd._udp.Z`: a PTR to every service.
    fn browse(&self) -> Node<'_> {
        let (sets, items) = self.browse.get_or_init(|| {
            let mut items: Vec<Item> = self
                .services
                .values()
                .filter_map(|part| part.browse.clone())
                .collect();
            // In name order, whatever order the services are kept in.
            items.sort_by(|a, b| match (&a.data, &b.data) {
                (Data::Ptr(a), Data::Ptr(b)) => a.name().cmp(b.name()),
                _ => std::cmp::Ordering::Equal,
            });
            let set = set_bytes(RecordType::PTR, offset(items.len()));
            (set, items.into())
        });
        // No services, no records: the name exists, empty.
        let sets = if items.is_empty() { &[][..] } else { &sets[..] };
        Node {
            sets,
            items,
            start: 0,
        }
    }

    /// The node of the name whose key is `key`.
    fn lookup(&self, key: &[u8]) -> Lookup<'_> {
        let nodes = match service_label(key, &self.origin_key) {
            Place::Outside => {
                return reverse_address(key)
                    .and_then(|ip| self.reverse.get(&ip))
                    .map_or(Lookup::Outside, |items| {
                        Lookup::Reverse(RecordSet {
                            rtype: RecordType::PTR,
                            items,
                        })
                    });
            }
            Place::Apex => &self.zone_nodes,
            Place::Below(label) => match self.service(label) {
                Some(part) => &part.nodes,
                // DNS-SD names live with their service.
                None if label == b"_tcp" => dnssd_service(key, &self.origin_key)
                    .and_then(|svc| self.service(svc))
                    .map_or(&self.zone_nodes, |part| &part.nodes),
                None if self.browse_key.as_deref() == Some(key) => {
                    return Lookup::Node(self.browse());
                }
                None => &self.zone_nodes,
            },
        };
        // Names are kept without the zone's labels.
        let prefix = &key[..key.len() - self.origin_key.len()];
        nodes.get(prefix).map_or(Lookup::NxDomain, Lookup::Node)
    }

    /// The part of the service whose label is `label`.
    fn service(&self, label: &[u8]) -> Option<&Arc<ServicePart>> {
        self.services.get_bytes(label)
    }

    /// How to answer `qtype`, any type but ANY, at the name whose key is
    /// `key`, without allocating: the fast path's lookup.
    pub(crate) fn resolve_single(&self, key: &[u8], qtype: RecordType) -> Single<'_> {
        match self.lookup(key) {
            Lookup::Node(node) => Single::Found(node.set(qtype)),
            // A known reverse name answers PTR only; other types are not
            // ours to deny (we are not the authority for the arpa zones).
            Lookup::Reverse(set) if qtype == RecordType::PTR => Single::Found(Some(set)),
            Lookup::Reverse(_) => Single::Outside,
            Lookup::NxDomain => Single::NxDomain,
            Lookup::Outside => Single::Outside,
        }
    }

    /// How to answer `qtype` at the name whose key is `key`.
    pub(crate) fn resolve(&self, key: &[u8], qtype: RecordType) -> Resolution<'_> {
        if qtype != RecordType::ANY {
            return match self.resolve_single(key, qtype) {
                Single::Found(set) => Resolution::Found {
                    sets: set.into_iter().collect(),
                },
                Single::NxDomain => Resolution::NxDomain,
                Single::Outside => Resolution::Outside,
            };
        }
        match self.lookup(key) {
            Lookup::Node(node) => Resolution::Found {
                sets: select_sets(node, qtype),
            },
            Lookup::Reverse(set) => Resolution::Found { sets: vec![set] },
            Lookup::NxDomain => Resolution::NxDomain,
            Lookup::Outside => Resolution::Outside,
        }
    }
}

/// The sets that answer `qtype` at `node`: that type's, or all for ANY.
fn select_sets(node: Node<'_>, qtype: RecordType) -> Vec<RecordSet<'_>> {
    if qtype == RecordType::ANY {
        node.sets().collect()
    } else {
        node.set(qtype).into_iter().collect()
    }
}

/// One name of the zone (its key) and its sets, as a zone transfer sends
/// them.
pub(crate) type ZoneName<'a> = (NameKey, Node<'a>);

impl Index {
    /// The SOA serial: the catalog revision modulo 2^32, so that every
    /// replica gives the same serial to the same revision, and RFC 1982
    /// arithmetic orders them across the wrap.
    pub(crate) fn serial(&self) -> u32 {
        (self.revision & 0xFFFF_FFFF) as u32
    }

    /// Every name of the zone with its sets, as queries answer them (the
    /// zone's own names, the DNS-SD enumeration, every service's names;
    /// not the reverse names, which are outside the zone): an AXFR's
    /// content, the SOA included at the apex.
    pub(crate) fn zone_names(&self) -> impl Iterator<Item = ZoneName<'_>> {
        let browse = self.browse_key.clone().map(|key| (key, self.browse()));
        self.zone_nodes
            .iter()
            .chain(self.services.values().flat_map(|part| part.nodes.iter()))
            .map(|(prefix, node)| (self.full_key(prefix), node))
            .chain(browse)
    }

    /// The key of the name of the zone whose key without the zone's labels
    /// is `prefix`.
    fn full_key(&self, prefix: &[u8]) -> NameKey {
        [prefix, &self.origin_key].concat().into()
    }

    /// The names whose records may differ between `old` and this index:
    /// the zone's own names, the enumeration when services came or went,
    /// and the names of the services the catalog changed, as (in `old`, in
    /// this one). The work is that of the change, not of the zone.
    pub(crate) fn changed_names<'a>(
        &'a self,
        old: &'a Index,
    ) -> (Vec<ZoneName<'a>>, Vec<ZoneName<'a>>) {
        let full = |index: &'a Index, names: &'a Names| {
            names
                .iter()
                .map(move |(prefix, node)| (index.full_key(prefix), node))
        };
        let mut before: Vec<ZoneName<'a>> = full(old, &old.zone_nodes).collect();
        let mut after: Vec<ZoneName<'a>> = full(self, &self.zone_nodes).collect();
        let mut services_changed = false;
        for change in old.from.diff(&self.from) {
            let svc = match change {
                DiffItem::Add(svc, _) | DiffItem::Remove(svc, _) => {
                    services_changed = true;
                    svc
                }
                DiffItem::Update { new: (svc, _), .. } => svc,
            };
            if let Some(part) = old.services.get(svc.as_str()) {
                before.extend(full(old, &part.nodes));
            }
            if let Some(part) = self.services.get(svc.as_str()) {
                after.extend(full(self, &part.nodes));
            }
        }
        if services_changed {
            if let Some(key) = old.browse_key.clone() {
                before.push((key, old.browse()));
            }
            if let Some(key) = self.browse_key.clone() {
                after.push((key, self.browse()));
            }
        }
        (before, after)
    }
}

/// The hickory name of an index key.
pub(crate) fn name_of(key: &[u8]) -> Name {
    name_of_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> NameKey {
        key_of(&Name::from_ascii(s).unwrap())
    }

    #[test]
    fn reverse_names_read_back_into_their_addresses() {
        for ip in [
            "10.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "fd00::6",
            "2001:db8::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(reverse_address(&key_of(&Name::from(ip))), Some(ip), "{ip}");
        }
        assert_eq!(
            reverse_address(&key("4.3.2.1.IN-ADDR.ARPA.")),
            Some(IpAddr::from([1, 2, 3, 4]))
        );
        // Not the form an address's reverse name takes: no answer of ours.
        for other in [
            "04.3.2.1.in-addr.arpa.",
            "256.3.2.1.in-addr.arpa.",
            "3.2.1.in-addr.arpa.",
            "5.4.3.2.1.in-addr.arpa.",
            "x.3.2.1.in-addr.arpa.",
            "4.3.2.1.in-addr.arpa.example.",
            "0.0.ip6.arpa.",
            "user.xingren.host.",
        ] {
            assert_eq!(reverse_address(&key(other)), None, "{other}");
        }
    }

    #[test]
    fn services_are_found_replaced_and_removed_by_name() {
        let part = || {
            Arc::new(ServicePart {
                nodes: Names::default(),
                browse: None,
                reverse: Vec::new(),
            })
        };
        let name = |s: &str| ServiceName::new(s).unwrap();
        let mut services = Services::default();
        let user = part();
        assert!(services.insert(name("user"), user.clone()).is_none());
        assert!(services.insert(name("order"), part()).is_none());
        assert!(Arc::ptr_eq(services.get("user").unwrap(), &user));
        assert!(services.get("use").is_none() && services.get("users").is_none());
        let replaced = services.insert(name("user"), part()).unwrap();
        assert!(Arc::ptr_eq(&replaced, &user));
        assert_eq!(services.values().count(), 2);
        assert!(services.remove(&name("user")).is_some());
        assert!(services.remove(&name("user")).is_none());
        assert!(!services.contains_key("user") && services.contains_key("order"));
        assert!(services.remove(&name("order")).is_some());
        assert!(services.is_empty());
    }

    #[test]
    fn names_find_each_prefix_and_nothing_else() {
        let names = Names::new(vec![
            (&b"\x02u1"[..], BuildNode::new()),
            (&b""[..], BuildNode::new()),
            (&b"\x02v1\x03tag"[..], BuildNode::new()),
            (&b"\x03tag"[..], BuildNode::new()),
        ]);
        for prefix in [&b"\x02u1"[..], b"", b"\x02v1\x03tag", b"\x03tag"] {
            assert!(names.get(prefix).is_some(), "{prefix:?}");
        }
        for prefix in [&b"\x02u2"[..], b"\x02u", b"\x02v1"] {
            assert!(names.get(prefix).is_none(), "{prefix:?}");
        }
        assert_eq!(names.iter().count(), 4);
    }
}
