//! The numbered schema migrations. Each is a separate SQL file under
//! `migrations/`; the database's `user_version` is the number applied.

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use crate::error::StoreError;

const STEPS: &[M<'static>] = &[
    M::up(include_str!("../migrations/0001_initial.sql")).foreign_key_check(),
    M::up(include_str!(
        "../migrations/0002_port_forwards_operations_labels.sql"
    ))
    .foreign_key_check(),
    M::up(include_str!(
        "../migrations/0003_failed_vms_release_leases.sql"
    )),
    M::up(include_str!("../migrations/0004_vm_net_policy.sql")),
    M::up(include_str!("../migrations/0005_snapshots.sql")).foreign_key_check(),
    M::up(include_str!("../migrations/0006_vm_secrets.sql")),
    M::up(include_str!("../migrations/0007_snapshot_secrets.sql")).foreign_key_check(),
    M::up(include_str!("../migrations/0008_snapshot_memory.sql")),
    M::up(include_str!("../migrations/0009_workspaces.sql")).foreign_key_check(),
];

/// Schema version of a database this build has fully migrated.
pub const LATEST_SCHEMA_VERSION: usize = STEPS.len();

pub(crate) const MIGRATIONS: Migrations<'static> = Migrations::from_slice(STEPS);

pub(crate) fn user_version(conn: &Connection) -> Result<usize, StoreError> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // user_version is a signed 32-bit header field; a negative one is as
    // foreign to us as one from the future.
    Ok(usize::try_from(v).unwrap_or(usize::MAX))
}

/// Brings the database to [`LATEST_SCHEMA_VERSION`], refusing a database
/// written by a newer banger.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found = user_version(conn)?;
    if found > LATEST_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: LATEST_SCHEMA_VERSION,
        });
    }
    match MIGRATIONS.to_latest(conn) {
        Ok(()) => Ok(()),
        // Another process opening the same fresh file may have migrated it
        // between our version check and our (immediate) transaction; its
        // work is as good as ours.
        Err(_) if user_version(conn)? == LATEST_SCHEMA_VERSION => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InitMode, Store, VmState};

    #[test]
    fn migrations_validate() {
        MIGRATIONS.validate().unwrap();
        assert_eq!(LATEST_SCHEMA_VERSION, 9);
    }

    #[test]
    fn upgrade_from_version_1_keeps_data_and_adds_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            MIGRATIONS.to_version(&mut conn, 1).unwrap();
            assert_eq!(user_version(&conn).unwrap(), 1);
            conn.execute_batch(
                "INSERT INTO images (id, name, state, source_kind, source_ref, dir, kernel_path,
                     rootfs_path, manifest_json, size_bytes, default_init, is_default, created_at)
                 VALUES ('img1', 'debian', 'ready', 'recipe', 'debian-12', '/d', '/d/bzImage',
                     '/d/rootfs.ext4', '{\"rootfs.ext4\":\"ab12\"}', 4096, 'fast', 1, 1000);
                 INSERT INTO vms (id, name, image_id, vmm, init_mode, vcpus, memory_mib, disk_mib,
                     state, guest_ip, mac, vsock_cid, vm_dir, created_at)
                 VALUES ('vm1', 'old', 'img1', 'qemu', 'systemd', 2, 1024, 2048, 'stopped',
                     '172.30.0.2', '02:00:00:00:00:02', 3, '/v/vm1', 2000);
                 INSERT INTO vms (id, name, image_id, vmm, init_mode, vcpus, memory_mib, disk_mib,
                     state, guest_ip, mac, vsock_cid, vm_dir, created_at)
                 VALUES ('vm2', 'broken', 'img1', 'qemu', 'fast', 2, 1024, 2048, 'failed',
                     '172.30.0.3', '02:00:00:00:00:03', 4, '/v/vm2', 2000);",
            )
            .unwrap();
            // The version-1 schema has none of migration 2.
            assert!(
                conn.execute("INSERT INTO operations (op_id) VALUES ('x')", [])
                    .is_err()
            );
        }

        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), LATEST_SCHEMA_VERSION);

        let img = store.default_image().unwrap().unwrap();
        assert_eq!(img.id, "img1");
        assert_eq!(img.manifest["rootfs.ext4"], "ab12");
        assert_eq!(img.size_bytes, 4096);

        let vm = store.find_vm("old").unwrap();
        assert_eq!(vm.init_mode, InitMode::Systemd);
        assert_eq!(vm.state, VmState::Stopped);
        assert_eq!(vm.guest_ip, Some("172.30.0.2".parse().unwrap()));
        assert_eq!(vm.vsock_cid, Some(3));
        // A failed row gave its leases back (migration 3).
        let broken = store.find_vm("broken").unwrap();
        assert_eq!(
            (broken.guest_ip, broken.mac, broken.vsock_cid),
            (None, None, None)
        );
        // The new column got its default on the old row and is writable.
        assert!(vm.labels.is_empty());
        let labels = [("team".to_owned(), "infra".to_owned())].into();
        store.set_vm_labels("vm1", &labels).unwrap();
        assert_eq!(store.find_vm("vm1").unwrap().labels, labels);

        // The new tables work against the old rows.
        let fwd = crate::PortForward {
            vm_id: "vm1".into(),
            proto: crate::Proto::Tcp,
            bind_addr: "127.0.0.1".parse().unwrap(),
            host_port: 8080,
            guest_port: 80,
        };
        store.add_port_forward(&fwd).unwrap();
        assert_eq!(store.port_forwards_for_vm("vm1").unwrap(), vec![fwd]);
        store
            .begin_operation("op-1", crate::OpKind::VmDelete, "vm1", "start")
            .unwrap();
        assert_eq!(store.unfinished_operations().unwrap().len(), 1);
    }

    #[test]
    fn upgrade_from_version_6_keeps_grants_and_lets_restores_share_placeholders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            MIGRATIONS.to_version(&mut conn, 6).unwrap();
            conn.execute_batch(
                "INSERT INTO images (id, name, state, source_kind, source_ref, dir, kernel_path,
                     rootfs_path, manifest_json, size_bytes, default_init, is_default, created_at)
                 VALUES ('img1', 'debian', 'ready', 'recipe', 'debian-12', '/d', '/d/bzImage',
                     '/d/rootfs.ext4', '{}', 4096, 'fast', 1, 1000);
                 INSERT INTO vms (id, name, image_id, vmm, init_mode, vcpus, memory_mib, disk_mib,
                     state, vm_dir, created_at)
                 VALUES ('vm1', 'src', 'img1', 'qemu', 'fast', 2, 1024, 2048, 'running',
                     '/v/vm1', 2000);
                 INSERT INTO vms (id, name, image_id, vmm, init_mode, vcpus, memory_mib, disk_mib,
                     state, vm_dir, created_at)
                 VALUES ('vm2', 'fork', 'img1', 'qemu', 'fast', 2, 1024, 2048, 'running',
                     '/v/vm2', 2000);
                 INSERT INTO vm_secrets (vm_id, name, hosts, placeholder, in_body)
                 VALUES ('vm1', 'TOKEN', 'api.test,*.example.org', 'P1', 1);",
            )
            .unwrap();
            // Version 6 holds a placeholder to one VM.
            assert!(
                conn.execute(
                    "INSERT INTO vm_secrets (vm_id, name, hosts, placeholder) \
                     VALUES ('vm2', 'TOKEN', 'api.test', 'P1')",
                    []
                )
                .is_err()
            );
        }
        let store = Store::open(&path).unwrap();
        let kept = store.vm_secrets("vm1").unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].hosts, ["api.test", "*.example.org"]);
        assert!(kept[0].in_body);
        store.add_vm_secrets("vm2", &kept).unwrap();
        assert_eq!(store.vm_secrets("vm2").unwrap(), kept);
        assert_eq!(store.vms_using_secret("TOKEN").unwrap(), ["fork", "src"]);
    }

    #[test]
    fn upgrade_from_version_7_keeps_snapshots_with_their_memory_in_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "foreign_keys", "ON").unwrap();
            MIGRATIONS.to_version(&mut conn, 7).unwrap();
            conn.execute_batch(
                "INSERT INTO images (id, name, state, source_kind, source_ref, dir, kernel_path,
                     rootfs_path, manifest_json, size_bytes, default_init, is_default, created_at)
                 VALUES ('img1', 'debian', 'ready', 'recipe', 'debian-12', '/d', '/d/bzImage',
                     '/d/rootfs.ext4', '{}', 4096, 'fast', 1, 1000);
                 INSERT INTO snapshots (id, name, source_vm_id, source_vm_name, image_id, vmm,
                     vmm_version, init_mode, vcpus, memory_mib, disk_mib, root_format, dir,
                     state_sha256, size_bytes, state, created_at)
                 VALUES ('s1', 'old', 'vm1', 'src', 'img1', 'qemu', 'QEMU 7.2', 'fast', 2, 1024,
                     4096, 'qcow2', '/s/s1', 'ab12', 4096, 'ready', 3000);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let s = store.find_snapshot("old").unwrap();
        // Taken before guest RAM lived in a memfd: the stream holds it.
        assert_eq!(
            (s.memory, s.memory_sha256.as_str(), s.state_sha256.as_str()),
            (crate::SnapshotMemory::State, "", "ab12")
        );
        // What it needs of the host was not recorded: not checked.
        assert_eq!((s.accel.as_str(), s.cpu.as_str()), ("", ""));
        assert!(
            store
                .conn()
                .execute("UPDATE snapshots SET memory = 'disk'", [])
                .is_err()
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        drop(Store::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::SchemaTooNew {
                    found: 99,
                    supported: LATEST_SCHEMA_VERSION
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("upgrade banger"), "{err}");
    }
}
