//! Small conversions between Rust values and SQLite columns.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use rusqlite::Row;
use rusqlite::types::Type;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StoreError;

/// A path as the text stored for it.
pub(crate) fn path_text(path: &Path) -> Result<&str, StoreError> {
    path.to_str()
        .ok_or_else(|| StoreError::NonUtf8Path(path.to_owned()))
}

pub(crate) fn opt_path_text(path: Option<&PathBuf>) -> Result<Option<&str>, StoreError> {
    path.map(|p| path_text(p)).transpose()
}

pub(crate) fn json_text<T: Serialize>(value: &T) -> Result<String, StoreError> {
    Ok(serde_json::to_string(value)?)
}

fn conversion_error(
    row: &Row<'_>,
    col: &str,
    err: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    let stmt: &rusqlite::Statement<'_> = row.as_ref();
    let idx = stmt.column_index(col).unwrap_or_default();
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(err))
}

/// A text column parsed with `FromStr` (IP addresses).
pub(crate) fn parsed<T>(row: &Row<'_>, col: &str) -> rusqlite::Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = row.get(col)?;
    text.parse().map_err(|e| conversion_error(row, col, e))
}

pub(crate) fn opt_parsed<T>(row: &Row<'_>, col: &str) -> rusqlite::Result<Option<T>>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: Option<String> = row.get(col)?;
    text.map(|t| t.parse().map_err(|e| conversion_error(row, col, e)))
        .transpose()
}

/// A JSON text column.
pub(crate) fn json<T: DeserializeOwned>(row: &Row<'_>, col: &str) -> rusqlite::Result<T> {
    let text: String = row.get(col)?;
    serde_json::from_str(&text).map_err(|e| conversion_error(row, col, e))
}

pub(crate) fn path(row: &Row<'_>, col: &str) -> rusqlite::Result<PathBuf> {
    row.get::<_, String>(col).map(PathBuf::from)
}

pub(crate) fn opt_path(row: &Row<'_>, col: &str) -> rusqlite::Result<Option<PathBuf>> {
    row.get::<_, Option<String>>(col)
        .map(|p| p.map(PathBuf::from))
}
