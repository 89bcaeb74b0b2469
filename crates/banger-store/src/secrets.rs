//! The secrets each VM may use (names, hosts, placeholders; never values),
//! and those each snapshot keeps for the VMs restored from it.

use rusqlite::{Row, params};

use crate::model::VmSecret;
use crate::{Store, StoreError};

fn secret_from_row(row: &Row<'_>) -> rusqlite::Result<VmSecret> {
    let hosts: String = row.get("hosts")?;
    Ok(VmSecret {
        name: row.get("name")?,
        hosts: hosts.split(',').map(str::to_owned).collect(),
        placeholder: row.get("placeholder")?,
        in_body: row.get("in_body")?,
    })
}

/// The two owners of grants: `(table, owner column)`.
const VMS: (&str, &str) = ("vm_secrets", "vm_id");
const SNAPSHOTS: (&str, &str) = ("snapshot_secrets", "snapshot_id");

impl Store {
    fn add_grants(
        &self,
        (table, owner): (&str, &str),
        id: &str,
        secrets: &[VmSecret],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for s in secrets {
            tx.execute(
                &format!(
                    "INSERT INTO {table} ({owner}, name, hosts, placeholder, in_body) \
                     VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                params![id, s.name, s.hosts.join(","), s.placeholder, s.in_body],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn grants(&self, (table, owner): (&str, &str), id: &str) -> Result<Vec<VmSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT name, hosts, placeholder, in_body FROM {table} WHERE {owner} = ?1 \
             ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([id], secret_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records the secrets of VM `vm_id`, all or none.
    pub fn add_vm_secrets(&self, vm_id: &str, secrets: &[VmSecret]) -> Result<(), StoreError> {
        self.add_grants(VMS, vm_id, secrets)
    }

    /// The secrets of VM `vm_id`, by name.
    pub fn vm_secrets(&self, vm_id: &str) -> Result<Vec<VmSecret>, StoreError> {
        self.grants(VMS, vm_id)
    }

    /// Records the secrets snapshot `snapshot_id` keeps (its source VM's),
    /// all or none; they go with its row.
    pub fn add_snapshot_secrets(
        &self,
        snapshot_id: &str,
        secrets: &[VmSecret],
    ) -> Result<(), StoreError> {
        self.add_grants(SNAPSHOTS, snapshot_id, secrets)
    }

    /// The secrets snapshot `snapshot_id` keeps, by name.
    pub fn snapshot_secrets(&self, snapshot_id: &str) -> Result<Vec<VmSecret>, StoreError> {
        self.grants(SNAPSHOTS, snapshot_id)
    }

    /// Forgets the secrets of one VM (a create rolled back: the failed row
    /// keeps no claim on them).
    pub fn remove_vm_secrets(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vm_secrets WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// Names of the VMs that use secret `name`, sorted.
    pub fn vms_using_secret(&self, name: &str) -> Result<Vec<String>, StoreError> {
        self.names_using(
            "SELECT vms.name FROM vm_secrets JOIN vms ON vms.id = vm_id \
             WHERE vm_secrets.name = ?1 ORDER BY vms.name",
            name,
        )
    }

    /// Names of the snapshots that keep secret `name`, sorted.
    pub fn snapshots_using_secret(&self, name: &str) -> Result<Vec<String>, StoreError> {
        self.names_using(
            "SELECT snapshots.name FROM snapshot_secrets \
             JOIN snapshots ON snapshots.id = snapshot_id \
             WHERE snapshot_secrets.name = ?1 ORDER BY snapshots.name",
            name,
        )
    }

    fn names_using(&self, sql: &str, name: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt
            .query_map([name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}
