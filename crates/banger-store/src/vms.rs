//! VM records and the leases they hold.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use rusqlite::{Connection, OptionalExtension, Row, named_params, params};

use crate::error::{EntityKind, StoreError, Violation, violation};
use crate::model::{ResourceUpdate, Vm, VmState};
use crate::{Store, now_ms, sql};

const COLUMNS: &str = "id, name, image_id, vmm, init_mode, vcpus, memory_mib, disk_mib, state, \
    guest_ip, mac, vsock_cid, dns_name, vm_dir, api_socket, console_log, last_error, created_at, \
    last_used_at, labels_json, net_policy";

fn from_row(row: &Row<'_>) -> rusqlite::Result<Vm> {
    Ok(Vm {
        id: row.get("id")?,
        name: row.get("name")?,
        image_id: row.get("image_id")?,
        vmm: sql::parsed(row, "vmm")?,
        init_mode: sql::parsed(row, "init_mode")?,
        vcpus: row.get("vcpus")?,
        memory_mib: row.get("memory_mib")?,
        disk_mib: row.get("disk_mib")?,
        state: row.get("state")?,
        guest_ip: sql::opt_parsed(row, "guest_ip")?,
        mac: row.get("mac")?,
        vsock_cid: row.get("vsock_cid")?,
        dns_name: row.get("dns_name")?,
        vm_dir: sql::path(row, "vm_dir")?,
        api_socket: sql::opt_path(row, "api_socket")?,
        console_log: sql::opt_path(row, "console_log")?,
        last_error: row.get("last_error")?,
        created_at: row.get("created_at")?,
        last_used_at: row.get("last_used_at")?,
        labels: sql::json(row, "labels_json")?,
        net_policy: row.get("net_policy")?,
    })
}

fn query_one(conn: &Connection, where_clause: &str, key: &str) -> Result<Option<Vm>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM vms WHERE {where_clause}");
    Ok(conn.query_row(&sql, [key], from_row).optional()?)
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        kind: EntityKind::Vm,
        key: key.to_owned(),
    }
}

fn check_changed(changed: usize, id: &str) -> Result<(), StoreError> {
    if changed == 0 {
        Err(not_found(id))
    } else {
        Ok(())
    }
}

/// A lease conflict, naming the VM that holds the lease.
fn lease_taken(
    conn: &Connection,
    what: &str,
    column: &str,
    value: &dyn rusqlite::ToSql,
    shown: &dyn std::fmt::Display,
) -> Result<StoreError, StoreError> {
    let holder: Option<String> = conn
        .query_row(
            &format!("SELECT name FROM vms WHERE {column} = ?1"),
            [value],
            |r| r.get(0),
        )
        .optional()?;
    let holder = holder.map_or_else(|| "another VM".to_owned(), |name| format!("VM \"{name}\""));
    Ok(StoreError::Conflict(format!(
        "{what} {shown} is already leased to {holder}"
    )))
}

/// One column of every VM that has it set.
fn used<T: Ord>(
    store: &Store,
    column: &str,
    get: impl Fn(&Row<'_>, &str) -> rusqlite::Result<T>,
) -> Result<BTreeSet<T>, StoreError> {
    let conn = store.conn();
    let mut stmt = conn.prepare(&format!(
        "SELECT {column} FROM vms WHERE {column} IS NOT NULL"
    ))?;
    let set = stmt
        .query_map([], |r| get(r, column))?
        .collect::<Result<_, _>>()?;
    Ok(set)
}

impl Store {
    /// Records a new VM, with its leases. A taken name, id, guest IP, MAC or
    /// vsock CID is refused, as is an unknown image. The MAC is stored
    /// lower-case, so leases compare case-insensitively.
    pub fn insert_vm(&self, vm: &Vm) -> Result<(), StoreError> {
        let _notify = self.vm_write();
        let conn = self.conn();
        let guest_ip = vm.guest_ip.map(|ip| ip.to_string());
        let mac = vm.mac.as_deref().map(str::to_ascii_lowercase);
        let result = conn.execute(
            &format!(
                "INSERT INTO vms ({COLUMNS}) VALUES (:id, :name, :image_id, :vmm, :init_mode, \
                 :vcpus, :memory_mib, :disk_mib, :state, :guest_ip, :mac, :vsock_cid, :dns_name, \
                 :vm_dir, :api_socket, :console_log, :last_error, :created_at, :last_used_at, \
                 :labels_json, :net_policy)"
            ),
            named_params! {
                ":id": vm.id,
                ":name": vm.name,
                ":image_id": vm.image_id,
                ":vmm": vm.vmm.as_str(),
                ":init_mode": vm.init_mode.as_str(),
                ":vcpus": vm.vcpus,
                ":memory_mib": vm.memory_mib,
                ":disk_mib": vm.disk_mib,
                ":state": vm.state,
                ":guest_ip": guest_ip,
                ":mac": mac,
                ":vsock_cid": vm.vsock_cid,
                ":dns_name": vm.dns_name,
                ":vm_dir": sql::path_text(&vm.vm_dir)?,
                ":api_socket": sql::opt_path_text(vm.api_socket.as_ref())?,
                ":console_log": sql::opt_path_text(vm.console_log.as_ref())?,
                ":last_error": vm.last_error,
                ":created_at": vm.created_at,
                ":last_used_at": vm.last_used_at,
                ":labels_json": sql::json_text(&vm.labels)?,
                ":net_policy": vm.net_policy,
            },
        );
        let Err(err) = result else { return Ok(()) };
        Err(match violation(&err) {
            Some(Violation::Unique(cols)) if cols == ["vms.name"] => StoreError::NameTaken {
                kind: EntityKind::Vm,
                name: vm.name.clone(),
            },
            Some(Violation::Unique(cols)) if cols == ["vms.id"] => {
                StoreError::Conflict(format!("a VM with id \"{}\" already exists", vm.id))
            }
            Some(Violation::Unique(cols)) if cols == ["vms.guest_ip"] => {
                let ip = guest_ip.unwrap_or_default();
                lease_taken(&conn, "guest IP", "guest_ip", &ip, &ip)?
            }
            Some(Violation::Unique(cols)) if cols == ["vms.mac"] => {
                let mac = mac.unwrap_or_default();
                lease_taken(&conn, "MAC address", "mac", &mac, &mac)?
            }
            Some(Violation::Unique(cols)) if cols == ["vms.vsock_cid"] => {
                let cid = vm.vsock_cid.unwrap_or_default();
                lease_taken(&conn, "vsock CID", "vsock_cid", &cid, &cid)?
            }
            Some(Violation::ForeignKey) => StoreError::NotFound {
                kind: EntityKind::Image,
                key: vm.image_id.clone(),
            },
            Some(Violation::Check(rule)) => StoreError::Invalid {
                kind: EntityKind::Vm,
                rule,
            },
            _ => err.into(),
        })
    }

    /// The VM whose id, or else whose name, is `key`.
    pub fn find_vm(&self, key: &str) -> Result<Vm, StoreError> {
        let conn = self.conn();
        match query_one(&conn, "id = ?1", key)? {
            Some(vm) => Ok(vm),
            None => query_one(&conn, "name = ?1", key)?.ok_or_else(|| not_found(key)),
        }
    }

    /// All VMs, by name.
    pub fn list_vms(&self) -> Result<Vec<Vm>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM vms ORDER BY name"))?;
        let vms = stmt.query_map([], from_row)?.collect::<Result<_, _>>()?;
        Ok(vms)
    }

    /// Sets a VM's state and its last error (`None` clears it). A VM made
    /// `failed` owns nothing: its leases (guest IP, MAC, vsock CID) are
    /// released with the same statement, for the next VM to take.
    pub fn update_vm_state(
        &self,
        id: &str,
        state: VmState,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        let _notify = self.vm_write();
        let sql = if state == VmState::Failed {
            "UPDATE vms SET state = ?2, last_error = ?3, \
             guest_ip = NULL, mac = NULL, vsock_cid = NULL WHERE id = ?1"
        } else {
            "UPDATE vms SET state = ?2, last_error = ?3 WHERE id = ?1"
        };
        let changed = self.conn().execute(sql, params![id, state, last_error])?;
        check_changed(changed, id)
    }

    /// Changes a VM's vCPUs, memory and/or work-disk size; returns the
    /// updated record.
    pub fn update_vm_resources(&self, id: &str, update: ResourceUpdate) -> Result<Vm, StoreError> {
        let _notify = self.vm_write();
        let conn = self.conn();
        let result = conn.execute(
            "UPDATE vms SET vcpus = coalesce(?2, vcpus), memory_mib = coalesce(?3, memory_mib), \
             disk_mib = coalesce(?4, disk_mib) WHERE id = ?1",
            params![id, update.vcpus, update.memory_mib, update.disk_mib],
        );
        let changed = result.map_err(|err| match violation(&err) {
            Some(Violation::Check(rule)) => StoreError::Invalid {
                kind: EntityKind::Vm,
                rule,
            },
            _ => err.into(),
        })?;
        check_changed(changed, id)?;
        query_one(&conn, "id = ?1", id)?.ok_or_else(|| not_found(id))
    }

    /// Replaces a VM's labels.
    pub fn set_vm_labels(
        &self,
        id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let _notify = self.vm_write();
        let changed = self.conn().execute(
            "UPDATE vms SET labels_json = ?2 WHERE id = ?1",
            params![id, sql::json_text(labels)?],
        )?;
        check_changed(changed, id)
    }

    /// Gives a VM another name and labels in one statement (a pooled guest
    /// taken by a create). A taken name is refused.
    pub fn rename_vm(
        &self,
        id: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let result = self.conn().execute(
            "UPDATE vms SET name = ?2, labels_json = ?3 WHERE id = ?1",
            params![id, name, sql::json_text(labels)?],
        );
        match result {
            Ok(changed) => check_changed(changed, id),
            Err(err) => Err(match violation(&err) {
                Some(Violation::Unique(cols)) if cols == ["vms.name"] => StoreError::NameTaken {
                    kind: EntityKind::Vm,
                    name: name.to_owned(),
                },
                _ => err.into(),
            }),
        }
    }

    /// Replaces a VM's network policy (canonical form).
    pub fn set_vm_net_policy(&self, id: &str, policy: &str) -> Result<(), StoreError> {
        let _notify = self.vm_write();
        let changed = self.conn().execute(
            "UPDATE vms SET net_policy = ?2 WHERE id = ?1",
            params![id, policy],
        )?;
        check_changed(changed, id)
    }

    /// Records that the VM was used now.
    pub fn touch_vm_last_used(&self, id: &str) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE vms SET last_used_at = ?2 WHERE id = ?1",
            params![id, now_ms()],
        )?;
        check_changed(changed, id)
    }

    /// Deletes a VM record, releasing its leases and port forwards.
    pub fn delete_vm(&self, id: &str) -> Result<(), StoreError> {
        let _notify = self.vm_write();
        let changed = self.conn().execute("DELETE FROM vms WHERE id = ?1", [id])?;
        check_changed(changed, id)
    }

    /// Guest IPs leased to any VM.
    pub fn used_guest_ips(&self) -> Result<BTreeSet<Ipv4Addr>, StoreError> {
        used(self, "guest_ip", sql::parsed)
    }

    /// MAC addresses (lower-case) leased to any VM.
    pub fn used_macs(&self) -> Result<BTreeSet<String>, StoreError> {
        used(self, "mac", |r, c| r.get(c))
    }

    /// vsock CIDs leased to any VM.
    pub fn used_cids(&self) -> Result<BTreeSet<u32>, StoreError> {
        used(self, "vsock_cid", |r, c| r.get(c))
    }
}
