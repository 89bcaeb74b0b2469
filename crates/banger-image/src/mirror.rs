//! Finding the Debian mirror the host's APT is configured with.
//!
//! Images are bootstrapped from the mirror the host already uses (often a
//! local cache or a corporate mirror), falling back to the recipe's default.
//! Both source formats are read: one-line `*.list` files and deb822
//! `*.sources` files, in APT's order (`sources.list` first, then
//! `sources.list.d/` sorted by name).

use std::path::{Path, PathBuf};

/// Suite names that identify an entry as the Debian archive (codenames and
/// the release-class aliases). Entries for other archives, even with Debian
/// codenames as suites (Docker's, for instance), carry no `main` component
/// or use other suites, so together with the `main` check this is a good
/// enough identification without network access.
const DEBIAN_SUITES: &[&str] = &[
    "jessie",
    "stretch",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
    "experimental",
];

/// Suffixes of suites served by the same archive as their base suite.
const SAME_ARCHIVE_SUFFIXES: &[&str] = &["-updates", "-backports", "-proposed-updates"];

/// One entry (line or stanza) of an APT sources file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// `deb` and/or `deb-src`.
    pub types: Vec<String>,
    /// Repository URIs, without a trailing slash.
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// False for deb822 stanzas with `Enabled: no`.
    pub enabled: bool,
}

/// A mirror found in the host's configuration, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMirror {
    pub uri: String,
    pub source_file: PathBuf,
}

/// Parses one-line format (`deb [opts] URI SUITE COMPONENT...`) text.
/// Malformed lines are skipped, as APT would refuse them anyway.
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    text.lines().filter_map(parse_one_line_entry).collect()
}

fn parse_one_line_entry(line: &str) -> Option<AptSource> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return None;
    }
    let (kind, rest) = line.split_once(char::is_whitespace)?;
    if kind != "deb" && kind != "deb-src" {
        return None;
    }
    let mut rest = rest.trim_start();
    if let Some(after_bracket) = rest.strip_prefix('[') {
        let (_options, after) = after_bracket.split_once(']')?;
        rest = after.trim_start();
    }
    let mut words = rest.split_whitespace();
    let uri = words.next()?;
    let suite = words.next()?;
    Some(AptSource {
        types: vec![kind.to_owned()],
        uris: vec![normalize_uri(uri)],
        suites: vec![suite.to_owned()],
        components: words.map(str::to_owned).collect(),
        enabled: true,
    })
}

/// Parses deb822 format (`Types:`, `URIs:`, `Suites:`, `Components:`,
/// `Enabled:` fields in blank-line separated stanzas).
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !fields.is_empty() {
                out.extend(stanza_to_source(&fields));
                fields.clear();
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // Continuation of the previous field.
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    out
}

fn stanza_to_source(fields: &[(String, String)]) -> Option<AptSource> {
    let get = |name: &str| -> Vec<String> {
        fields
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    let enabled = fields
        .iter()
        .find(|(n, _)| n == "enabled")
        .is_none_or(|(_, v)| !v.eq_ignore_ascii_case("no"));
    let uris: Vec<String> = get("uris").iter().map(|u| normalize_uri(u)).collect();
    if uris.is_empty() {
        return None;
    }
    Some(AptSource {
        types: get("types"),
        uris,
        suites: get("suites"),
        components: get("components"),
        enabled,
    })
}

fn normalize_uri(uri: &str) -> String {
    uri.trim_end_matches('/').to_owned()
}

/// The base suite an archive suite belongs to (`bookworm-updates` ->
/// `bookworm`), or `None` for suites served by another archive
/// (`bookworm-security`) or not Debian's at all.
fn debian_base_suite(suite: &str) -> Option<&str> {
    let base = SAME_ARCHIVE_SUFFIXES
        .iter()
        .find_map(|suffix| suite.strip_suffix(suffix))
        .unwrap_or(suite);
    DEBIAN_SUITES.contains(&base).then_some(base)
}

fn usable_scheme(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:/")
}

/// Picks the Debian archive URI to bootstrap `suite` from: the first enabled
/// binary entry carrying that suite, else the first entry of any Debian
/// suite (every full mirror carries every suite).
pub fn pick_debian_mirror(sources: &[AptSource], suite: &str) -> Option<String> {
    let candidates = || {
        sources
            .iter()
            .filter(|s| s.enabled && s.types.iter().any(|t| t == "deb"))
            .filter(|s| s.components.iter().any(|c| c == "main"))
    };
    let exact = candidates().find_map(|s| {
        s.suites
            .iter()
            .any(|x| debian_base_suite(x) == Some(suite))
            .then(|| s.uris.iter().find(|u| usable_scheme(u)))
            .flatten()
    });
    exact
        .or_else(|| {
            candidates().find_map(|s| {
                s.suites
                    .iter()
                    .any(|x| debian_base_suite(x).is_some())
                    .then(|| s.uris.iter().find(|u| usable_scheme(u)))
                    .flatten()
            })
        })
        .cloned()
}

/// The files APT reads under `apt_dir` (normally `/etc/apt`), in APT's order.
fn source_files(apt_dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(entries) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut extra: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|ext| ext == "list" || ext == "sources")
            })
            .collect();
        extra.sort();
        files.extend(extra);
    }
    files
}

/// Finds the Debian mirror configured under `apt_dir` for `suite`, as
/// [`pick_debian_mirror`] chooses it, over all source files together.
pub fn find_debian_mirror(apt_dir: &Path, suite: &str) -> Option<HostMirror> {
    let mut all: Vec<(AptSource, PathBuf)> = Vec::new();
    for file in source_files(apt_dir) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let parsed = if file.extension().is_some_and(|e| e == "sources") {
            parse_deb822(&text)
        } else {
            parse_one_line(&text)
        };
        all.extend(parsed.into_iter().map(|s| (s, file.clone())));
    }
    let sources: Vec<AptSource> = all.iter().map(|(s, _)| s.clone()).collect();
    let uri = pick_debian_mirror(&sources, suite)?;
    let source_file = all
        .iter()
        .find(|(s, _)| s.uris.contains(&uri))
        .map(|(_, f)| f.clone())?;
    Some(HostMirror { uri, source_file })
}

/// The host's Debian mirror for `suite`, from `/etc/apt`.
pub fn host_debian_mirror(suite: &str) -> Option<HostMirror> {
    find_debian_mirror(Path::new("/etc/apt"), suite)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_LINE: &str = "\
# comment line
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/docker.gpg] https://download.docker.com/linux/debian bookworm stable
deb-src http://src.example/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb [ arch=amd64 ] http://mirror.example.org/debian/ bookworm main contrib # trailing
";

    const DEB822: &str = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
";

    #[test]
    fn one_line_parses_options_and_comments() {
        let parsed = parse_one_line(ONE_LINE);
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[1].uris, ["https://download.docker.com/linux/debian"]);
        assert_eq!(parsed[1].components, ["stable"]);
        assert_eq!(parsed[2].types, ["deb-src"]);
        assert_eq!(parsed[4].uris, ["http://mirror.example.org/debian"]);
        assert_eq!(parsed[4].components, ["main", "contrib"]);
    }

    #[test]
    fn one_line_picks_debian_main_not_docker_nor_security() {
        let parsed = parse_one_line(ONE_LINE);
        assert_eq!(
            pick_debian_mirror(&parsed, "bookworm").as_deref(),
            Some("http://mirror.example.org/debian")
        );
    }

    #[test]
    fn deb822_parses_stanzas_and_skips_security() {
        let parsed = parse_deb822(DEB822);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].suites, ["bookworm", "bookworm-updates"]);
        assert_eq!(
            pick_debian_mirror(&parsed, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
    }

    #[test]
    fn deb822_honours_enabled_no_and_continuations() {
        let text = "\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

types: deb
uris:
 http://second.example/debian/
suites: trixie
components: main
";
        let parsed = parse_deb822(text);
        assert_eq!(parsed.len(), 2);
        assert!(!parsed[0].enabled);
        assert_eq!(parsed[1].uris, ["http://second.example/debian"]);
        // No enabled bookworm entry: any Debian suite's mirror carries bookworm.
        assert_eq!(
            pick_debian_mirror(&parsed, "bookworm").as_deref(),
            Some("http://second.example/debian")
        );
    }

    #[test]
    fn exact_suite_is_preferred_over_other_debian_suites() {
        let text = "deb http://trixie.example/debian trixie main\n\
                    deb http://bookworm.example/debian bookworm-updates main\n";
        let parsed = parse_one_line(text);
        assert_eq!(
            pick_debian_mirror(&parsed, "bookworm").as_deref(),
            Some("http://bookworm.example/debian")
        );
    }

    #[test]
    fn nothing_debian_yields_none() {
        let text = "deb https://deb.nodesource.com/node_20.x nodistro main\n\
                    deb cdrom:[Debian]/ bookworm main\n";
        assert_eq!(pick_debian_mirror(&parse_one_line(text), "bookworm"), None);
    }

    #[test]
    fn find_reads_apt_dir_in_apt_order_and_ignores_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sources.list.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("zz.list"),
            "deb http://late.example/debian bookworm main\n",
        )
        .unwrap();
        std::fs::write(d.join("debian.sources"), DEB822).unwrap();
        std::fs::write(
            d.join("aa.list.disabled-by-farm"),
            "deb http://disabled.example/debian bookworm main\n",
        )
        .unwrap();
        let found = find_debian_mirror(dir.path(), "bookworm").unwrap();
        assert_eq!(found.uri, "http://deb.debian.org/debian");
        assert_eq!(found.source_file, d.join("debian.sources"));

        // sources.list comes before sources.list.d.
        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://first.example/debian/ stable main\n",
        )
        .unwrap();
        // `stable` is not the exact suite: the exact bookworm entry wins.
        assert_eq!(
            find_debian_mirror(dir.path(), "bookworm").unwrap().uri,
            "http://deb.debian.org/debian"
        );
        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://first.example/debian/ bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            find_debian_mirror(dir.path(), "bookworm").unwrap().uri,
            "http://first.example/debian"
        );
    }
}
