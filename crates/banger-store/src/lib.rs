//! banger's SQLite store of **durable intent**.
//!
//! The store records what an image or a VM *is*: its name, image, VMM, sizes,
//! the addresses leased to it, the state the user asked for, and the journal
//! of long operations still in flight. That is everything that must survive a
//! daemon restart, a `kill -9` or a host reboot.
//!
//! It never records **transient** facts — pids, tap device names, loop
//! devices, open sockets. Those die with the process or the host, so a stored
//! copy could only go stale; the daemon rediscovers them at runtime and
//! reconciles them against the intent kept here.
//!
//! Leases are rows: a VM's guest IP, MAC and vsock CID are `UNIQUE` columns,
//! so an address held by one VM can never be handed to another, even by two
//! racing daemons.
//!
//! Every connection runs with `journal_mode=WAL`, `busy_timeout` 5 s,
//! `foreign_keys=ON` and `synchronous=NORMAL`; the schema is brought up to
//! date by numbered migrations (`migrations/*.sql`) on open.

mod error;
mod images;
mod journal;
mod migrations;
mod model;
mod secrets;
mod snapshots;
mod sql;
mod vms;
mod workspaces;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};

pub use error::{EntityKind, StoreError};
pub use migrations::LATEST_SCHEMA_VERSION;
pub use model::{
    Image, ImageState, InitMode, OpKind, Operation, PortForward, Proto, ResourceUpdate, Snapshot,
    SnapshotMemory, SnapshotState, SourceKind, Vm, VmSecret, VmState, Vmm,
};

struct VmWrite<'a>(&'a Store);

impl Drop for VmWrite<'_> {
    fn drop(&mut self) {
        self.0.note_vm_change();
    }
}

/// How long a statement waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The store: one SQLite connection behind a mutex, shareable across threads.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// Bumped by every write to the `vms` table (and by
    /// [`Store::note_vm_change`]): what the web UI's live VM list follows.
    vm_changes: tokio::sync::watch::Sender<u64>,
}

impl Store {
    /// Opens (creating if needed, along with its parent directory) the
    /// database at `path`, configures the connection and applies pending
    /// migrations.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::setup(conn, Some(path))
    }

    /// A private in-memory database, fully migrated (journal mode stays
    /// `memory`: SQLite has no WAL without a file).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::setup(Connection::open_in_memory()?, None)
    }

    fn setup(mut conn: Connection, path: Option<&Path>) -> Result<Store, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode = enable_wal(&conn)?;
        match path {
            Some(path) if !mode.eq_ignore_ascii_case("wal") => {
                return Err(StoreError::NoWal {
                    path: PathBuf::from(path),
                    mode,
                });
            }
            _ => {}
        }
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Write transactions take the write lock up front: a deferred one that
        // reads first can fail with SQLITE_BUSY when it later tries to write,
        // without the busy timeout ever applying.
        conn.set_transaction_behavior(TransactionBehavior::Immediate);
        migrations::migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            vm_changes: tokio::sync::watch::Sender::new(0),
        })
    }

    /// A receiver that sees every change to a VM row (a generation count).
    pub fn watch_vms(&self) -> tokio::sync::watch::Receiver<u64> {
        self.vm_changes.subscribe()
    }

    /// Bumps the VM generation when dropped: held by each write to `vms`
    /// (a failed one only causes a spurious refresh).
    fn vm_write(&self) -> VmWrite<'_> {
        VmWrite(self)
    }

    /// Tell VM watchers something they show changed outside the table (a
    /// VM paused or resumed: its runtime state).
    pub fn note_vm_change(&self) {
        self.vm_changes.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The schema version (number of migrations applied) of the database.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        migrations::user_version(&self.conn())
    }

    /// The connection. A panic while it was held cannot leave it mid-write:
    /// an unfinished transaction rolls back when dropped.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Switches the database to WAL and returns the journal mode now in force.
/// When several connections open a fresh file at once, SQLite can answer
/// the switch with SQLITE_BUSY at once instead of calling the busy handler
/// (it will not wait while another connection is mid-switch), so the busy
/// timeout is applied here by hand.
fn enable_wal(conn: &Connection) -> Result<String, StoreError> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return Ok(other?),
        }
    }
}

/// A new VM or image id: 12 random hex characters, short enough for socket
/// paths under the state dir. A clash is refused by the primary key.
#[must_use]
pub fn new_id() -> String {
    format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Now, in unix milliseconds: the unit of every timestamp in the store.
#[must_use]
pub fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
    }

    fn pragma(store: &Store, name: &str) -> String {
        store
            .conn()
            .query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                other => format!("{other:?}"),
            })
            .unwrap()
    }

    #[test]
    fn fresh_file_database_is_migrated_with_pragmas_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("nested").join("banger.db");
        let store = Store::open(&path).unwrap();
        assert!(path.is_file(), "parent directories and file were created");
        assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
        assert_eq!(pragma(&store, "journal_mode"), "wal");
        assert_eq!(pragma(&store, "foreign_keys"), "1");
        assert_eq!(pragma(&store, "busy_timeout"), "5000");
        // NORMAL
        assert_eq!(pragma(&store, "synchronous"), "1");

        // Per-connection settings hold on a second connection too.
        let other = Store::open(&path).unwrap();
        assert_eq!(pragma(&other, "foreign_keys"), "1");
        assert_eq!(pragma(&other, "busy_timeout"), "5000");
        assert_eq!(pragma(&other, "journal_mode"), "wal");
    }

    #[test]
    fn in_memory_store_is_migrated_with_foreign_keys() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);
        let fk: i64 = store
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }
}
