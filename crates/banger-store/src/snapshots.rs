//! Snapshot records: what a snapshot was taken of and where its files are.

use rusqlite::{Connection, OptionalExtension, Row, named_params};

use crate::error::{EntityKind, StoreError, Violation, violation};
use crate::model::{Snapshot, SnapshotMemory, SnapshotState};
use crate::{Store, sql};

const COLUMNS: &str = "id, name, source_vm_id, source_vm_name, image_id, vmm, vmm_version, accel, cpu, \
    init_mode, vcpus, memory_mib, disk_mib, root_format, dir, state_sha256, memory, memory_sha256, \
    size_bytes, state, created_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: row.get("id")?,
        name: row.get("name")?,
        source_vm_id: row.get("source_vm_id")?,
        source_vm_name: row.get("source_vm_name")?,
        image_id: row.get("image_id")?,
        vmm: sql::parsed(row, "vmm")?,
        vmm_version: row.get("vmm_version")?,
        accel: row.get("accel")?,
        cpu: row.get("cpu")?,
        init_mode: sql::parsed(row, "init_mode")?,
        vcpus: row.get("vcpus")?,
        memory_mib: row.get("memory_mib")?,
        disk_mib: row.get("disk_mib")?,
        root_qcow2: row.get::<_, String>("root_format")? == "qcow2",
        dir: sql::path(row, "dir")?,
        state_sha256: row.get("state_sha256")?,
        memory: match row.get::<_, String>("memory")?.as_str() {
            "file" => SnapshotMemory::File,
            "stream" => SnapshotMemory::Stream,
            _ => SnapshotMemory::State,
        },
        memory_sha256: row.get("memory_sha256")?,
        size_bytes: row.get("size_bytes")?,
        state: match row.get::<_, String>("state")?.as_str() {
            "ready" => SnapshotState::Ready,
            _ => SnapshotState::Creating,
        },
        created_at: row.get("created_at")?,
    })
}

fn query_one(
    conn: &Connection,
    where_clause: &str,
    key: &str,
) -> Result<Option<Snapshot>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM snapshots WHERE {where_clause}");
    Ok(conn.query_row(&sql, [key], from_row).optional()?)
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        kind: EntityKind::Snapshot,
        key: key.to_owned(),
    }
}

/// The names of the snapshots of image `image_id`.
pub(crate) fn of_image(conn: &Connection, image_id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM snapshots WHERE image_id = ?1 ORDER BY name")?;
    let names = stmt
        .query_map([image_id], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(names)
}

impl Store {
    /// Records a snapshot (in state `creating` until its files are whole).
    pub fn insert_snapshot(&self, s: &Snapshot) -> Result<(), StoreError> {
        let conn = self.conn();
        let result = conn.execute(
            &format!(
                "INSERT INTO snapshots ({COLUMNS}) VALUES (:id, :name, :source_vm_id, \
                 :source_vm_name, :image_id, :vmm, :vmm_version, :accel, :cpu, :init_mode, :vcpus, \
                 :memory_mib, :disk_mib, :root_format, :dir, :state_sha256, :memory, :memory_sha256, \
                 :size_bytes, :state, :created_at)"
            ),
            named_params! {
                ":id": s.id,
                ":name": s.name,
                ":source_vm_id": s.source_vm_id,
                ":source_vm_name": s.source_vm_name,
                ":image_id": s.image_id,
                ":vmm": s.vmm.as_str(),
                ":vmm_version": s.vmm_version,
                ":accel": s.accel,
                ":cpu": s.cpu,
                ":init_mode": s.init_mode.as_str(),
                ":vcpus": s.vcpus,
                ":memory_mib": s.memory_mib,
                ":disk_mib": s.disk_mib,
                ":root_format": if s.root_qcow2 { "qcow2" } else { "raw" },
                ":dir": sql::path_text(&s.dir)?,
                ":state_sha256": s.state_sha256,
                ":memory": s.memory.as_str(),
                ":memory_sha256": s.memory_sha256,
                ":size_bytes": s.size_bytes,
                ":state": s.state.as_str(),
                ":created_at": s.created_at,
            },
        );
        let Err(err) = result else { return Ok(()) };
        Err(match violation(&err) {
            Some(Violation::Unique(cols)) if cols == ["snapshots.name"] => StoreError::NameTaken {
                kind: EntityKind::Snapshot,
                name: s.name.clone(),
            },
            Some(Violation::ForeignKey) => StoreError::NotFound {
                kind: EntityKind::Image,
                key: s.image_id.clone(),
            },
            Some(Violation::Check(rule)) => StoreError::Invalid {
                kind: EntityKind::Snapshot,
                rule,
            },
            _ => err.into(),
        })
    }

    /// A snapshot's files are whole: their checksums and size, and it is
    /// ready.
    pub fn complete_snapshot(
        &self,
        id: &str,
        state_sha256: &str,
        memory_sha256: &str,
        size_bytes: u64,
    ) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE snapshots SET state = 'ready', state_sha256 = ?2, memory_sha256 = ?3, \
             size_bytes = ?4 WHERE id = ?1",
            rusqlite::params![id, state_sha256, memory_sha256, size_bytes as i64],
        )?;
        if changed == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }

    /// The snapshot whose id, or else whose name, is `key`.
    pub fn find_snapshot(&self, key: &str) -> Result<Snapshot, StoreError> {
        let conn = self.conn();
        match query_one(&conn, "id = ?1", key)? {
            Some(s) => Ok(s),
            None => query_one(&conn, "name = ?1", key)?.ok_or_else(|| not_found(key)),
        }
    }

    /// Every snapshot, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM snapshots ORDER BY created_at, name"
        ))?;
        let rows = stmt
            .query_map([], from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Removes a snapshot's record (its files are the caller's).
    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        if changed == 0 {
            return Err(not_found(id));
        }
        Ok(())
    }
}
