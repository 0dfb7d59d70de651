//! Conversions shared by the backends: times as microseconds, enums and JSON columns as text, and the
//! mapping of driver errors onto `StoreError`.
//!
//! Kept free of any one driver's row type so both backends can use it.

use chrono::{DateTime, Utc};
use countersign_core::store::StoreError;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn to_us(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

pub fn opt_us(time: Option<DateTime<Utc>>) -> Option<i64> {
    time.map(to_us)
}

pub fn from_us(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| StoreError::Internal(format!("stored time {us} is out of range")))
}

pub fn opt_from_us(us: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    us.map(from_us).transpose()
}

pub fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(format!("cannot encode JSON column: {e}")))
}

pub fn from_json<T: DeserializeOwned>(column: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Internal(format!("stored {column} is not valid: {e}")))
}

pub fn corrupt(column: &str, value: &str) -> StoreError {
    StoreError::Internal(format!("stored {column} `{value}` is not valid"))
}

pub fn map_sqlx(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(db.message().to_owned()),
        sqlx::Error::Database(db) if db.message().contains("locked") || db.message().contains("busy") => {
            StoreError::Unavailable(db.message().to_owned())
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(error.to_string())
        }
        _ => StoreError::Internal(error.to_string()),
    }
}
