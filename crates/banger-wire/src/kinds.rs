//! The kinds every layer shares: the same enum in the store's rows, the
//! VMM driver, the handles file and the wire (spelled the same in each).

/// A value that is not one of a kind's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?} (expected one of: {})", expected.join(", "))]
pub struct ParseKindError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static [&'static str],
}

/// Defines a fieldless enum spelled as text, the same in the database, on
/// the wire and on the command line: `ALL`, `as_str`, `FromStr` (a
/// [`ParseKindError`] naming the spellings it expected), `Display` and
/// serde. The wire's kinds add `#[derive(schemars::JsonSchema)]`; the
/// store's add their SQL conversions around it.
#[macro_export]
macro_rules! kind {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling in the database, on the wire and on the command line.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::ParseKindError;

            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::ParseKindError {
                        what: $what,
                        value: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

kind! {
    /// The virtual machine monitor that runs a VM.
    #[derive(schemars::JsonSchema)]
    Vmm, "VMM" {
        Qemu => "qemu",
        Firecracker => "firecracker",
    }
}

kind! {
    /// How the guest's userspace starts.
    #[derive(schemars::JsonSchema)]
    InitMode, "init mode" {
        /// banger's own minimal init: boots fastest.
        Fast => "fast",
        /// The image's systemd.
        Systemd => "systemd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_strangers_are_named() {
        for v in Vmm::ALL {
            assert_eq!(v.as_str().parse::<Vmm>().unwrap(), *v);
            assert_eq!(serde_json::to_string(v).unwrap(), format!("\"{v}\""));
        }
        for m in InitMode::ALL {
            assert_eq!(m.as_str().parse::<InitMode>().unwrap(), *m);
        }
        assert_eq!(
            "kvmtool".parse::<Vmm>().unwrap_err().to_string(),
            "unknown VMM \"kvmtool\" (expected one of: qemu, firecracker)"
        );
    }
}
