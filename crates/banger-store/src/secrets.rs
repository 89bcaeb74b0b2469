//! The secrets each VM may use (names, hosts, placeholders; never values).

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

impl Store {
    /// Records the secrets of VM `vm_id`, all or none.
    pub fn add_vm_secrets(&self, vm_id: &str, secrets: &[VmSecret]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for s in secrets {
            tx.execute(
                "INSERT INTO vm_secrets (vm_id, name, hosts, placeholder, in_body) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![vm_id, s.name, s.hosts.join(","), s.placeholder, s.in_body],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The secrets of one VM, by name.
    pub fn vm_secrets(&self, vm_id: &str) -> Result<Vec<VmSecret>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, hosts, placeholder, in_body FROM vm_secrets WHERE vm_id = ?1 \
             ORDER BY name",
        )?;
        let rows = stmt
            .query_map([vm_id], secret_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Forgets the secrets of one VM (a create rolled back: the failed row
    /// stays, owning nothing).
    pub fn remove_vm_secrets(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vm_secrets WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// Names of the VMs that use secret `name`, sorted.
    pub fn vms_using_secret(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT vms.name FROM vm_secrets JOIN vms ON vms.id = vm_id \
             WHERE vm_secrets.name = ?1 ORDER BY vms.name",
        )?;
        let rows = stmt
            .query_map([name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}
