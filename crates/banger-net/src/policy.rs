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
    /// Only these destinations (and banger's DNS); everything else dropped.
    Allow(Vec<Allow>),
}

/// One `allow=` entry: `CIDR`, `:PORT` or `CIDR:PORT` (ports are TCP and
/// UDP). An entry naming a network may reach it even inside the private
/// ranges host protection closes; a bare port never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow {
    pub net: Option<Ipv4Net>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{0:?} is not a network mode: use none, nat or allow=LIST")]
    Mode(String),
    #[error("allow= needs at least one entry (for no network at all, use none)")]
    Empty,
    #[error(
        "{0:?} is not an allow= entry: use a CIDR (203.0.113.0/24), an address, :PORT or CIDR:PORT"
    )]
    Entry(String),
    #[error(
        "{0:?} looks like a domain: allow= takes CIDRs and ports only so far (domains are not enforced yet)"
    )]
    Domain(String),
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
        if entry.chars().any(|c| c.is_ascii_alphabetic() || c == '*') {
            return Err(PolicyError::Domain(entry.to_owned()));
        }
        match entry.rsplit_once(':') {
            Some(("", port)) => Ok(Allow {
                net: None,
                port: Some(parse_port(port, entry)?),
            }),
            Some((net, port)) => Ok(Allow {
                net: Some(parse_net(net, entry)?),
                port: Some(parse_port(port, entry)?),
            }),
            None => Ok(Allow {
                net: Some(parse_net(entry, entry)?),
                port: None,
            }),
        }
    }
}

impl FromStr for Policy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Policy, PolicyError> {
        match s {
            "none" => Ok(Policy::None),
            "nat" => Ok(Policy::Nat),
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
        assert!(matches!(
            "allow=api.example.com".parse::<Policy>(),
            Err(PolicyError::Domain(_))
        ));
        assert!(matches!(
            "allow=*.example.org:443".parse::<Policy>(),
            Err(PolicyError::Domain(_))
        ));
    }
}
