//! One SQLite statement with its values, run on whichever connection its transaction has: the writer
//! (rusqlite, on the calling thread) or a reader (sqlx's pool, on the connection's thread). The rows it reads
//! come back as either driver's row, behind one [`Cols`].

use std::borrow::Cow;
use std::sync::Arc;

use countersign_core::store::StoreError;
use rusqlite::types::{FromSql, ToSqlOutput, Value as Lite};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{AssertSqlSafe, Row as _, Sqlite};

use crate::rows::{Cols, SqlxRow, map_sqlx};
use crate::writes::Value;

/// A statement with a `?` for each of its values, in order.
pub struct Stmt {
    pub sql: Cow<'static, str>,
    pub values: Vec<Value>,
}

/// `sql`, with no values bound yet.
pub fn q(sql: impl Into<Cow<'static, str>>) -> Stmt {
    Stmt { sql: sql.into(), values: Vec::new() }
}

impl Stmt {
    /// Binds the next `?`.
    pub fn bind(mut self, value: impl Into<Value>) -> Stmt {
        self.values.push(value.into());
        self
    }

    /// The statement as sqlx's, for a reader.
    pub fn into_sqlx(self) -> sqlx::query::Query<'static, Sqlite, SqliteArguments> {
        let mut query = match self.sql {
            Cow::Borrowed(sql) => sqlx::query(sql),
            Cow::Owned(sql) => sqlx::query(AssertSqlSafe(sql)),
        };
        for value in self.values {
            query = match value {
                Value::Text(text) => query.bind(text),
                Value::Int(int) => query.bind(int),
            };
        }
        query
    }

    /// Runs the statement on the writer: the number of rows it changed.
    pub fn execute(&self, conn: &rusqlite::Connection) -> rusqlite::Result<usize> {
        conn.prepare_cached(&self.sql)?.execute(rusqlite::params_from_iter(&self.values))
    }

    /// Runs the statement on the writer: every row it reads, or (`first`) the first.
    pub fn rows(&self, conn: &rusqlite::Connection, first: bool) -> rusqlite::Result<Vec<Row>> {
        let mut statement = conn.prepare_cached(&self.sql)?;
        let columns: Arc<[String]> = statement.column_names().into_iter().map(str::to_owned).collect();
        let mut rows = statement.query(rusqlite::params_from_iter(&self.values))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns.len()).map(|i| row.get::<_, Lite>(i)).collect::<rusqlite::Result<_>>()?;
            out.push(Row::Writer(OwnedRow { columns: Arc::clone(&columns), values }));
            if first {
                break;
            }
        }
        Ok(out)
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Text(Some(text)) => ToSqlOutput::from(text.as_str()),
            Value::Int(Some(int)) => ToSqlOutput::from(*int),
            Value::Text(None) | Value::Int(None) => ToSqlOutput::Owned(Lite::Null),
        })
    }
}

impl From<String> for Value {
    fn from(value: String) -> Value {
        Value::Text(Some(value))
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Text(Some(value.to_owned()))
    }
}

impl From<Option<String>> for Value {
    fn from(value: Option<String>) -> Value {
        Value::Text(value)
    }
}

impl From<Option<&str>> for Value {
    fn from(value: Option<&str>) -> Value {
        Value::Text(value.map(str::to_owned))
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Int(Some(value))
    }
}

impl From<Option<i64>> for Value {
    fn from(value: Option<i64>) -> Value {
        Value::Int(value)
    }
}

/// A row the writer read: its columns' names (shared by the statement's rows) and values.
pub struct OwnedRow {
    columns: Arc<[String]>,
    values: Vec<Lite>,
}

impl OwnedRow {
    /// The column as `T`, as strictly as sqlx reads it: text only from TEXT, integers only from INTEGER.
    fn get<T: FromSql>(&self, column: &str) -> Result<T, StoreError> {
        let at = self.columns.iter().position(|c| c == column);
        let value = at
            .and_then(|i| self.values.get(i))
            .ok_or_else(|| StoreError::Internal(format!("no column `{column}` in the row read")))?;
        T::column_result(value.into()).map_err(|e| StoreError::Internal(format!("stored {column} cannot be read: {e}")))
    }
}

/// A row read on either connection.
pub enum Row {
    Reader(SqliteRow),
    Writer(OwnedRow),
}

/// SQLite stores a boolean as an integer, 0 or 1.
impl SqlxRow for SqliteRow {
    fn flag_of(&self, column: &str) -> Result<bool, StoreError> {
        Ok(self.try_get::<i64, _>(column).map_err(map_sqlx)? != 0)
    }
}

impl Cols for Row {
    fn text(&self, column: &str) -> Result<String, StoreError> {
        match self {
            Row::Reader(row) => row.text(column),
            Row::Writer(row) => row.get(column),
        }
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        match self {
            Row::Reader(row) => row.opt_text(column),
            Row::Writer(row) => row.get(column),
        }
    }

    fn int(&self, column: &str) -> Result<i64, StoreError> {
        match self {
            Row::Reader(row) => row.int(column),
            Row::Writer(row) => row.get(column),
        }
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        match self {
            Row::Reader(row) => row.opt_int(column),
            Row::Writer(row) => row.get(column),
        }
    }

    fn flag(&self, column: &str) -> Result<bool, StoreError> {
        Ok(self.int(column)? != 0)
    }
}

/// A writer's error as the store's: a uniqueness conflict, a busy database, SQLite's own message otherwise
/// (as [`map_sqlx`] maps a reader's).
pub fn map_lite(error: rusqlite::Error) -> StoreError {
    use rusqlite::ffi;
    match &error {
        rusqlite::Error::SqliteFailure(failure, message) => {
            let message = message.clone().unwrap_or_else(|| failure.to_string());
            match failure.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => StoreError::Conflict(message),
                _ if matches!(
                    failure.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
                {
                    StoreError::Unavailable(message)
                }
                _ => StoreError::Internal(message),
            }
        }
        _ => StoreError::Internal(error.to_string()),
    }
}

/// A uniqueness, foreign-key, not-null or check constraint refused the statement: SQLite undid that statement
/// alone, and the transaction may go on (a caller may answer a conflict). Not a trigger's refusal: the
/// schema's guards (the audit log is append-only, retention only moves forward) fail the transaction.
pub fn is_constraint(error: &rusqlite::Error) -> bool {
    use rusqlite::ffi;
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => matches!(
            failure.extended_code,
            ffi::SQLITE_CONSTRAINT_UNIQUE
                | ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
                | ffi::SQLITE_CONSTRAINT_NOTNULL
                | ffi::SQLITE_CONSTRAINT_CHECK
        ),
        _ => false,
    }
}

/// An I/O error (`SQLITE_IOERR`, a failed sync among them).
pub fn is_io(error: &rusqlite::Error) -> bool {
    error.sqlite_error_code() == Some(rusqlite::ErrorCode::SystemIoFailure)
}
