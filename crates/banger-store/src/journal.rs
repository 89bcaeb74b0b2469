//! Port forwards and the journal of operations in flight.

use std::net::{IpAddr, SocketAddr};

use rusqlite::{OptionalExtension, Row, params};

use crate::error::{EntityKind, StoreError, Violation, violation};
use crate::model::{OpKind, Operation, PortForward, Proto};
use crate::{Store, now_ms, sql};

const FORWARD_COLUMNS: &str = "vm_id, proto, bind_addr, host_port, guest_port";
const OP_COLUMNS: &str = "op_id, kind, subject_id, stage, started_at, updated_at";

fn forward_from_row(row: &Row<'_>) -> rusqlite::Result<PortForward> {
    Ok(PortForward {
        vm_id: row.get("vm_id")?,
        proto: row.get("proto")?,
        bind_addr: sql::parsed(row, "bind_addr")?,
        host_port: row.get("host_port")?,
        guest_port: row.get("guest_port")?,
    })
}

fn op_from_row(row: &Row<'_>) -> rusqlite::Result<Operation> {
    Ok(Operation {
        op_id: row.get("op_id")?,
        kind: row.get("kind")?,
        subject_id: row.get("subject_id")?,
        stage: row.get("stage")?,
        started_at: row.get("started_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn op_not_found(op_id: &str) -> StoreError {
    StoreError::NotFound {
        kind: EntityKind::Operation,
        key: op_id.to_owned(),
    }
}

impl Store {
    /// Records a port forward. A host address/port already forwarded for the
    /// same protocol is refused, as is an unknown VM.
    pub fn add_port_forward(&self, fwd: &PortForward) -> Result<(), StoreError> {
        let conn = self.conn();
        let bind = fwd.bind_addr.to_string();
        let result = conn.execute(
            &format!("INSERT INTO port_forwards ({FORWARD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
            params![fwd.vm_id, fwd.proto, bind, fwd.host_port, fwd.guest_port],
        );
        let Err(err) = result else { return Ok(()) };
        let host = SocketAddr::new(fwd.bind_addr, fwd.host_port);
        Err(match violation(&err) {
            Some(Violation::Unique(_)) => {
                let holder: Option<String> = conn
                    .query_row(
                        "SELECT vms.name FROM port_forwards JOIN vms ON vms.id = vm_id \
                         WHERE bind_addr = ?1 AND proto = ?2 AND host_port = ?3",
                        params![bind, fwd.proto, fwd.host_port],
                        |r| r.get(0),
                    )
                    .optional()?;
                let holder =
                    holder.map_or_else(|| "another VM".to_owned(), |n| format!("VM \"{n}\""));
                StoreError::Conflict(format!(
                    "{} {host} is already forwarded to {holder}",
                    fwd.proto
                ))
            }
            Some(Violation::ForeignKey) => StoreError::NotFound {
                kind: EntityKind::Vm,
                key: fwd.vm_id.clone(),
            },
            Some(Violation::Check(rule)) => StoreError::Invalid {
                kind: EntityKind::PortForward,
                rule,
            },
            None => err.into(),
        })
    }

    /// Every port forward, by VM then host port.
    pub fn list_port_forwards(&self) -> Result<Vec<PortForward>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {FORWARD_COLUMNS} FROM port_forwards ORDER BY vm_id, host_port, proto"
        ))?;
        let fwds = stmt
            .query_map([], forward_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(fwds)
    }

    /// The port forwards of one VM, by host port.
    pub fn port_forwards_for_vm(&self, vm_id: &str) -> Result<Vec<PortForward>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {FORWARD_COLUMNS} FROM port_forwards WHERE vm_id = ?1 \
             ORDER BY host_port, proto"
        ))?;
        let fwds = stmt
            .query_map([vm_id], forward_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(fwds)
    }

    /// Removes the VM's forward of `proto` `bind_addr:host_port`.
    pub fn remove_port_forward(
        &self,
        vm_id: &str,
        proto: Proto,
        bind_addr: IpAddr,
        host_port: u16,
    ) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "DELETE FROM port_forwards WHERE vm_id = ?1 AND proto = ?2 AND bind_addr = ?3 \
             AND host_port = ?4",
            params![vm_id, proto, bind_addr.to_string(), host_port],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                kind: EntityKind::PortForward,
                key: format!("{proto} {}", SocketAddr::new(bind_addr, host_port)),
            });
        }
        Ok(())
    }

    /// Journals the start of a long operation on `subject_id` (see
    /// [`Operation::subject_id`]). Do this before the operation's first
    /// durable side effect.
    pub fn begin_operation(
        &self,
        op_id: &str,
        kind: OpKind,
        subject_id: &str,
        stage: &str,
    ) -> Result<Operation, StoreError> {
        let now = now_ms();
        let op = Operation {
            op_id: op_id.to_owned(),
            kind,
            subject_id: subject_id.to_owned(),
            stage: stage.to_owned(),
            started_at: now,
            updated_at: now,
        };
        let result = self.conn().execute(
            &format!("INSERT INTO operations ({OP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            params![op.op_id, op.kind, op.subject_id, op.stage, now, now],
        );
        match result {
            Ok(_) => Ok(op),
            Err(err) => Err(match violation(&err) {
                Some(Violation::Unique(_)) => {
                    StoreError::Conflict(format!("operation \"{op_id}\" is already in the journal"))
                }
                _ => err.into(),
            }),
        }
    }

    /// Records that an operation reached `stage`.
    pub fn update_operation_stage(&self, op_id: &str, stage: &str) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE operations SET stage = ?2, updated_at = ?3 WHERE op_id = ?1",
            params![op_id, stage, now_ms()],
        )?;
        if changed == 0 {
            return Err(op_not_found(op_id));
        }
        Ok(())
    }

    /// Removes a completed (or fully undone) operation from the journal.
    pub fn finish_operation(&self, op_id: &str) -> Result<(), StoreError> {
        let changed = self
            .conn()
            .execute("DELETE FROM operations WHERE op_id = ?1", [op_id])?;
        if changed == 0 {
            return Err(op_not_found(op_id));
        }
        Ok(())
    }

    /// Operations begun but not finished, oldest first: after a crash, the
    /// daemon completes or undoes each.
    pub fn unfinished_operations(&self) -> Result<Vec<Operation>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {OP_COLUMNS} FROM operations ORDER BY started_at, op_id"
        ))?;
        let ops = stmt.query_map([], op_from_row)?.collect::<Result<_, _>>()?;
        Ok(ops)
    }
}
