//! Manifests and indexes (OCI and Docker v2), and picking the linux/amd64
//! image out of an index.

use serde::{Deserialize, Serialize};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_V1_PREFIX: &str = "application/vnd.docker.distribution.manifest.v1";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What the client accepts from a manifest endpoint.
pub const ACCEPT: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The platform banger runs.
pub const WANT_OS: &str = "linux";
pub const WANT_ARCH: &str = "amd64";

/// A pointer to a blob or a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Foreign / non-distributable layers live elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The fields of either an index or a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
}

/// An image manifest: one platform's config and layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a manifest endpoint returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Index(Vec<Descriptor>),
    Manifest(ImageManifest),
}

/// The parts of an image config banger checks.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
}

/// The container part of an image config: its labels.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerConfig {
    #[serde(default, rename = "Labels")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the registry's manifest is not valid JSON: {0}")]
    Json(String),
    #[error(
        "{0} is a Docker schema 1 manifest, which is deprecated and unsupported: push the image again with a current docker or skopeo"
    )]
    SchemaV1(String),
    #[error("unsupported manifest type {0:?}: expected an OCI or Docker v2 image or index")]
    UnsupportedType(String),
    #[error("the manifest has neither layers nor manifests")]
    Empty,
    #[error(
        "the index has no linux/amd64 image (it has: {available}); banger runs linux/amd64 guests"
    )]
    NoPlatform { available: String },
    #[error(
        "config media type {0:?} is not a container image config: this artifact is not a container image"
    )]
    NotAnImage(String),
    #[error("layer {digest} has media type {media_type:?}, which is not a filesystem layer")]
    UnsupportedLayer { digest: String, media_type: String },
    #[error(
        "layer {0} is a foreign (non-distributable) layer hosted elsewhere; banger does not fetch those"
    )]
    ForeignLayer(String),
    #[error("digest {0:?} is not a sha256 digest")]
    BadDigest(String),
}

/// Parses a manifest endpoint's body. `content_type` is the response's
/// `Content-Type`, used when the body does not name its own media type.
pub fn parse(body: &[u8], content_type: Option<&str>) -> Result<Fetched, ManifestError> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| ManifestError::Json(e.to_string()))?;
    let media_type = raw
        .media_type
        .clone()
        .or_else(|| {
            content_type
                .map(|c| c.split(';').next().unwrap_or(c).trim().to_owned())
                .filter(|c| c != "application/json" && !c.is_empty())
        })
        .unwrap_or_default();
    if media_type.starts_with(DOCKER_V1_PREFIX) || raw.schema_version == Some(1) {
        return Err(ManifestError::SchemaV1(media_type));
    }
    match (media_type.as_str(), raw.manifests, raw.layers, raw.config) {
        (OCI_INDEX | DOCKER_LIST | "", Some(m), None, _) => {
            for d in &m {
                check_digest(&d.digest)?;
            }
            Ok(Fetched::Index(m))
        }
        (OCI_MANIFEST | DOCKER_MANIFEST | "", None, Some(layers), Some(config)) => {
            check_digest(&config.digest)?;
            if !matches!(config.media_type.as_str(), OCI_CONFIG | DOCKER_CONFIG | "") {
                return Err(ManifestError::NotAnImage(config.media_type));
            }
            for l in &layers {
                check_digest(&l.digest)?;
                check_layer(l)?;
            }
            Ok(Fetched::Manifest(ImageManifest {
                media_type: if media_type.is_empty() {
                    OCI_MANIFEST.to_owned()
                } else {
                    media_type
                },
                config,
                layers,
            }))
        }
        ("", None, None, _) => Err(ManifestError::Empty),
        (other, ..) => Err(ManifestError::UnsupportedType(other.to_owned())),
    }
}

fn check_digest(d: &str) -> Result<(), ManifestError> {
    match d.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        _ => Err(ManifestError::BadDigest(d.to_owned())),
    }
}

fn check_layer(l: &Descriptor) -> Result<(), ManifestError> {
    let mt = l.media_type.as_str();
    if mt.contains("foreign") || mt.contains("nondistributable") || !l.urls.is_empty() {
        return Err(ManifestError::ForeignLayer(l.digest.clone()));
    }
    let ok = mt.is_empty()
        || mt.starts_with("application/vnd.oci.image.layer.v1.tar")
        || mt.starts_with("application/vnd.docker.image.rootfs.diff.tar");
    if ok {
        Ok(())
    } else {
        Err(ManifestError::UnsupportedLayer {
            digest: l.digest.clone(),
            media_type: mt.to_owned(),
        })
    }
}

/// The linux/amd64 image of an index: with a variant preferred least
/// (amd64 has none in practice), attestation manifests skipped.
pub fn select_platform(manifests: &[Descriptor]) -> Result<&Descriptor, ManifestError> {
    manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == WANT_OS && p.architecture == WANT_ARCH)
        })
        .min_by_key(|d| {
            d.platform
                .as_ref()
                .and_then(|p| p.variant.as_deref())
                .map_or(0, |v| if v == "v1" { 1 } else { 2 })
        })
        .ok_or_else(|| {
            let mut available: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(ToString::to_string)
                .collect();
            available.dedup();
            ManifestError::NoPlatform {
                available: if available.is_empty() {
                    "no platforms listed".to_owned()
                } else {
                    available.join(", ")
                },
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> String {
        let m: Vec<serde_json::Value> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = (*v).into();
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": digest(char::from(b'a' + i as u8)),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": m}).to_string()
    }

    #[test]
    fn picks_linux_amd64_from_an_index() {
        let body = index(&[
            ("linux", "arm64", Some("v8")),
            ("unknown", "unknown", None),
            ("linux", "amd64", None),
            ("windows", "amd64", None),
        ]);
        let Fetched::Index(m) = parse(body.as_bytes(), None).unwrap() else {
            panic!("not an index");
        };
        assert_eq!(select_platform(&m).unwrap().digest, digest('c'));
    }

    #[test]
    fn prefers_no_variant_then_v1() {
        let body = index(&[("linux", "amd64", Some("v3")), ("linux", "amd64", None)]);
        let Fetched::Index(m) = parse(body.as_bytes(), Some(OCI_INDEX)).unwrap() else {
            panic!()
        };
        assert_eq!(select_platform(&m).unwrap().digest, digest('b'));
    }

    #[test]
    fn no_amd64_names_what_there_is() {
        let body = index(&[
            ("linux", "arm64", Some("v8")),
            ("linux", "s390x", None),
            ("unknown", "unknown", None),
        ]);
        let Fetched::Index(m) = parse(body.as_bytes(), None).unwrap() else {
            panic!()
        };
        let e = select_platform(&m).unwrap_err().to_string();
        assert!(e.contains("no linux/amd64"), "{e}");
        assert!(e.contains("linux/arm64/v8, linux/s390x"), "{e}");
    }

    #[test]
    fn docker_list_and_manifest() {
        let list = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_LIST,
            "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": digest('1'), "size": 5,
                           "platform": {"os": "linux", "architecture": "amd64"}}]
        });
        assert!(matches!(
            parse(list.to_string().as_bytes(), None).unwrap(),
            Fetched::Index(_)
        ));
        // No mediaType in the body: the Content-Type decides.
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": DOCKER_CONFIG, "digest": digest('2'), "size": 10},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": digest('3'), "size": 20}]
        });
        let Fetched::Manifest(im) = parse(
            m.to_string().as_bytes(),
            Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(im.media_type, DOCKER_MANIFEST);
        assert_eq!(im.layers.len(), 1);
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        let v1 = r#"{"schemaVersion": 1, "name": "x", "fsLayers": []}"#;
        assert!(matches!(
            parse(v1.as_bytes(), None),
            Err(ManifestError::SchemaV1(_))
        ));
        let helm = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": digest('2'), "size": 1},
            "layers": []
        });
        assert!(matches!(
            parse(helm.to_string().as_bytes(), None),
            Err(ManifestError::NotAnImage(_))
        ));
        let foreign = serde_json::json!({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": digest('2'), "size": 1},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                        "digest": digest('3'), "size": 1, "urls": ["https://x"]}]
        });
        assert!(matches!(
            parse(foreign.to_string().as_bytes(), None),
            Err(ManifestError::ForeignLayer(_))
        ));
        let bad_digest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": "sha256:../../x", "size": 1},
            "layers": []
        });
        assert!(matches!(
            parse(bad_digest.to_string().as_bytes(), None),
            Err(ManifestError::BadDigest(_))
        ));
        assert!(matches!(
            parse(b"not json", None),
            Err(ManifestError::Json(_))
        ));
    }
}
