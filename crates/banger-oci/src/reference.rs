//! Image references (`docker.io/library/python:3.12-slim`,
//! `127.0.0.1:5000/team/app@sha256:…`), normalised like Docker does.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, `[::1]:5000`.
    pub registry: String,
    /// `library/python`, `team/app`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>`, when the reference pins one.
    pub digest: Option<String>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not an image reference: {reason} \
     (expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. docker.io/library/alpine:3.20)"
)]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

impl Reference {
    /// The tag or digest to ask the registry's manifest endpoint for.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host (and port) that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The registry's host without its port (IPv6 without brackets).
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// Whether Docker would talk plain HTTP to this registry on its own:
    /// `localhost` and loopback addresses.
    pub fn is_loopback(&self) -> bool {
        let host = self.host();
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

/// `host:port` → `host`; `[::1]:5000` → `::1`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// Whether `s` should be read as an image reference rather than an image
/// name: it has a `/`, a `:` or an `@`.
pub fn looks_like_reference(s: &str) -> bool {
    s.contains(['/', ':', '@'])
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ReferenceError {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.is_empty() {
            return Err(err("it is empty"));
        }
        if input.len() > 1024 || input.contains(char::is_whitespace) {
            return Err(err("it is too long or contains whitespace"));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (input, None),
        };
        if let Some(d) = digest {
            let Some(hex) = d.strip_prefix("sha256:") else {
                return Err(err("only sha256 digests are supported"));
            };
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err("a sha256 digest is 64 hex digits"));
            }
        }
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(err(&format!(
                "tag {t:?} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -"
            )));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':']) || first == "localhost" || first.starts_with('[') =>
            {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
            _ => registry,
        };
        if !valid_registry(&registry) {
            return Err(err(&format!("registry {registry:?} is not a host[:port]")));
        }
        if path.is_empty() {
            return Err(err("the repository name is missing"));
        }
        for component in path.split('/') {
            if !valid_component(component) {
                return Err(err(&format!(
                    "repository component {component:?} must be lowercase letters and digits, \
                     separated by '.', '_', '__' or '-'"
                )));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && !t.starts_with(['.', '-'])
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn valid_registry(r: &str) -> bool {
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, p)) => {
                if h.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, p.strip_prefix(':').map(Some).unwrap_or(Some("")))
            }
            None => return false,
        }
    } else {
        match r.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(r), None),
        }
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    });
    let port_ok = match port {
        None => true,
        Some("") => r.ends_with(']'),
        Some(p) => p.parse::<u16>().is_ok_and(|n| n > 0),
    };
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = parse("alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");

        let r = parse("python:3.12-slim");
        assert_eq!(r.to_string(), "docker.io/library/python:3.12-slim");
        assert_eq!(r.manifest_ref(), "3.12-slim");

        assert_eq!(
            parse("docker.io/library/python:3.12-slim").to_string(),
            "docker.io/library/python:3.12-slim"
        );
        assert_eq!(
            parse("index.docker.io/grafana/grafana").to_string(),
            "docker.io/grafana/grafana:latest"
        );
        // A user's repository on the Hub keeps its namespace.
        assert_eq!(parse("me/app:1").repository, "me/app");
    }

    #[test]
    fn other_registries_ports_and_digests() {
        let r = parse("127.0.0.1:5000/test/img:1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/img");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert!(r.is_loopback());
        assert_eq!(r.api_host(), "127.0.0.1:5000");

        let d = format!("sha256:{}", "ab".repeat(32));
        let r = parse(&format!("ghcr.io/o/r@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_ref(), d);
        assert!(!r.is_loopback());

        let r = parse(&format!("localhost:5000/a:t@{d}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert!(r.is_loopback());
        assert!(parse("localhost/a").is_loopback());
        assert!(parse("[::1]:5000/a").is_loopback());
        assert_eq!(parse("[::1]:5000/a").host(), "::1");
        assert!(!parse("quay.io/a/b").is_loopback());
        assert!(!parse("127.example.com/a").is_loopback());
    }

    #[test]
    fn bad_references_say_why() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "alpine@sha256:123",
            "alpine@md5:0123",
            "a b",
            "reg:99999/a",
            "reg.io/",
            "reg.io//a",
            "a/-b",
            "a__-b",
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert!(e.to_string().contains("is not an image reference"), "{e}");
        }
        let e = "Alpine".parse::<Reference>().unwrap_err().to_string();
        assert!(e.contains("lowercase"), "{e}");
    }

    #[test]
    fn names_and_references() {
        assert!(!looks_like_reference("debian-12"));
        assert!(looks_like_reference("alpine:3.20"));
        assert!(looks_like_reference("docker.io/library/alpine"));
        assert!(valid_component("a__b"));
        assert!(valid_component("a--b.c_d"));
        assert!(!valid_component("a..b"));
    }
}
