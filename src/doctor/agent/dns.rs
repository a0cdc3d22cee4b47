//! A minimal DNS stub, for evidence only: what `/etc/hosts` says about a name, and which
//! nameserver of `/etc/resolv.conf` answered what. The resolution that connects stays
//! `tokio::net::lookup_host` (glibc's `files dns`, see `src/portable.rs`); this module exists so
//! that "Could not resolve host" comes with the line that is missing and the server that said
//! NXDOMAIN, timed out or failed.
//!
//! It asks the way glibc does, as far as the evidence needs: the nameservers of
//! `/etc/resolv.conf` (at most three, 127.0.0.1 when none is listed), the names of its `search`
//! (or `domain`) list in glibc's order for the `ndots` option, A and AAAA at once over UDP, every
//! server and name concurrently, each query bounded by [`QUERY_TIMEOUT`]. No retries, no TCP
//! fallback, no EDNS: a truncated reply is reported with what it holds.
//!
//! Every reply is hostile until parsed: all reads are checked, compression pointers are followed
//! a bounded number of times, and a reply whose id or question is not ours is ignored, as a
//! resolver does, until the query's time is up.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UdpSocket;

/// How long one nameserver gets for one name (both families at once): within the resolution
/// link's bound, [`super::STEP`].
pub(super) const QUERY_TIMEOUT: Duration = Duration::from_millis(1500);

const A: u16 = 1;
const CNAME: u16 = 5;
const AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// glibc's MAXNS and MAXDNSRCH: the nameservers and search domains it uses at most.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCH: usize = 6;
/// The most of `/etc/hosts` and `/etc/resolv.conf` read (a hosts file of ad-blocking lists can
/// be megabytes; what is past this is reported as not read).
const MAX_FILE: u64 = 4 << 20;
/// A compression pointer may be followed this many times within one name (a loop ends here).
const MAX_POINTERS: usize = 32;
/// A CNAME chain is followed this far.
const MAX_CHAIN: usize = 16;
/// A reply's addresses kept at most.
const MAX_ADDRESSES: usize = 32;

/// Where the stub reads and asks: the system's files and port 53, or a test's own.
#[derive(Debug, Clone)]
pub(super) struct Sources {
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    /// The nameservers' port (53; a test's own UDP socket in tests).
    pub dns_port: u16,
}

impl Sources {
    pub fn system() -> Sources {
        Sources {
            hosts: PathBuf::from("/etc/hosts"),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            dns_port: 53,
        }
    }
}

/// A file read whole up to [`MAX_FILE`]; whether it was cut.
fn read_bounded(path: &Path) -> std::io::Result<(String, bool)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE.saturating_add(1))
        .read_to_end(&mut bytes)?;
    let cut = bytes.len() as u64 > MAX_FILE;
    bytes.truncate(MAX_FILE as usize);
    Ok((String::from_utf8_lossy(&bytes).into_owned(), cut))
}

/// A name as DNS and `/etc/hosts` compare it: ASCII lower case, no trailing dot.
fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------------
// /etc/hosts

/// A line of `/etc/hosts` that names the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostsLine {
    /// 1-based.
    pub number: usize,
    pub text: String,
    pub addr: IpAddr,
}

/// The lines of a hosts file naming `name` (as canonical name or alias), in file order (glibc
/// answers with the first).
pub(super) fn hosts_lines(text: &str, name: &str) -> Vec<HostsLine> {
    let name = canonical(name);
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let data = line.split('#').next().unwrap_or_default();
        let mut fields = data.split_whitespace();
        let Some(addr) = fields.next() else { continue };
        // A scoped address (`fe80::1%eth0`) names the host all the same.
        let Ok(addr) = addr.split('%').next().unwrap_or(addr).parse::<IpAddr>() else {
            continue;
        };
        if fields.any(|n| canonical(n) == name) {
            found.push(HostsLine {
                number: i + 1,
                text: line.trim().to_string(),
                addr,
            });
        }
    }
    found
}

/// What the hosts file says about `name`, as evidence lines.
pub(super) fn hosts_evidence(path: &Path, name: &str) -> Vec<String> {
    let (text, cut) = match read_bounded(path) {
        Ok(r) => r,
        Err(e) => return vec![format!("{}: cannot be read ({e})", path.display())],
    };
    let lines = hosts_lines(&text, name);
    let mut out: Vec<String> = if lines.is_empty() {
        vec![format!("{}: no entry for {name}", path.display())]
    } else {
        lines
            .iter()
            .map(|l| format!("{} line {}: {}", path.display(), l.number, l.text))
            .collect()
    };
    if cut {
        out.push(format!("{}: only its first {MAX_FILE} bytes were read", path.display()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// /etc/resolv.conf

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResolvConf {
    pub nameservers: Vec<IpAddr>,
    /// No `nameserver` line: glibc asks 127.0.0.1 (it is in `nameservers`).
    pub default_nameserver: bool,
    pub search: Vec<String>,
    pub ndots: usize,
}

/// `nameserver`, `search`/`domain` (the last of them wins, as in glibc) and `options ndots:N`;
/// the rest is not needed for the evidence.
pub(super) fn parse_resolv(text: &str) -> ResolvConf {
    let mut nameservers = Vec::new();
    let mut search = Vec::new();
    let mut ndots = 1;
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("nameserver") => {
                let addr = fields.next().unwrap_or_default();
                let addr = addr.split('%').next().unwrap_or(addr);
                if let Ok(ip) = addr.parse::<IpAddr>() {
                    if nameservers.len() < MAX_NAMESERVERS {
                        nameservers.push(ip);
                    }
                }
            }
            Some("domain") => search = fields.take(1).map(canonical).collect(),
            Some("search") => search = fields.take(MAX_SEARCH).map(canonical).collect(),
            Some("options") => {
                for o in fields {
                    if let Some(n) = o.strip_prefix("ndots:").and_then(|n| n.parse::<usize>().ok()) {
                        ndots = n.min(15);
                    }
                }
            }
            _ => {}
        }
    }
    search.retain(|s| !s.is_empty());
    let default_nameserver = nameservers.is_empty();
    if default_nameserver {
        nameservers.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ResolvConf {
        nameservers,
        default_nameserver,
        search,
        ndots,
    }
}

impl ResolvConf {
    /// The names glibc asks for `name`, in its order: as given first when it has at least
    /// `ndots` dots (or ends in a dot), else the search list first.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        let absolute = canonical(name);
        if name.ends_with('.') {
            return vec![absolute];
        }
        let searched = self.search.iter().map(|d| format!("{absolute}.{d}"));
        if absolute.matches('.').count() >= self.ndots {
            std::iter::once(absolute.clone()).chain(searched).collect()
        } else {
            searched.chain(std::iter::once(absolute.clone())).collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queries and replies

/// A query for `name` and `qtype` with `id`, recursion desired. The error says why the name
/// cannot be asked for.
pub(super) fn build_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, String> {
    let name = canonical(name);
    let mut p = Vec::with_capacity(name.len() + 18);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| *l <= 63)
            .ok_or_else(|| format!("{name:?} has a label longer than 63 bytes"))?;
        p.push(len);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    // 12 bytes of header, 4 of type and class: the name itself at most 255.
    if p.len() > 12 + 255 {
        return Err(format!("{name:?} is longer than 255 bytes"));
    }
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(p)
}

/// What a reply says, once it is known to answer our question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub rcode: u8,
    pub truncated: bool,
    /// The addresses of the queried type at the end of the CNAME chain from the question.
    pub addrs: Vec<IpAddr>,
    /// The chain's names after the question's.
    pub cnames: Vec<String>,
}

/// Why a packet is not a usable reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NotReply {
    /// Not an answer to our query (another id, no QR bit, another question): wait on.
    NotOurs,
    /// Ours, but broken: the reason.
    Malformed(&'static str),
}

/// Checked reads over a packet.
struct Cursor<'a> {
    p: &'a [u8],
    pos: usize,
}

const SHORT: NotReply = NotReply::Malformed("the reply is cut short");

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], NotReply> {
        let end = self.pos.checked_add(n).ok_or(SHORT)?;
        let b = self.p.get(self.pos..end).ok_or(SHORT)?;
        self.pos = end;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, NotReply> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, NotReply> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A possibly compressed name at the cursor, which moves past it.
    fn name(&mut self) -> Result<String, NotReply> {
        let (name, next) = read_name(self.p, self.pos)?;
        self.pos = next;
        Ok(name)
    }
}

/// The name at `start` of `p` (lower case, dotted) and where the bytes after it begin; pointers
/// followed at most [`MAX_POINTERS`] times, the name at most 255 bytes.
fn read_name(p: &[u8], start: usize) -> Result<(String, usize), NotReply> {
    let mut name = String::new();
    let mut pos = start;
    let mut after = None;
    let mut pointers = 0;
    let mut wire_len = 1usize;
    loop {
        let len = *p.get(pos).ok_or(SHORT)?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                let next = pos.checked_add(1).ok_or(SHORT)?;
                return Ok((name, after.unwrap_or(next)));
            }
            0x00 => {
                let from = pos.checked_add(1).ok_or(SHORT)?;
                let to = from.checked_add(usize::from(len)).ok_or(SHORT)?;
                let label = p.get(from..to).ok_or(SHORT)?;
                wire_len = wire_len.saturating_add(usize::from(len) + 1);
                if wire_len > 255 {
                    return Err(NotReply::Malformed("a name longer than 255 bytes"));
                }
                if !name.is_empty() {
                    name.push('.');
                }
                // Names are shown and compared; a byte that is not printable ASCII shows as `?`.
                name.extend(label.iter().map(|b| match b.to_ascii_lowercase() {
                    c @ 0x21..=0x7e => char::from(c),
                    _ => '?',
                }));
                pos = to;
            }
            0xC0 => {
                let low = *p.get(pos.checked_add(1).ok_or(SHORT)?).ok_or(SHORT)?;
                if after.is_none() {
                    after = Some(pos.checked_add(2).ok_or(SHORT)?);
                }
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return Err(NotReply::Malformed("a loop of compression pointers"));
                }
                pos = (usize::from(len & 0x3F) << 8) | usize::from(low);
            }
            _ => return Err(NotReply::Malformed("an unknown label type")),
        }
    }
}

/// Parse `p` as the reply to query `id` for `qname` and `qtype`.
pub(super) fn parse_reply(p: &[u8], id: u16, qname: &str, qtype: u16) -> Result<Reply, NotReply> {
    let mut c = Cursor { p, pos: 0 };
    let got_id = c.u16().map_err(|_| NotReply::NotOurs)?;
    let flags = c.u16().map_err(|_| NotReply::NotOurs)?;
    if got_id != id || flags & 0x8000 == 0 {
        return Err(NotReply::NotOurs);
    }
    let rcode = (flags & 0x000F) as u8;
    let truncated = flags & 0x0200 != 0;
    let qdcount = c.u16()?;
    let ancount = c.u16()?;
    let _nscount = c.u16()?;
    let _arcount = c.u16()?;
    let qname = canonical(qname);
    // The question, when echoed, must be ours (a stray reply with a guessed id is not).
    for i in 0..qdcount {
        let name = c.name()?;
        let t = c.u16()?;
        let _class = c.u16()?;
        if i == 0 && (name != qname || t != qtype) {
            return Err(NotReply::NotOurs);
        }
    }
    let mut records: Vec<(String, u16, Vec<u8>, Option<String>)> = Vec::new();
    for _ in 0..ancount {
        if truncated && c.pos >= p.len() {
            break;
        }
        let owner = c.name()?;
        let t = c.u16()?;
        let class = c.u16()?;
        let _ttl = c.u32()?;
        let len = usize::from(c.u16()?);
        let start = c.pos;
        let data = c.bytes(len)?;
        if class != CLASS_IN {
            continue;
        }
        let target = if t == CNAME {
            // The target may point anywhere in the packet: read it from the whole packet.
            Some(read_name(p, start)?.0)
        } else {
            None
        };
        records.push((owner, t, data.to_vec(), target));
    }
    let mut chain = vec![qname];
    while chain.len() <= MAX_CHAIN {
        let last = chain.last().cloned().unwrap_or_default();
        let next = records
            .iter()
            .find(|(owner, t, _, _)| *t == CNAME && *owner == last)
            .and_then(|(_, _, _, target)| target.clone());
        match next {
            Some(n) if !chain.contains(&n) => chain.push(n),
            _ => break,
        }
    }
    let mut addrs = Vec::new();
    for (owner, t, data, _) in &records {
        if *t != qtype || !chain.contains(owner) || addrs.len() >= MAX_ADDRESSES {
            continue;
        }
        let addr = match (*t, data.len()) {
            (A, 4) => IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
            (AAAA, 16) => {
                let mut o = [0u8; 16];
                o.copy_from_slice(data);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => return Err(NotReply::Malformed("an address record of the wrong length")),
        };
        addrs.push(addr);
    }
    chain.remove(0);
    Ok(Reply {
        rcode,
        truncated,
        addrs,
        cnames: chain,
    })
}

/// A response code in the words of `dig`.
fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

/// What one nameserver said about one name (both families together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Addresses {
        addrs: Vec<IpAddr>,
        cnames: Vec<String>,
    },
    /// NOERROR without an A or AAAA record: the name exists, with no address.
    NoAddress,
    NxDomain,
    /// Another response code (SERVFAIL, REFUSED, ...).
    Rcode(u8),
    /// No reply within [`QUERY_TIMEOUT`].
    Timeout,
    /// The query could not be sent, or the network said no (port unreachable, no route).
    SendError(String),
    /// A reply that is ours but broken.
    BadReply(String),
}

impl Outcome {
    /// The more telling of two outcomes first (addresses, then a definite answer, then
    /// failures).
    fn rank(&self) -> u8 {
        match self {
            Outcome::Addresses { .. } => 0,
            Outcome::NxDomain => 1,
            Outcome::NoAddress => 2,
            Outcome::Rcode(_) => 3,
            Outcome::BadReply(_) => 4,
            Outcome::SendError(_) => 5,
            Outcome::Timeout => 6,
        }
    }

    /// The A and the AAAA answers as one.
    fn merge(a: Outcome, b: Outcome) -> Outcome {
        match (a, b) {
            (
                Outcome::Addresses { mut addrs, mut cnames },
                Outcome::Addresses {
                    addrs: more,
                    cnames: other,
                },
            ) => {
                addrs.extend(more);
                for c in other {
                    if !cnames.contains(&c) {
                        cnames.push(c);
                    }
                }
                Outcome::Addresses { addrs, cnames }
            }
            (a, b) if b.rank() < a.rank() => b,
            (a, _) => a,
        }
    }

    fn describe(&self) -> String {
        match self {
            Outcome::Addresses { addrs, cnames } => {
                let addrs = addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
                if cnames.is_empty() {
                    addrs
                } else {
                    format!("{addrs} (via CNAME {})", cnames.join(" → "))
                }
            }
            Outcome::NoAddress => "NOERROR but no A or AAAA record".into(),
            Outcome::NxDomain => "NXDOMAIN (no such name)".into(),
            Outcome::Rcode(r) => rcode_name(*r),
            Outcome::Timeout => format!("no answer within {} ms", QUERY_TIMEOUT.as_millis()),
            Outcome::SendError(e) => format!("could not be asked: {e}"),
            Outcome::BadReply(e) => format!("a broken reply: {e}"),
        }
    }
}

/// A query id nobody can guess; ring's system random, else the clock (only the evidence would
/// suffer from a guessable id).
fn random_id() -> u16 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 2];
    if ring::rand::SystemRandom::new().fill(&mut b).is_ok() {
        return u16::from_be_bytes(b);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    (nanos ^ std::process::id()) as u16
}

/// Ask `server` for `qtype` of `name`, once, within `timeout`.
pub(super) async fn query(server: SocketAddr, name: &str, qtype: u16, timeout: Duration) -> Outcome {
    let id = random_id();
    let packet = match build_query(id, name, qtype) {
        Ok(p) => p,
        Err(e) => return Outcome::SendError(e),
    };
    let ask = async {
        let local: SocketAddr = if server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
        // Connected: only the server's datagrams arrive, and an ICMP "port unreachable" shows.
        sock.connect(server).await.map_err(|e| e.to_string())?;
        sock.send(&packet).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            match parse_reply(buf.get(..n).unwrap_or_default(), id, name, qtype) {
                Ok(r) => return Ok(Ok(r)),
                Err(NotReply::NotOurs) => continue,
                Err(NotReply::Malformed(why)) => return Ok(Err(why)),
            }
        }
    };
    match tokio::time::timeout(timeout, ask).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) => Outcome::SendError(e),
        Ok(Ok(Err(why))) => Outcome::BadReply(why.to_string()),
        Ok(Ok(Ok(r))) if !r.addrs.is_empty() => Outcome::Addresses {
            addrs: r.addrs,
            cnames: r.cnames,
        },
        Ok(Ok(Ok(r))) if r.rcode == 3 => Outcome::NxDomain,
        Ok(Ok(Ok(r))) if r.rcode == 0 && r.truncated => {
            Outcome::BadReply("truncated (TC) without an address; the stub does not retry over TCP".into())
        }
        Ok(Ok(Ok(r))) if r.rcode == 0 => Outcome::NoAddress,
        Ok(Ok(Ok(r))) => Outcome::Rcode(r.rcode),
    }
}

/// What one nameserver said: for the first name of the search order it knew an address for,
/// else the most telling answer of them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerAnswer {
    pub server: IpAddr,
    /// The name the outcome is for.
    pub name: String,
    /// Every name asked, in glibc's order.
    pub asked: Vec<String>,
    pub outcome: Outcome,
}

impl ServerAnswer {
    pub fn describe(&self) -> String {
        let also = if self.asked.len() > 1 {
            format!(" (asked {})", self.asked.join(", "))
        } else {
            String::new()
        };
        format!(
            "nameserver {}: {} → {}{also}",
            self.server,
            self.name,
            self.outcome.describe()
        )
    }
}

/// Ask every nameserver of `rc` for every candidate name of `name`, A and AAAA, all at once on
/// `port`; each query bounded by `timeout`.
pub(super) async fn ask_all(rc: &ResolvConf, name: &str, port: u16, timeout: Duration) -> Vec<ServerAnswer> {
    let asked = rc.candidates(name);
    let per_server = rc.nameservers.iter().map(|&ip| {
        let asked = asked.clone();
        async move {
            let server = SocketAddr::new(ip, port);
            let per_name = asked.iter().map(|n| async move {
                let (a, aaaa) = tokio::join!(query(server, n, A, timeout), query(server, n, AAAA, timeout));
                (n.clone(), Outcome::merge(a, aaaa))
            });
            let answers = futures_util::future::join_all(per_name).await;
            let best = answers
                .iter()
                .find(|(_, o)| matches!(o, Outcome::Addresses { .. }))
                .or_else(|| answers.iter().min_by_key(|(_, o)| o.rank()))
                .cloned()
                .unwrap_or_else(|| (canonical(name), Outcome::SendError("no name to ask".into())));
            ServerAnswer {
                server: ip,
                name: best.0,
                asked,
                outcome: best.1,
            }
        }
    });
    futures_util::future::join_all(per_server).await
}

/// Everything the host's own sources say about `name`, as evidence lines: the hosts file, the
/// resolver configuration, each nameserver's answer.
pub(super) async fn evidence(src: &Sources, name: &str) -> Vec<String> {
    let mut out = hosts_evidence(&src.hosts, name);
    let rc = match read_bounded(&src.resolv_conf) {
        Ok((text, _)) => parse_resolv(&text),
        Err(e) => {
            out.push(format!(
                "{}: cannot be read ({e}); glibc then asks 127.0.0.1",
                src.resolv_conf.display()
            ));
            parse_resolv("")
        }
    };
    let mut conf = if rc.default_nameserver {
        format!(
            "{}: no nameserver line (glibc asks 127.0.0.1)",
            src.resolv_conf.display()
        )
    } else {
        let list = rc.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        format!("{}: nameserver {}", src.resolv_conf.display(), list.join(", "))
    };
    if !rc.search.is_empty() {
        conf.push_str(&format!("; search {}; ndots {}", rc.search.join(" "), rc.ndots));
    }
    out.push(conf);
    let answers = ask_all(&rc, name, src.dns_port, QUERY_TIMEOUT).await;
    let mut seen = BTreeSet::new();
    out.extend(
        answers
            .iter()
            .map(ServerAnswer::describe)
            .filter(|line| seen.insert(line.clone())),
    );
    out
}

/// A nameserver of the tests' own (net.rs's tests use it too).
#[cfg(test)]
pub(super) mod fake {
    use super::tests::{record, reply, QNAME_PTR};
    use super::*;

    /// A nameserver on loopback: answers `name` with 10.0.0.5 (A) and NOERROR/no data (AAAA),
    /// anything else with NXDOMAIN; first a reply with a wrong id, which must be ignored. Returns
    /// its port.
    pub async fn nameserver(name: &'static str) -> u16 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = sock.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let q = &buf[..n];
                let id = u16::from_be_bytes([q[0], q[1]]);
                let (qname, next) = read_name(q, 12).unwrap();
                let qtype = u16::from_be_bytes([q[next], q[next + 1]]);
                let wrong = reply(
                    id.wrapping_add(1),
                    0,
                    &qname,
                    qtype,
                    &[record(&QNAME_PTR, A, &[6, 6, 6, 6])],
                );
                sock.send_to(&wrong, from).await.unwrap();
                let answer = match (qname == name, qtype) {
                    (true, A) => reply(id, 0, &qname, qtype, &[record(&QNAME_PTR, A, &[10, 0, 0, 5])]),
                    (true, _) => reply(id, 0, &qname, qtype, &[]),
                    (false, _) => reply(id, 3, &qname, qtype, &[]),
                };
                sock.send_to(&answer, from).await.unwrap();
            }
        });
        port
    }
}

#[cfg(test)]
mod tests {
    use super::fake::nameserver;
    use super::*;

    /// A reply to `id` for `qname`/`qtype` with `answers` (already encoded records).
    pub(super) fn reply(id: u16, rcode: u16, qname: &str, qtype: u16, answers: &[Vec<u8>]) -> Vec<u8> {
        let mut p = build_query(id, qname, qtype).unwrap();
        p[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
        p[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for a in answers {
            p.extend_from_slice(a);
        }
        p
    }

    /// A record whose owner is a pointer to the question's name (offset 12).
    pub(super) fn record(owner: &[u8], t: u16, data: &[u8]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&t.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&300u32.to_be_bytes());
        r.extend_from_slice(&(data.len() as u16).to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    pub(super) const QNAME_PTR: [u8; 2] = [0xC0, 12];

    #[test]
    fn a_query_is_what_dig_sends() {
        let q = build_query(0xBEEF, "Server.Example.", A).unwrap();
        assert_eq!(
            q,
            [
                &[0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0][..],
                b"\x06server\x07example\x00",
                &[0, 1, 0, 1]
            ]
            .concat()
        );
        assert!(build_query(1, "a..b", A).is_err());
        assert!(build_query(1, &format!("{}.x", "a".repeat(64)), A).is_err());
        assert!(build_query(1, &vec!["abcdefghi"; 30].join("."), A).is_err());
    }

    #[test]
    fn answers_are_read_with_compressed_names() {
        let p = reply(7, 0, "server.example", A, &[record(&QNAME_PTR, A, &[10, 0, 0, 5])]);
        let r = parse_reply(&p, 7, "server.example", A).unwrap();
        assert_eq!(r.addrs, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!((r.rcode, r.truncated, r.cnames.len()), (0, false, 0));

        let v6 = "fd00::5".parse::<Ipv6Addr>().unwrap().octets();
        let p = reply(8, 0, "server.example", AAAA, &[record(&QNAME_PTR, AAAA, &v6)]);
        let r = parse_reply(&p, 8, "server.example", AAAA).unwrap();
        assert_eq!(r.addrs, ["fd00::5".parse::<IpAddr>().unwrap()]);

        let p = reply(9, 3, "nope.invalid", A, &[]);
        assert_eq!(parse_reply(&p, 9, "nope.invalid", A).unwrap().rcode, 3);
    }

    #[test]
    fn a_cname_chain_is_followed_to_its_addresses_and_strays_are_left_out() {
        // server.example → web.example (a label then a pointer to "example") → lb.example.
        let web = [&b"\x03web"[..], &[0xC0, 19]].concat();
        let answers = vec![
            record(&QNAME_PTR, CNAME, &web),
            record(
                &[&b"\x03web"[..], &[0xC0, 19]].concat(),
                CNAME,
                b"\x02lb\x07example\x00",
            ),
            record(b"\x02lb\x07example\x00", A, &[10, 0, 0, 7]),
            // Not on the chain: a resolver must not take it.
            record(b"\x05other\x07example\x00", A, &[6, 6, 6, 6]),
        ];
        let p = reply(1, 0, "server.example", A, &answers);
        let r = parse_reply(&p, 1, "server.example", A).unwrap();
        assert_eq!(r.cnames, ["web.example", "lb.example"]);
        assert_eq!(r.addrs, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_hostile_reply_is_refused_without_a_panic_or_a_loop() {
        // A pointer to itself, and two pointing at each other.
        let mut p = reply(1, 0, "x.example", A, &[]);
        p[6..8].copy_from_slice(&1u16.to_be_bytes());
        let at = p.len() as u8;
        p.extend_from_slice(&[0xC0, at]);
        assert_eq!(
            parse_reply(&p, 1, "x.example", A),
            Err(NotReply::Malformed("a loop of compression pointers"))
        );
        let mut p = reply(1, 0, "x.example", A, &[]);
        p[6..8].copy_from_slice(&1u16.to_be_bytes());
        let at = p.len() as u8;
        p.extend_from_slice(&[0xC0, at + 2, 0xC0, at]);
        assert!(matches!(
            parse_reply(&p, 1, "x.example", A),
            Err(NotReply::Malformed(_))
        ));
        // A pointer past the end; a record longer than the packet; every prefix of a good reply.
        let mut p = reply(1, 0, "x.example", A, &[]);
        p[6..8].copy_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&[0xC0, 0xFF]);
        assert!(matches!(
            parse_reply(&p, 1, "x.example", A),
            Err(NotReply::Malformed(_))
        ));
        let good = reply(1, 0, "x.example", A, &[record(&QNAME_PTR, A, &[1, 2, 3, 4])]);
        assert!(parse_reply(&good, 1, "x.example", A).is_ok());
        for n in 0..good.len() {
            assert!(parse_reply(&good[..n], 1, "x.example", A).is_err(), "{n} bytes");
        }
        let mut long = good.clone();
        let len_at = long.len() - 6;
        long[len_at..len_at + 2].copy_from_slice(&0xFFFFu16.to_be_bytes());
        assert_eq!(parse_reply(&long, 1, "x.example", A), Err(SHORT));
        // An A record of 5 bytes.
        let bad = reply(1, 0, "x.example", A, &[record(&QNAME_PTR, A, &[1, 2, 3, 4, 5])]);
        assert!(matches!(
            parse_reply(&bad, 1, "x.example", A),
            Err(NotReply::Malformed(_))
        ));
        // Random bytes of every length never panic.
        let mut x: u32 = 0x1234_5678;
        for len in 0..600 {
            let mut p = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                p.push(x as u8);
            }
            let _ = parse_reply(
                &p,
                u16::from_be_bytes([p.first().copied().unwrap_or(0), p.get(1).copied().unwrap_or(0)]),
                "x",
                A,
            );
        }
    }

    #[test]
    fn a_reply_to_another_query_is_not_ours() {
        let p = reply(2, 0, "x.example", A, &[record(&QNAME_PTR, A, &[1, 2, 3, 4])]);
        assert_eq!(parse_reply(&p, 3, "x.example", A), Err(NotReply::NotOurs));
        assert_eq!(parse_reply(&p, 2, "y.example", A), Err(NotReply::NotOurs));
        assert_eq!(parse_reply(&p, 2, "x.example", AAAA), Err(NotReply::NotOurs));
        // The query itself (no QR bit) is not a reply.
        let q = build_query(2, "x.example", A).unwrap();
        assert_eq!(parse_reply(&q, 2, "x.example", A), Err(NotReply::NotOurs));
    }

    #[test]
    fn hosts_lines_name_the_host_by_name_or_alias() {
        let text = "127.0.0.1 localhost\n# 10.0.0.9 bklite\n10.0.0.5\tbklite.corp  BKLite # the server\nfe80::1%eth0 bklite\nnot-an-ip bklite\n";
        let lines = hosts_lines(text, "bklite.");
        assert_eq!(
            lines,
            [
                HostsLine {
                    number: 3,
                    text: "10.0.0.5\tbklite.corp  BKLite # the server".into(),
                    addr: "10.0.0.5".parse().unwrap()
                },
                HostsLine {
                    number: 4,
                    text: "fe80::1%eth0 bklite".into(),
                    addr: "fe80::1".parse().unwrap()
                },
            ]
        );
        assert!(hosts_lines(text, "bklite.invalid").is_empty());
    }

    #[test]
    fn resolv_conf_as_glibc_reads_it() {
        let rc = parse_resolv(
            "# generated\ndomain old.example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0 ; x\nnameserver bogus\nnameserver 10.0.0.3\nnameserver 10.0.0.4\nsearch corp.example lab.example\noptions timeout:1 ndots:2 rotate\n",
        );
        assert_eq!(
            rc.nameservers,
            ["10.0.0.2", "fe80::1", "10.0.0.3"]
                .map(|a| a.parse::<IpAddr>().unwrap())
                .to_vec()
        );
        assert!(!rc.default_nameserver);
        assert_eq!(rc.search, ["corp.example", "lab.example"]);
        assert_eq!(rc.ndots, 2);
        assert_eq!(
            rc.candidates("bklite.server"),
            [
                "bklite.server.corp.example",
                "bklite.server.lab.example",
                "bklite.server"
            ]
        );
        assert_eq!(
            rc.candidates("a.b.c"),
            ["a.b.c", "a.b.c.corp.example", "a.b.c.lab.example"]
        );
        assert_eq!(rc.candidates("Abs.Name."), ["abs.name"]);

        let empty = parse_resolv("search\n");
        assert!(empty.default_nameserver);
        assert_eq!(empty.nameservers, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(empty.candidates("bklite"), ["bklite"]);
    }

    #[tokio::test]
    async fn a_live_nameserver_on_loopback_is_asked_in_the_search_order() {
        let port = nameserver("bklite.corp.example").await;
        let rc = parse_resolv("nameserver 127.0.0.1\nsearch corp.example\n");
        let answers = ask_all(&rc, "bklite", port, QUERY_TIMEOUT).await;
        assert_eq!(answers.len(), 1);
        assert_eq!(
            answers[0].describe(),
            "nameserver 127.0.0.1: bklite.corp.example → 10.0.0.5 (asked bklite.corp.example, bklite)"
        );
        let answers = ask_all(&rc, "nope.invalid", port, QUERY_TIMEOUT).await;
        assert_eq!(answers[0].outcome, Outcome::NxDomain);
        assert_eq!(answers[0].name, "nope.invalid");
    }

    #[tokio::test]
    async fn a_silent_or_absent_nameserver_is_bounded() {
        // Bound but never answering: the query's time runs out.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let t0 = std::time::Instant::now();
        let o = query(
            SocketAddr::from(([127, 0, 0, 1], port)),
            "x.invalid",
            A,
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(o, Outcome::Timeout);
        assert!(t0.elapsed() < Duration::from_secs(1));
        // Nothing bound: loopback says port unreachable at once.
        drop(silent);
        let o = query(SocketAddr::from(([127, 0, 0, 1], port)), "x.invalid", A, QUERY_TIMEOUT).await;
        assert!(matches!(o, Outcome::SendError(_)), "{o:?}");
    }

    #[tokio::test]
    async fn evidence_names_the_hosts_line_the_conf_and_each_answer() {
        let dir = tempfile::tempdir().unwrap();
        let port = nameserver("bklite.corp.example").await;
        std::fs::write(dir.path().join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        let src = Sources {
            hosts: dir.path().join("hosts"),
            resolv_conf: dir.path().join("resolv.conf"),
            dns_port: port,
        };
        let ev = evidence(&src, "bklite.invalid").await;
        let d = dir.path().display();
        assert_eq!(
            ev,
            [
                format!("{d}/hosts: no entry for bklite.invalid"),
                format!("{d}/resolv.conf: nameserver 127.0.0.1"),
                "nameserver 127.0.0.1: bklite.invalid → NXDOMAIN (no such name)".to_string(),
            ]
        );
    }
}
