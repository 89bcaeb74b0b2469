use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifier of one user-visible operation.
///
/// Minted at dispatch entry when the caller sent none, forwarded from the
/// daemon to the root helper, stamped on every error and every log line
/// produced while serving the request. Format: `op-` followed by 6 to 32
/// characters from `[a-z0-9]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OpId(String);

/// An op id sent by a caller that does not have the documented form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("op id {0:?} is not of the form op-[a-z0-9]{{6,32}}")]
pub struct OpIdError(String);

const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

impl OpId {
    /// A fresh random op id (`op-` + 6 characters, 36^6 possibilities).
    pub fn mint() -> Self {
        let suffix: String = (0..6)
            .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
            .collect();
        OpId(format!("op-{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl schemars::JsonSchema for OpId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OpId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": "^op-[a-z0-9]{6,32}$"})
    }
}

impl TryFrom<String> for OpId {
    type Error = OpIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = s.strip_prefix("op-").is_some_and(|rest| {
            (6..=32).contains(&rest.len()) && rest.bytes().all(|b| ALPHABET.contains(&b))
        });
        if ok { Ok(OpId(s)) } else { Err(OpIdError(s)) }
    }
}

impl std::str::FromStr for OpId {
    type Err = OpIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OpId::try_from(s.to_owned())
    }
}

impl From<OpId> for String {
    fn from(o: OpId) -> String {
        o.0
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_parse_back() {
        for _ in 0..100 {
            let id = OpId::mint();
            assert_eq!(id.as_str().parse::<OpId>().unwrap(), id);
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "op-",
            "op-abc",
            "OP-abcdef",
            "op-ABCDEF",
            "op-abc def",
            "xx-abcdef",
        ] {
            assert!(bad.parse::<OpId>().is_err(), "{bad} should be rejected");
        }
        let long = format!("op-{}", "a".repeat(33));
        assert!(long.parse::<OpId>().is_err());
    }
}
