//! Image records.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Row, named_params};

use crate::Store;
use crate::error::{EntityKind, StoreError, Violation, violation};
use crate::model::{Image, ImageState};
use crate::sql;

const COLUMNS: &str = "id, name, state, source_kind, source_ref, source_digest, dir, kernel_path, \
    vmlinux_path, initrd_path, rootfs_path, work_seed_path, manifest_json, size_bytes, \
    default_init, is_default, last_error, created_at";

fn from_row(row: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        id: row.get("id")?,
        name: row.get("name")?,
        state: row.get("state")?,
        source_kind: row.get("source_kind")?,
        source_ref: row.get("source_ref")?,
        source_digest: row.get("source_digest")?,
        dir: sql::path(row, "dir")?,
        kernel_path: sql::path(row, "kernel_path")?,
        vmlinux_path: sql::opt_path(row, "vmlinux_path")?,
        initrd_path: sql::opt_path(row, "initrd_path")?,
        rootfs_path: sql::path(row, "rootfs_path")?,
        work_seed_path: sql::opt_path(row, "work_seed_path")?,
        manifest: sql::json(row, "manifest_json")?,
        size_bytes: row.get("size_bytes")?,
        default_init: sql::parsed(row, "default_init")?,
        is_default: row.get("is_default")?,
        last_error: row.get("last_error")?,
        created_at: row.get("created_at")?,
    })
}

fn query_one(
    conn: &Connection,
    where_clause: &str,
    key: &str,
) -> Result<Option<Image>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM images WHERE {where_clause}");
    Ok(conn.query_row(&sql, [key], from_row).optional()?)
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        kind: EntityKind::Image,
        key: key.to_owned(),
    }
}

fn default_name(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT name FROM images WHERE is_default = 1", [], |r| {
            r.get(0)
        })
        .optional()?)
}

fn users(conn: &Connection, id: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM vms WHERE image_id = ?1 ORDER BY name")?;
    let names = stmt
        .query_map([id], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(names)
}

fn check_changed(changed: usize, id: &str) -> Result<(), StoreError> {
    if changed == 0 {
        Err(not_found(id))
    } else {
        Ok(())
    }
}

impl Store {
    /// Records a new image. A name or id already in use, or a second default
    /// image, is refused.
    pub fn insert_image(&self, image: &Image) -> Result<(), StoreError> {
        let conn = self.conn();
        let result = conn.execute(
            &format!(
                "INSERT INTO images ({COLUMNS}) VALUES (:id, :name, :state, :source_kind, \
                 :source_ref, :source_digest, :dir, :kernel_path, :vmlinux_path, :initrd_path, \
                 :rootfs_path, :work_seed_path, :manifest_json, :size_bytes, :default_init, \
                 :is_default, :last_error, :created_at)"
            ),
            named_params! {
                ":id": image.id,
                ":name": image.name,
                ":state": image.state,
                ":source_kind": image.source_kind,
                ":source_ref": image.source_ref,
                ":source_digest": image.source_digest,
                ":dir": sql::path_text(&image.dir)?,
                ":kernel_path": sql::path_text(&image.kernel_path)?,
                ":vmlinux_path": sql::opt_path_text(image.vmlinux_path.as_ref())?,
                ":initrd_path": sql::opt_path_text(image.initrd_path.as_ref())?,
                ":rootfs_path": sql::path_text(&image.rootfs_path)?,
                ":work_seed_path": sql::opt_path_text(image.work_seed_path.as_ref())?,
                ":manifest_json": sql::json_text(&image.manifest)?,
                ":size_bytes": image.size_bytes,
                ":default_init": image.default_init.as_str(),
                ":is_default": image.is_default,
                ":last_error": image.last_error,
                ":created_at": image.created_at,
            },
        );
        let Err(err) = result else { return Ok(()) };
        Err(match violation(&err) {
            Some(Violation::Unique(cols)) if cols == ["images.name"] => StoreError::NameTaken {
                kind: EntityKind::Image,
                name: image.name.clone(),
            },
            Some(Violation::Unique(cols)) if cols == ["images.id"] => {
                StoreError::Conflict(format!("an image with id \"{}\" already exists", image.id))
            }
            Some(Violation::Unique(cols)) if cols == ["images.is_default"] => {
                let holder = default_name(&conn)?.unwrap_or_default();
                StoreError::Conflict(format!(
                    "image \"{holder}\" is already the default; make \"{}\" the default \
                     after adding it",
                    image.name
                ))
            }
            Some(Violation::Check(rule)) => StoreError::Invalid {
                kind: EntityKind::Image,
                rule,
            },
            _ => err.into(),
        })
    }

    /// The image with this id.
    pub fn image_by_id(&self, id: &str) -> Result<Image, StoreError> {
        query_one(&self.conn(), "id = ?1", id)?.ok_or_else(|| not_found(id))
    }

    /// The image with this name.
    pub fn image_by_name(&self, name: &str) -> Result<Image, StoreError> {
        query_one(&self.conn(), "name = ?1", name)?.ok_or_else(|| not_found(name))
    }

    /// The image whose id, or else whose name, is `key`.
    pub fn find_image(&self, key: &str) -> Result<Image, StoreError> {
        let conn = self.conn();
        match query_one(&conn, "id = ?1", key)? {
            Some(image) => Ok(image),
            None => query_one(&conn, "name = ?1", key)?.ok_or_else(|| not_found(key)),
        }
    }

    /// All images, by name.
    pub fn list_images(&self) -> Result<Vec<Image>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM images ORDER BY name"))?;
        let images = stmt.query_map([], from_row)?.collect::<Result<_, _>>()?;
        Ok(images)
    }

    /// Sets an image's state and its last error (`None` clears it).
    pub fn set_image_state(
        &self,
        id: &str,
        state: ImageState,
        last_error: Option<&str>,
    ) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE images SET state = ?2, last_error = ?3 WHERE id = ?1",
            rusqlite::params![id, state, last_error],
        )?;
        check_changed(changed, id)
    }

    /// Marks a built image ready, recording its file manifest (file name →
    /// sha256) and total size, and clearing any last error.
    pub fn complete_image(
        &self,
        id: &str,
        manifest: &BTreeMap<String, String>,
        size_bytes: u64,
    ) -> Result<(), StoreError> {
        let changed = self.conn().execute(
            "UPDATE images SET state = ?2, manifest_json = ?3, size_bytes = ?4, \
             last_error = NULL WHERE id = ?1",
            rusqlite::params![id, ImageState::Ready, sql::json_text(manifest)?, size_bytes],
        )?;
        check_changed(changed, id)
    }

    /// Makes this image the default, atomically taking the mark from the
    /// previous default.
    pub fn set_default_image(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE images SET is_default = 0 WHERE is_default = 1 AND id != ?1",
            [id],
        )?;
        let changed = tx.execute("UPDATE images SET is_default = 1 WHERE id = ?1", [id])?;
        check_changed(changed, id)?;
        tx.commit()?;
        Ok(())
    }

    /// The default image, if one is set.
    pub fn default_image(&self) -> Result<Option<Image>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM images WHERE is_default = 1"),
                [],
                from_row,
            )
            .optional()?)
    }

    /// Deletes an image record. Refused with [`StoreError::ImageInUse`] while
    /// any VM uses the image.
    pub fn delete_image(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(name) = tx
            .query_row("SELECT name FROM images WHERE id = ?1", [id], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
        else {
            return Err(not_found(id));
        };
        let vms = users(&tx, id)?;
        if !vms.is_empty() {
            return Err(StoreError::ImageInUse { image: name, vms });
        }
        let snapshots = crate::snapshots::of_image(&tx, id)?;
        if !snapshots.is_empty() {
            return Err(StoreError::ImageKeptBySnapshots {
                image: name,
                snapshots,
            });
        }
        tx.execute("DELETE FROM images WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }
}
