//! The outbound guard: decides which network addresses Countersign may connect to on behalf of an agent or a
//! webhook, so that a configured URL cannot be turned against the gateway's own host or network (SSRF).
//!
//! Every outbound call, to webhooks and `http` upstreams alike, goes through it in two places:
//!
//! * [`OutboundGuard::check_url`] before every request: only `http` and `https`, and an IP-literal host must
//!   pass [`OutboundGuard::check_ip`]. This call is required, because reqwest connects to an IP-literal host
//!   directly and never asks the DNS resolver about it.
//! * [`GuardResolver`], installed by [`client_builder`], for host names: the name is resolved once, the whole
//!   lookup is refused if any resolved address is refused, and reqwest connects to exactly the checked
//!   addresses (there is no second lookup that a rebinding DNS server could answer differently).
//!
//! Refused: loopback, private (RFC 1918, fc00::/7), link-local and cloud metadata (169.254.0.0/16,
//! fe80::/10), CGNAT, unspecified, multicast, broadcast and reserved ranges, and the IPv6 forms that embed a
//! refused IPv4 address (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64 64:ff9b::/96, 6to4), and the
//! local-use NAT64 prefix 64:ff9b:1::/48 whole (it reaches whatever the operator's translator serves). The
//! server configuration (`network.allow_private`) may list networks that are allowed anyway.
//!
//! The client from [`client_builder`] follows no redirects and ignores proxy settings from the environment.
//! This module does not decide whether a call should happen (the gateway does), and sets no total timeout
//! (callers do, per request).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// How long the client from [`client_builder`] waits for name resolution plus the TCP (and TLS) connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the guard refused something. Its text is meant to be recorded as a job's or action's failure reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// An entry of `network.allow_private` is not a network.
    #[error("invalid network `{entry}` in network.allow_private: {message}")]
    InvalidAllowEntry { entry: String, message: String },
    /// The URL's scheme is neither `http` nor `https`.
    #[error("refused by the outbound guard: scheme `{0}` is not allowed (only http and https)")]
    Scheme(String),
    /// The URL names no host.
    #[error("refused by the outbound guard: the URL has no host")]
    NoHost,
    /// The address (an IP literal, or an address given directly) is in a refused range.
    #[error("refused by the outbound guard: {address} is {reason}")]
    Refused { address: IpAddr, reason: Refusal },
    /// A host name resolved to at least one address in a refused range.
    #[error("refused by the outbound guard: {name} resolved to {address}, which is {reason}")]
    RefusedName { name: String, address: IpAddr, reason: Refusal },
    /// The host name could not be resolved.
    #[error("cannot resolve {name}: {message}")]
    Lookup { name: String, message: String },
    /// The host name resolved to no address at all.
    #[error("cannot resolve {name}: no addresses")]
    NoAddresses { name: String },
}

impl GuardError {
    /// Finds a guard error in the source chain of another error (typically a `reqwest::Error` whose
    /// connection was refused by [`GuardResolver`]), so the guard's text can be recorded as the reason.
    pub fn find_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a GuardError> {
        let mut current = Some(error);
        while let Some(error) = current {
            if let Some(found) = error.downcast_ref::<GuardError>() {
                return Some(found);
            }
            current = error.source();
        }
        None
    }
}

/// A range of addresses the guard refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedRange {
    /// 0.0.0.0/8 ("this network") and `::`.
    Unspecified,
    /// 127.0.0.0/8 and `::1`.
    Loopback,
    /// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16.
    PrivateRfc1918,
    /// fc00::/7.
    UniqueLocal,
    /// 100.64.0.0/10.
    SharedCgnat,
    /// 169.254.0.0/16, which holds the cloud metadata service 169.254.169.254.
    LinkLocalMetadata,
    /// fe80::/10.
    LinkLocalV6,
    /// fec0::/10 (deprecated, but still a private range).
    SiteLocalV6,
    /// 64:ff9b:1::/48, the NAT64 prefix for local use (RFC 8215): it translates to whatever IPv4 network the
    /// operator's own translator serves, private ones included, at a position that depends on the prefix.
    LocalNat64,
    /// 192.0.0.0/24.
    IetfProtocolAssignments,
    /// 198.18.0.0/15.
    Benchmarking,
    /// 224.0.0.0/4 and ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 240.0.0.0/4 (other than the broadcast address).
    Reserved,
}

impl fmt::Display for RefusedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusedRange::Unspecified => "unspecified",
            RefusedRange::Loopback => "loopback",
            RefusedRange::PrivateRfc1918 => "private (RFC 1918)",
            RefusedRange::UniqueLocal => "private (unique local, fc00::/7)",
            RefusedRange::SharedCgnat => "shared address space (CGNAT, 100.64.0.0/10)",
            RefusedRange::LinkLocalMetadata => "link-local/metadata",
            RefusedRange::LinkLocalV6 => "link-local (fe80::/10)",
            RefusedRange::SiteLocalV6 => "site-local (fec0::/10)",
            RefusedRange::LocalNat64 => "local-use NAT64 (64:ff9b:1::/48)",
            RefusedRange::IetfProtocolAssignments => "reserved for IETF protocol assignments (192.0.0.0/24)",
            RefusedRange::Benchmarking => "reserved for benchmarking (198.18.0.0/15)",
            RefusedRange::Multicast => "multicast",
            RefusedRange::Broadcast => "broadcast",
            RefusedRange::Reserved => "reserved (240.0.0.0/4)",
        })
    }
}

/// An IPv6 form that carries an IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv4Embedding {
    /// `::ffff:a.b.c.d`.
    Mapped,
    /// `::a.b.c.d` (deprecated).
    Compatible,
    /// `::ffff:0:a.b.c.d` (SIIT).
    Translated,
    /// `64:ff9b::a.b.c.d`.
    Nat64,
    /// `2002:aabb:ccdd::/48`.
    SixToFour,
}

impl fmt::Display for Ipv4Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ipv4Embedding::Mapped => "an IPv4-mapped",
            Ipv4Embedding::Compatible => "an IPv4-compatible",
            Ipv4Embedding::Translated => "an IPv4-translated",
            Ipv4Embedding::Nat64 => "a NAT64 (64:ff9b::/96)",
            Ipv4Embedding::SixToFour => "a 6to4 (2002::/16)",
        })
    }
}

/// Why one address is refused: its range, and the IPv4 address it embeds when that is what is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub range: RefusedRange,
    pub embedded: Option<(Ipv4Embedding, Ipv4Addr)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            None => write!(f, "{}", self.range),
            Some((embedding, v4)) => write!(f, "{embedding} form of {v4}, which is {}", self.range),
        }
    }
}

/// What [`OutboundGuard::check_url`] found the URL's host to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardedTarget {
    /// An IP literal that passed [`OutboundGuard::check_ip`]; reqwest connects to it without a lookup.
    Address(IpAddr),
    /// A host name; its addresses are checked by [`GuardResolver`] when the client connects.
    Name(String),
}

/// The set of exceptions from `network.allow_private`, and the checks against it.
#[derive(Debug, Clone, Default)]
pub struct OutboundGuard {
    allow: Vec<IpNet>,
}

impl OutboundGuard {
    /// Builds the guard from `network.allow_private`: CIDR networks such as `127.0.0.1/32` or `fd00::/8`; a
    /// bare address means that one address.
    pub fn new(allow_private: &[String]) -> Result<Self, GuardError> {
        let allow = allow_private.iter().map(|entry| parse_network(entry)).collect::<Result<Vec<_>, _>>()?;
        Ok(OutboundGuard { allow })
    }

    /// Refuses an address in a refused range unless it (in its IPv4 form, when IPv4-mapped) is inside an
    /// allowed network.
    pub fn check_ip(&self, address: IpAddr) -> Result<(), GuardError> {
        match self.refusal(address) {
            None => Ok(()),
            Some(reason) => Err(GuardError::Refused { address, reason }),
        }
    }

    /// Checks a URL before a request: the scheme must be `http` or `https`, and an IP-literal host must pass
    /// [`OutboundGuard::check_ip`]. A host name is left to [`GuardResolver`], which checks it at connect time.
    ///
    /// Call this before every request: reqwest does not consult the resolver for IP-literal hosts. The `url`
    /// crate has already turned decimal, octal and hexadecimal IPv4 spellings (`http://2130706433/`,
    /// `http://0x7f.1/`) into IPv4 addresses, so they are checked here as the addresses they are.
    pub fn check_url(&self, url: &Url) -> Result<GuardedTarget, GuardError> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(GuardError::Scheme(other.to_owned())),
        }
        // The url crate has normalised every IPv4 spelling of an http(s) host to dotted form, and writes an
        // IPv6 host in brackets; anything else is a name.
        let host = url.host_str().filter(|host| !host.is_empty()).ok_or(GuardError::NoHost)?;
        let bare = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
        match bare.parse::<IpAddr>() {
            Ok(address) => {
                self.check_ip(address)?;
                Ok(GuardedTarget::Address(address))
            }
            Err(_) => Ok(GuardedTarget::Name(host.to_owned())),
        }
    }

    /// Resolves a host name once and returns its addresses (with port 0) if every one of them passes
    /// [`OutboundGuard::check_ip`]; refuses the whole lookup otherwise, or when nothing resolves.
    pub async fn resolve_checked(&self, name: &str) -> Result<Vec<SocketAddr>, GuardError> {
        let resolved = tokio::net::lookup_host((name, 0))
            .await
            .map_err(|error| GuardError::Lookup { name: name.to_owned(), message: error.to_string() })?;
        self.check_resolved(name, resolved.collect())
    }

    /// Accepts the addresses a name resolved to only if there is at least one and every one passes.
    fn check_resolved(&self, name: &str, resolved: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, GuardError> {
        // The system resolver answers once per socket type; keep each address once, in its order.
        let mut seen = BTreeSet::new();
        let addresses: Vec<SocketAddr> = resolved.into_iter().filter(|address| seen.insert(address.ip())).collect();
        if addresses.is_empty() {
            return Err(GuardError::NoAddresses { name: name.to_owned() });
        }
        for address in &addresses {
            if let Some(reason) = self.refusal(address.ip()) {
                return Err(GuardError::RefusedName { name: name.to_owned(), address: address.ip(), reason });
            }
        }
        Ok(addresses)
    }

    fn allows(&self, address: IpAddr) -> bool {
        let canonical = address.to_canonical();
        self.allow.iter().any(|network| network.contains(&address) || network.contains(&canonical))
    }

    fn refusal(&self, address: IpAddr) -> Option<Refusal> {
        let reason = match address {
            IpAddr::V4(v4) => refused_v4(v4).map(|range| Refusal { range, embedded: None }),
            IpAddr::V6(v6) => refused_v6(v6),
        }?;
        if self.allows(address) { None } else { Some(reason) }
    }
}

fn parse_network(entry: &str) -> Result<IpNet, GuardError> {
    let trimmed = entry.trim();
    let network = match trimmed.parse::<IpNet>() {
        Ok(network) => network,
        Err(_) => match trimmed.parse::<IpAddr>() {
            Ok(address) => IpNet::from(address),
            Err(_) => {
                return Err(GuardError::InvalidAllowEntry {
                    entry: entry.to_owned(),
                    message: "expected a CIDR network such as 127.0.0.1/32 or fd00::/8".to_owned(),
                });
            }
        },
    };
    Ok(network.trunc())
}

fn refused_v4(address: Ipv4Addr) -> Option<RefusedRange> {
    let [a, b, c, _] = address.octets();
    let range = match (a, b, c) {
        (0, _, _) => RefusedRange::Unspecified,
        (10, _, _) => RefusedRange::PrivateRfc1918,
        (100, 64..=127, _) => RefusedRange::SharedCgnat,
        (127, _, _) => RefusedRange::Loopback,
        (169, 254, _) => RefusedRange::LinkLocalMetadata,
        (172, 16..=31, _) => RefusedRange::PrivateRfc1918,
        (192, 0, 0) => RefusedRange::IetfProtocolAssignments,
        (192, 168, _) => RefusedRange::PrivateRfc1918,
        (198, 18..=19, _) => RefusedRange::Benchmarking,
        (224..=239, _, _) => RefusedRange::Multicast,
        _ if address == Ipv4Addr::BROADCAST => RefusedRange::Broadcast,
        (240..=255, _, _) => RefusedRange::Reserved,
        _ => return None,
    };
    Some(range)
}

fn refused_v6(address: Ipv6Addr) -> Option<Refusal> {
    let direct = |range| Some(Refusal { range, embedded: None });
    if address.is_unspecified() {
        return direct(RefusedRange::Unspecified);
    }
    if address.is_loopback() {
        return direct(RefusedRange::Loopback);
    }
    if let Some((embedding, v4)) = embedded_v4(address) {
        return refused_v4(v4).map(|range| Refusal { range, embedded: Some((embedding, v4)) });
    }
    let first = address.segments()[0];
    if first & 0xfe00 == 0xfc00 {
        return direct(RefusedRange::UniqueLocal);
    }
    if first & 0xffc0 == 0xfe80 {
        return direct(RefusedRange::LinkLocalV6);
    }
    if first & 0xffc0 == 0xfec0 {
        return direct(RefusedRange::SiteLocalV6);
    }
    if first & 0xff00 == 0xff00 {
        return direct(RefusedRange::Multicast);
    }
    if address.segments()[..3] == [0x64, 0xff9b, 1] {
        return direct(RefusedRange::LocalNat64);
    }
    None
}

/// The IPv4 address an IPv6 address carries, for the forms that route to (or stand for) that IPv4 address.
fn embedded_v4(address: Ipv6Addr) -> Option<(Ipv4Embedding, Ipv4Addr)> {
    let o = address.octets();
    let low = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match address.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((Ipv4Embedding::Mapped, low)),
        [0, 0, 0, 0, 0, 0, _, _] => Some((Ipv4Embedding::Compatible, low)),
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some((Ipv4Embedding::Translated, low)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((Ipv4Embedding::Nat64, low)),
        [0x2002, ..] => Some((Ipv4Embedding::SixToFour, Ipv4Addr::new(o[2], o[3], o[4], o[5]))),
        _ => None,
    }
}

/// A reqwest DNS resolver that resolves each name once and hands reqwest only addresses the guard accepts.
#[derive(Debug, Clone)]
pub struct GuardResolver {
    guard: Arc<OutboundGuard>,
}

impl GuardResolver {
    pub fn new(guard: Arc<OutboundGuard>) -> Self {
        GuardResolver { guard }
    }
}

impl Resolve for GuardResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = Arc::clone(&self.guard);
        Box::pin(async move {
            let addresses = guard.resolve_checked(name.as_str()).await?;
            let addrs: Addrs = Box::new(addresses.into_iter());
            Ok(addrs)
        })
    }
}

/// A client builder for outbound calls: the guard's resolver, no redirects, no proxy from the environment and
/// a connect timeout of [`CONNECT_TIMEOUT`]. Callers add a total timeout, and call
/// [`OutboundGuard::check_url`] before every request (IP-literal hosts bypass the resolver).
pub fn client_builder(guard: Arc<OutboundGuard>) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .dns_resolver(GuardResolver::new(guard))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn guard(allow: &[&str]) -> OutboundGuard {
        OutboundGuard::new(&allow.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn refusal_of(guard: &OutboundGuard, address: IpAddr) -> Option<Refusal> {
        match guard.check_ip(address) {
            Ok(()) => None,
            Err(GuardError::Refused { address: reported, reason }) => {
                assert_eq!(reported, address);
                Some(reason)
            }
            Err(other) => unreachable!("unexpected error {other}"),
        }
    }

    /// Refused IPv4 addresses: the first, a middle and the last address of every refused range.
    const REFUSED_V4: &[(&str, RefusedRange)] = &[
        ("0.0.0.0", RefusedRange::Unspecified),
        ("0.0.0.5", RefusedRange::Unspecified),
        ("0.255.255.255", RefusedRange::Unspecified),
        ("127.0.0.1", RefusedRange::Loopback),
        ("127.0.0.2", RefusedRange::Loopback),
        ("127.255.255.254", RefusedRange::Loopback),
        ("10.0.0.0", RefusedRange::PrivateRfc1918),
        ("10.0.0.5", RefusedRange::PrivateRfc1918),
        ("10.255.255.255", RefusedRange::PrivateRfc1918),
        ("172.16.0.0", RefusedRange::PrivateRfc1918),
        ("172.20.1.1", RefusedRange::PrivateRfc1918),
        ("172.31.255.255", RefusedRange::PrivateRfc1918),
        ("192.168.0.0", RefusedRange::PrivateRfc1918),
        ("192.168.1.1", RefusedRange::PrivateRfc1918),
        ("192.168.255.255", RefusedRange::PrivateRfc1918),
        ("169.254.0.0", RefusedRange::LinkLocalMetadata),
        ("169.254.169.254", RefusedRange::LinkLocalMetadata),
        ("169.254.255.255", RefusedRange::LinkLocalMetadata),
        ("100.64.0.0", RefusedRange::SharedCgnat),
        ("100.100.100.200", RefusedRange::SharedCgnat),
        ("100.127.255.255", RefusedRange::SharedCgnat),
        ("224.0.0.1", RefusedRange::Multicast),
        ("239.255.255.250", RefusedRange::Multicast),
        ("255.255.255.255", RefusedRange::Broadcast),
        ("192.0.0.0", RefusedRange::IetfProtocolAssignments),
        ("192.0.0.170", RefusedRange::IetfProtocolAssignments),
        ("192.0.0.255", RefusedRange::IetfProtocolAssignments),
        ("198.18.0.0", RefusedRange::Benchmarking),
        ("198.19.255.255", RefusedRange::Benchmarking),
        ("240.0.0.0", RefusedRange::Reserved),
        ("250.1.2.3", RefusedRange::Reserved),
        ("255.255.255.254", RefusedRange::Reserved),
    ];

    /// Refused IPv6 addresses that do not embed an IPv4 address.
    const REFUSED_V6: &[(&str, RefusedRange)] = &[
        ("::", RefusedRange::Unspecified),
        ("::1", RefusedRange::Loopback),
        ("fc00::", RefusedRange::UniqueLocal),
        ("fd12:3456::1", RefusedRange::UniqueLocal),
        ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", RefusedRange::UniqueLocal),
        ("fe80::1", RefusedRange::LinkLocalV6),
        ("febf:ffff::1", RefusedRange::LinkLocalV6),
        ("fec0::1", RefusedRange::SiteLocalV6),
        ("ff00::", RefusedRange::Multicast),
        ("ff02::1", RefusedRange::Multicast),
        ("ff0e::101", RefusedRange::Multicast),
        ("64:ff9b:1::a00:1", RefusedRange::LocalNat64),
        ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", RefusedRange::LocalNat64),
    ];

    /// Allowed: public addresses, the edges just outside refused ranges, and IPv6 forms of public IPv4.
    const ALLOWED: &[&str] = &[
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "1.0.0.0",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.1.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "::ffff:8.8.8.8",
        "::8.8.8.8",
        "64:ff9b::1.1.1.1",
        "2002:0808:0808::1",
        "fbff:ffff::1",
        "64:ff9b:0:1::808:808",
        "64:ff9b:2::1",
        "fe7f::1",
    ];

    fn v6_forms(v4: Ipv4Addr) -> Vec<(Ipv4Embedding, Ipv6Addr)> {
        let [a, b, c, d] = v4.octets();
        let high = u16::from_be_bytes([a, b]);
        let low = u16::from_be_bytes([c, d]);
        vec![
            (Ipv4Embedding::Mapped, v4.to_ipv6_mapped()),
            (Ipv4Embedding::Compatible, v4.to_ipv6_compatible()),
            (Ipv4Embedding::Translated, Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, high, low)),
            (Ipv4Embedding::Nat64, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, high, low)),
            (Ipv4Embedding::SixToFour, Ipv6Addr::new(0x2002, high, low, 0, 0, 0, 0, 1)),
        ]
    }

    /// The spellings of an IPv4 address the URL parser accepts: dotted, decimal, hexadecimal, octal, and the
    /// IPv6 forms in brackets.
    fn url_spellings(v4: Ipv4Addr) -> Vec<String> {
        let number = u32::from(v4);
        let [a, b, c, d] = v4.octets();
        let mut spellings = vec![
            format!("http://{v4}/"),
            format!("https://{number}/"),
            format!("http://0x{number:x}/"),
            format!("http://0x{number:X}:8080/path"),
            format!("http://0{a:o}.0{b:o}.0{c:o}.0{d:o}/"),
            format!("http://0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}/"),
            format!("http://{a}.{}/", u32::from_be_bytes([0, b, c, d])),
            format!("http://0x{a:x}.{}/", u32::from_be_bytes([0, b, c, d])),
            format!("http://{a}.{b}.{}/", u16::from_be_bytes([c, d])),
            format!("http://user:pass@{v4}:1/"),
            format!("http://{v4}./"),
        ];
        for (_, v6) in v6_forms(v4) {
            spellings.push(format!("http://[{v6}]/"));
        }
        spellings
    }

    #[test]
    fn refused_v4_addresses_and_their_ipv6_forms() {
        let guard = guard(&[]);
        for (text, range) in REFUSED_V4 {
            let v4: Ipv4Addr = text.parse().unwrap();
            assert_eq!(
                refusal_of(&guard, IpAddr::V4(v4)),
                Some(Refusal { range: *range, embedded: None }),
                "{text} must be refused as {range}"
            );
            for (embedding, v6) in v6_forms(v4) {
                let reason = refusal_of(&guard, IpAddr::V6(v6)).unwrap_or_else(|| unreachable!("{v6} was allowed"));
                // `::` and `::1` are the compatible forms of 0.0.0.0 and 0.0.0.1, and refused as themselves.
                if !(v6.is_unspecified() || v6.is_loopback()) {
                    assert_eq!(reason, Refusal { range: *range, embedded: Some((embedding, v4)) }, "{v6}");
                }
            }
        }
    }

    #[test]
    fn refused_v6_addresses() {
        let guard = guard(&[]);
        for (text, range) in REFUSED_V6 {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(refusal_of(&guard, address), Some(Refusal { range: *range, embedded: None }), "{text}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let guard = guard(&[]);
        for text in ALLOWED {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(guard.check_ip(address), Ok(()), "{text} must be allowed");
            let url = Url::parse(&format!("https://{}/x", url_host(address))).unwrap();
            assert_eq!(guard.check_url(&url), Ok(GuardedTarget::Address(address)), "{url}");
        }
    }

    fn url_host(address: IpAddr) -> String {
        match address {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        }
    }

    #[test]
    fn every_url_spelling_of_a_refused_address_is_refused() {
        let guard = guard(&[]);
        for (text, _) in REFUSED_V4 {
            let v4: Ipv4Addr = text.parse().unwrap();
            for spelling in url_spellings(v4) {
                let url = Url::parse(&spelling).unwrap();
                match guard.check_url(&url) {
                    Err(GuardError::Refused { .. }) => {}
                    other => unreachable!("{spelling} (parsed as {url}) gave {other:?}"),
                }
            }
        }
        for (text, _) in REFUSED_V6 {
            let url = Url::parse(&format!("http://[{text}]:8080/")).unwrap();
            assert!(matches!(guard.check_url(&url), Err(GuardError::Refused { .. })), "{url}");
        }
    }

    #[test]
    fn the_usual_loopback_tricks_parse_to_ip_literals_and_are_refused() {
        let guard = guard(&[]);
        for spelling in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://0x7f000001/",
            "http://127.1/",
            "http://127.0.1/",
            "http://0/",
            "http://0x0/",
            "http://[::]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://0xa9fea9fe/",
            "http://2852039166/",
            "http://0251.0376.0251.0376/",
            "http://169.254.43518/",
            "HTTP://LOCALHOST.localdomain.example.invalid.@127.0.0.1/",
        ] {
            let url = Url::parse(spelling).unwrap();
            assert!(matches!(guard.check_url(&url), Err(GuardError::Refused { .. })), "{spelling} parsed as {url}");
        }
    }

    #[test]
    fn error_text_names_the_address_and_the_reason() {
        let guard = guard(&[]);
        let text = |s: &str| guard.check_ip(s.parse().unwrap()).unwrap_err().to_string();
        assert_eq!(text("169.254.169.254"), "refused by the outbound guard: 169.254.169.254 is link-local/metadata");
        assert_eq!(text("10.0.0.5"), "refused by the outbound guard: 10.0.0.5 is private (RFC 1918)");
        assert_eq!(text("::1"), "refused by the outbound guard: ::1 is loopback");
        assert_eq!(
            text("::ffff:10.0.0.5"),
            "refused by the outbound guard: ::ffff:10.0.0.5 is an IPv4-mapped form of 10.0.0.5, \
             which is private (RFC 1918)"
        );
        assert_eq!(
            text("64:ff9b::a9fe:a9fe"),
            "refused by the outbound guard: 64:ff9b::a9fe:a9fe is a NAT64 (64:ff9b::/96) form of \
             169.254.169.254, which is link-local/metadata"
        );
        let url = Url::parse("http://0x7f.1/").unwrap();
        assert_eq!(
            guard.check_url(&url).unwrap_err().to_string(),
            "refused by the outbound guard: 127.0.0.1 is loopback"
        );
    }

    #[test]
    fn only_http_and_https_schemes() {
        let guard = guard(&[]);
        for spelling in ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com:70/", "ws://example.com/"] {
            let url = Url::parse(spelling).unwrap();
            assert!(matches!(guard.check_url(&url), Err(GuardError::Scheme(_))), "{spelling}");
        }
        let url = Url::parse("file:///etc/passwd").unwrap();
        assert_eq!(
            guard.check_url(&url).unwrap_err().to_string(),
            "refused by the outbound guard: scheme `file` is not allowed (only http and https)"
        );
        let url = Url::parse("https://hooks.example.com/x").unwrap();
        assert_eq!(guard.check_url(&url), Ok(GuardedTarget::Name("hooks.example.com".to_owned())));
    }

    #[test]
    fn the_allow_list_lets_exactly_its_networks_through() {
        let guard = guard(&["127.0.0.1/32", "10.1.0.0/16", "fd00::/8", "192.168.1.7"]);
        let allowed = |s: &str| guard.check_ip(s.parse().unwrap()).is_ok();
        assert!(allowed("127.0.0.1"));
        assert!(allowed("::ffff:127.0.0.1"), "the mapped form is checked in its IPv4 form");
        assert!(!allowed("127.0.0.2"));
        assert!(!allowed("::1"));
        assert!(allowed("10.1.200.3"));
        assert!(!allowed("10.2.0.1"));
        assert!(allowed("fd12::1"));
        assert!(!allowed("fc00::1"));
        assert!(allowed("192.168.1.7"));
        assert!(!allowed("192.168.1.8"));
        assert!(!allowed("169.254.169.254"));
        let url = Url::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(guard.check_url(&url), Ok(GuardedTarget::Address(IpAddr::V4(Ipv4Addr::LOCALHOST))));
    }

    #[test]
    fn a_bad_allow_entry_is_named() {
        for entry in ["127.0.0.1/33", "localhost", "10.0.0.0/8/8", ""] {
            let error = OutboundGuard::new(&["127.0.0.1/32".to_owned(), entry.to_owned()]).unwrap_err();
            assert!(matches!(&error, GuardError::InvalidAllowEntry { entry: e, .. } if e == entry), "{error}");
            assert!(error.to_string().contains(&format!("`{entry}`")), "{error}");
        }
    }

    #[tokio::test]
    async fn the_resolver_refuses_localhost_unless_allowed() {
        let refused = GuardResolver::new(Arc::new(guard(&[])));
        let error = match refused.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => unreachable!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(error) => error,
        };
        let error = GuardError::find_in(&*error).unwrap();
        assert!(matches!(error, GuardError::RefusedName { name, .. } if name == "localhost"), "{error}");
        assert!(error.to_string().starts_with("refused by the outbound guard: localhost resolved to "), "{error}");

        let allowed = GuardResolver::new(Arc::new(guard(&["127.0.0.1/32", "::1/128"])));
        let addresses: Vec<SocketAddr> = allowed.resolve("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|a| a.ip().is_loopback()), "{addresses:?}");
    }

    #[test]
    fn one_refused_address_refuses_the_whole_lookup() {
        let guard = guard(&["127.0.0.1/32"]);
        let addresses = |list: &[&str]| list.iter().map(|s| SocketAddr::new(s.parse().unwrap(), 0)).collect::<Vec<_>>();

        let mixed = guard.check_resolved("mixed.example", addresses(&["8.8.8.8", "10.0.0.5", "1.1.1.1"]));
        assert_eq!(
            mixed.unwrap_err().to_string(),
            "refused by the outbound guard: mixed.example resolved to 10.0.0.5, which is private (RFC 1918)"
        );
        let loopback_both = guard.check_resolved("localhost", addresses(&["127.0.0.1", "::1"]));
        assert!(matches!(loopback_both, Err(GuardError::RefusedName { address, .. }) if address.is_loopback()));

        let fine =
            guard.check_resolved("ok.example", addresses(&["8.8.8.8", "8.8.8.8", "127.0.0.1", "2606:4700::1111"]));
        assert_eq!(fine.unwrap(), addresses(&["8.8.8.8", "127.0.0.1", "2606:4700::1111"]));

        let none = guard.check_resolved("nothing.example", Vec::new());
        assert_eq!(none.unwrap_err().to_string(), "cannot resolve nothing.example: no addresses");
    }

    /// Serves `ok` on `/` and a redirect to `/` on `/redirect`, on a loopback port chosen by the system.
    async fn loopback_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route("/redirect", axum::routing::get(|| async { axum::response::Redirect::temporary("/") }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        address
    }

    fn client(allow: &[&str]) -> reqwest::Client {
        // reqwest is built with `rustls-no-provider`; building a client needs one even for plain http.
        let _ = rustls::crypto::ring::default_provider().install_default();
        client_builder(Arc::new(guard(allow))).build().unwrap()
    }

    #[tokio::test]
    async fn a_guarded_client_refuses_a_loopback_name_unless_allowed() {
        let server = loopback_server().await;
        let url = format!("http://localhost:{}/", server.port());

        let error = client(&[]).get(&url).send().await.unwrap_err();
        let refusal = GuardError::find_in(&error).unwrap_or_else(|| unreachable!("not a guard error: {error:?}"));
        assert!(matches!(refusal, GuardError::RefusedName { .. }), "{refusal}");

        let response = client(&["127.0.0.1/32", "::1/128"]).get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn a_guarded_client_follows_no_redirects() {
        let server = loopback_server().await;
        let url = format!("http://localhost:{}/redirect", server.port());
        let response = client(&["127.0.0.1/32", "::1/128"]).get(&url).send().await.unwrap();
        assert_eq!(response.status(), 307);
    }

    #[tokio::test]
    async fn ip_literals_bypass_the_resolver_so_check_url_is_required() {
        let server = loopback_server().await;
        let url = Url::parse(&format!("http://127.0.0.1:{}/", server.port())).unwrap();
        // reqwest does not ask the resolver about an IP literal: this is why callers must call check_url.
        let response = client(&[]).get(url.clone()).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(matches!(guard(&[]).check_url(&url), Err(GuardError::Refused { .. })));
    }
}
