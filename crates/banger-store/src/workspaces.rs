//! The host repository each workspace of a VM came from (by its path in
//! the guest), and those each snapshot keeps for the VMs restored from it.

use rusqlite::params;

use crate::{Store, StoreError};

/// The two owners of workspace records: `(table, owner column)`.
const VMS: (&str, &str) = ("vm_workspaces", "vm_id");
const SNAPSHOTS: (&str, &str) = ("snapshot_workspaces", "snapshot_id");

impl Store {
    /// Records that VM `vm_id`'s workspace at `dest` came from `host_path`
    /// (a prepare into the same `dest` replaces the record).
    pub fn set_vm_workspace(
        &self,
        vm_id: &str,
        dest: &str,
        host_path: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO vm_workspaces (vm_id, dest, host_path) VALUES (?1, ?2, ?3) \
             ON CONFLICT (vm_id, dest) DO UPDATE SET host_path = excluded.host_path",
            params![vm_id, dest, host_path],
        )?;
        Ok(())
    }

    /// The host repository VM `vm_id`'s workspace at `dest` came from.
    pub fn vm_workspace(&self, vm_id: &str, dest: &str) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT host_path FROM vm_workspaces WHERE vm_id = ?1 AND dest = ?2")?;
        let mut rows = stmt.query_map([vm_id, dest], |r| r.get(0))?;
        Ok(rows.next().transpose()?)
    }

    /// Snapshot `snapshot_id` keeps the workspaces of VM `vm_id`.
    pub fn snapshot_vm_workspaces(&self, snapshot_id: &str, vm_id: &str) -> Result<(), StoreError> {
        self.copy_workspaces(VMS, vm_id, SNAPSHOTS, snapshot_id)
    }

    /// VM `vm_id`, restored from snapshot `snapshot_id`, has its workspaces.
    pub fn restore_vm_workspaces(&self, vm_id: &str, snapshot_id: &str) -> Result<(), StoreError> {
        self.copy_workspaces(SNAPSHOTS, snapshot_id, VMS, vm_id)
    }

    fn copy_workspaces(
        &self,
        (from, from_owner): (&str, &str),
        from_id: &str,
        (to, to_owner): (&str, &str),
        to_id: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            &format!(
                "INSERT INTO {to} ({to_owner}, dest, host_path) \
                 SELECT ?1, dest, host_path FROM {from} WHERE {from_owner} = ?2"
            ),
            [to_id, from_id],
        )?;
        Ok(())
    }
}
