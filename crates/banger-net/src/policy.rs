//! A VM's network policy (`--net MODE`), as the daemon stores it and the
//! helper enforces it in the tap's guard chain ([`crate::guard`]).

use std::fmt;
use std::str::FromStr;

use ipnet::Ipv4Net;

/// What a guest may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Nothing over the network (the agent channel is not a network).
    None,
    /// The internet through NAT (host protection still applies).
    Nat,
    /// As `nat`, recording each new TCP/UDP destination and each name
    /// resolved, for [`suggest`].
    Learn,
    /// Only these destinations (and banger's DNS); everything else dropped.
    Allow(Vec<Allow>),
}

/// One `allow=` entry: `CIDR`, `:PORT`, `CIDR:PORT`, `DOMAIN` or
/// `DOMAIN:PORT` (ports are TCP and UDP). An entry naming a network may
/// reach it even inside the private ranges host protection closes; a bare
/// port or a domain never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub net: Option<Ipv4Net>,
    pub domain: Option<Domain>,
    pub port: Option<u16>,
}

/// `api.example.com`, or `*.example.org` (any name below it, not itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Lowercase, no trailing dot.
    pub name: String,
    pub wildcard: bool,
}

impl Domain {
    fn parse(s: &str, entry: &str) -> Result<Domain, PolicyError> {
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !name.contains('.') || !name.split('.').all(label_ok) {
            return Err(PolicyError::Entry(entry.to_owned()));
        }
        Ok(Domain { name, wildcard })
    }

    /// Whether `qname` (lowercase, no trailing dot) is this domain.
    pub fn matches(&self, qname: &str) -> bool {
        if self.wildcard {
            qname
                .strip_suffix(self.name.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.'))
        } else {
            qname == self.name
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl Policy {
    /// The ports a name may be reached on under this policy: `None` when
    /// the name is not allowed (or the policy restricts nothing by name:
    /// `nat`), `Some([None])` for any port.
    pub fn ports_for(&self, qname: &str) -> Option<Vec<Option<u16>>> {
        let Policy::Allow(entries) = self else {
            return None;
        };
        let ports: Vec<Option<u16>> = entries
            .iter()
            .filter(|e| e.domain.as_ref().is_some_and(|d| d.matches(qname)))
            .map(|e| e.port)
            .collect();
        (!ports.is_empty()).then_some(ports)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{0:?} is not a network mode: use none, nat, learn or allow=LIST")]
    Mode(String),
    #[error("allow= needs at least one entry (for no network at all, use none)")]
    Empty,
    #[error(
        "{0:?} is not an allow= entry: use a CIDR (203.0.113.0/24), an address, a domain (api.example.com, *.example.org), :PORT, or one of them with :PORT"
    )]
    Entry(String),
}

fn parse_port(s: &str, entry: &str) -> Result<u16, PolicyError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PolicyError::Entry(entry.to_owned())),
    }
}

fn parse_net(s: &str, entry: &str) -> Result<Ipv4Net, PolicyError> {
    let net = if s.contains('/') {
        s.parse::<Ipv4Net>().ok()
    } else {
        s.parse::<std::net::Ipv4Addr>().ok().map(Ipv4Net::from)
    };
    net.map(|n| n.trunc())
        .ok_or_else(|| PolicyError::Entry(entry.to_owned()))
}

impl FromStr for Allow {
    type Err = PolicyError;
    fn from_str(entry: &str) -> Result<Allow, PolicyError> {
        let (target, port) = match entry.rsplit_once(':') {
            Some((target, port)) => (target, Some(parse_port(port, entry)?)),
            None => (entry, None),
        };
        let (net, domain) = if target.is_empty() {
            if port.is_none() {
                return Err(PolicyError::Entry(entry.to_owned()));
            }
            (None, None)
        } else if target.chars().any(|c| c.is_ascii_alphabetic() || c == '*') {
            (None, Some(Domain::parse(target, entry)?))
        } else {
            (Some(parse_net(target, entry)?), None)
        };
        Ok(Allow { net, domain, port })
    }
}

impl FromStr for Policy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Policy, PolicyError> {
        match s {
            "none" => Ok(Policy::None),
            "nat" => Ok(Policy::Nat),
            "learn" => Ok(Policy::Learn),
            _ => {
                let list = s
                    .strip_prefix("allow=")
                    .ok_or_else(|| PolicyError::Mode(s.to_owned()))?;
                let entries = list
                    .split(',')
                    .filter(|e| !e.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<Allow>, _>>()?;
                if entries.is_empty() {
                    return Err(PolicyError::Empty);
                }
                Ok(Policy::Allow(entries))
            }
        }
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(net) = self.net {
            if net.prefix_len() == 32 {
                write!(f, "{}", net.addr())?;
            } else {
                write!(f, "{net}")?;
            }
        }
        if let Some(d) = &self.domain {
            write!(f, "{d}")?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// The canonical form, which parses back to the same policy.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::None => f.write_str("none"),
            Policy::Nat => f.write_str("nat"),
            Policy::Learn => f.write_str("learn"),
            Policy::Allow(entries) => {
                f.write_str("allow=")?;
                for (i, e) in entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

/// The `allow=` list that would have let through exactly `used` (address,
/// port), naming an address by the names it was resolved from (`names`)
/// where it was; `none` when nothing was used.
pub fn suggest(
    used: &[(std::net::Ipv4Addr, u16)],
    names: &std::collections::BTreeMap<std::net::Ipv4Addr, std::collections::BTreeSet<String>>,
) -> Policy {
    let mut entries: Vec<Allow> = Vec::new();
    for (addr, port) in used {
        let targets: Vec<Allow> = match names.get(addr) {
            Some(ns) if !ns.is_empty() => ns
                .iter()
                .filter_map(|n| Domain::parse(n, n).ok())
                .map(|d| Allow {
                    net: None,
                    domain: Some(d),
                    port: Some(*port),
                })
                .collect(),
            _ => vec![Allow {
                net: Some(Ipv4Net::from(*addr)),
                domain: None,
                port: Some(*port),
            }],
        };
        for t in targets {
            if !entries.contains(&t) {
                entries.push(t);
            }
        }
    }
    if entries.is_empty() {
        Policy::None
    } else {
        Policy::Allow(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonically() {
        for (given, canonical) in [
            ("none", "none"),
            ("nat", "nat"),
            ("allow=:443", "allow=:443"),
            ("allow=203.0.113.9", "allow=203.0.113.9"),
            ("allow=203.0.113.9/24,:53", "allow=203.0.113.0/24,:53"),
            ("allow=10.0.0.0/8:22,", "allow=10.0.0.0/8:22"),
            (
                "allow=API.example.com:443,*.example.org",
                "allow=api.example.com:443,*.example.org",
            ),
        ] {
            let p: Policy = given.parse().unwrap();
            assert_eq!(p.to_string(), canonical, "{given}");
            assert_eq!(canonical.parse::<Policy>().unwrap(), p);
        }
    }

    #[test]
    fn refuses_what_it_cannot_enforce() {
        for bad in [
            "",
            "NAT",
            "allow",
            "allow=",
            "allow=,",
            "allow=:0",
            "allow=:65536",
            "allow=1.2.3.4/33",
            "allow=1.2.3:80",
            "allow=::1",
            "open",
        ] {
            assert!(bad.parse::<Policy>().is_err(), "{bad}");
        }
        for bad in [
            "allow=localhost",
            "allow=a..b",
            "allow=-a.b",
            "allow=*",
            "allow=a.*.b",
            "allow=x_y.com",
        ] {
            assert!(bad.parse::<Policy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn suggestions_name_what_was_resolved() {
        let a = std::net::Ipv4Addr::new(203, 0, 113, 7);
        let b = std::net::Ipv4Addr::new(198, 51, 100, 1);
        let mut names = std::collections::BTreeMap::new();
        names.insert(a, ["api.example.com".to_string()].into());
        let p = suggest(&[(a, 443), (b, 22), (a, 443)], &names);
        assert_eq!(p.to_string(), "allow=api.example.com:443,198.51.100.1:22");
        assert_eq!(suggest(&[], &names), Policy::None);
        assert_eq!("learn".parse::<Policy>().unwrap().to_string(), "learn");
    }

    #[test]
    fn names_and_their_ports() {
        let p: Policy = "allow=api.example.com:443,*.example.org,1.2.3.4"
            .parse()
            .unwrap();
        assert_eq!(p.ports_for("api.example.com"), Some(vec![Some(443)]));
        assert_eq!(p.ports_for("a.b.example.org"), Some(vec![None]));
        assert_eq!(p.ports_for("example.org"), None);
        assert_eq!(p.ports_for("xexample.org"), None);
        assert_eq!(p.ports_for("other.example.com"), None);
        assert_eq!(Policy::Nat.ports_for("api.example.com"), None);
    }
}
