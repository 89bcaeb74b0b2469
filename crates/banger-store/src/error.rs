//! Errors returned by the store, with user-facing messages.

use std::fmt;
use std::path::PathBuf;

use rusqlite::ffi;

/// The kind of record an error is about; displays as a lower-case noun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityKind {
    Image,
    Vm,
    PortForward,
    Operation,
    Snapshot,
}

impl EntityKind {
    /// The noun preceded by its indefinite article ("an image", "a VM").
    #[must_use]
    pub fn with_article(self) -> String {
        let article = match self {
            EntityKind::Image | EntityKind::Operation => "an",
            EntityKind::Vm | EntityKind::PortForward | EntityKind::Snapshot => "a",
        };
        format!("{article} {self}")
    }
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntityKind::Image => "image",
            EntityKind::Vm => "VM",
            EntityKind::PortForward => "port forward",
            EntityKind::Operation => "operation",
            EntityKind::Snapshot => "snapshot",
        })
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} named \"{name}\" already exists", .kind.with_article())]
    NameTaken { kind: EntityKind, name: String },

    #[error("{kind} \"{key}\" not found")]
    NotFound { kind: EntityKind, key: String },

    /// A unique resource (guest IP, MAC, vsock CID, host port, id) is already held.
    #[error("{0}")]
    Conflict(String),

    #[error("image \"{image}\" is still used by {}: {}; delete {} first",
        if .vms.len() == 1 { "VM" } else { "VMs" },
        .vms.join(", "),
        if .vms.len() == 1 { "it" } else { "them" })]
    ImageInUse { image: String, vms: Vec<String> },

    #[error("image \"{image}\" is kept by {}: {}; delete {} first (banger snapshot delete)",
        if .snapshots.len() == 1 { "snapshot" } else { "snapshots" },
        .snapshots.join(", "),
        if .snapshots.len() == 1 { "it" } else { "them" })]
    ImageKeptBySnapshots {
        image: String,
        snapshots: Vec<String>,
    },

    /// A value broke a CHECK rule of the schema (e.g. zero vCPUs).
    #[error("invalid {kind}: the database requires {rule}")]
    Invalid { kind: EntityKind, rule: String },

    #[error("path {0:?} is not valid UTF-8; banger stores paths as text")]
    NonUtf8Path(PathBuf),

    #[error(
        "database schema version {found} is newer than this banger understands \
         (latest {supported}); upgrade banger"
    )]
    SchemaTooNew { found: usize, supported: usize },

    #[error("database {path:?} did not switch to WAL journal mode (got \"{mode}\")")]
    NoWal { path: PathBuf, mode: String },

    #[error("could not create database directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("could not open database {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error("could not migrate the database schema")]
    Migration(#[from] rusqlite_migration::Error),

    #[error("could not encode a JSON column")]
    Json(#[from] serde_json::Error),

    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// True for [`StoreError::NotFound`].
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// A constraint failure reported by SQLite, classified.
#[derive(Debug)]
pub(crate) enum Violation {
    /// UNIQUE or PRIMARY KEY; holds the `table.column` list from the message.
    Unique(Vec<String>),
    ForeignKey,
    /// CHECK; holds the failing expression.
    Check(String),
}

/// Classifies a rusqlite error as a constraint violation, if it is one.
pub(crate) fn violation(err: &rusqlite::Error) -> Option<Violation> {
    let rusqlite::Error::SqliteFailure(e, msg) = err else {
        return None;
    };
    let msg = msg.as_deref().unwrap_or_default();
    match e.extended_code {
        ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
            let cols = msg
                .strip_prefix("UNIQUE constraint failed: ")
                .map(|rest| rest.split(", ").map(str::to_owned).collect())
                .unwrap_or_default();
            Some(Violation::Unique(cols))
        }
        ffi::SQLITE_CONSTRAINT_FOREIGNKEY => Some(Violation::ForeignKey),
        ffi::SQLITE_CONSTRAINT_CHECK => Some(Violation::Check(
            msg.strip_prefix("CHECK constraint failed: ")
                .unwrap_or(msg)
                .to_owned(),
        )),
        _ => None,
    }
}
