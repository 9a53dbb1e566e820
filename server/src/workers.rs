//! Workers as the server knows them: each lease call records the worker (at most once a
//! second), and the API, the dashboard and the submit form read them here.

use crate::db::{Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use serde::Serialize;
use vmfarm_proto::wire::{CacheStats, WorkerImage};

/// A worker as it last called in.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub name: String,
    /// Unix time in milliseconds.
    pub last_seen: i64,
    pub slots: i64,
    pub images: Vec<WorkerImage>,
    pub version: String,
    /// Its network proxy's cache.
    pub cache: CacheStats,
}

/// Records that `worker` called in.
pub async fn record(tx: &mut WriteTx, worker: &WorkerView) -> AppResult<()> {
    let images = serde_json::to_string(&worker.images).map_err(AppError::internal)?;
    let cache = serde_json::to_string(&worker.cache).map_err(AppError::internal)?;
    tx.execute(
        "INSERT INTO workers (name, last_seen, slots, images, version, cache) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, slots = excluded.slots, \
         images = excluded.images, version = excluded.version, cache = excluded.cache",
        &[
            (&worker.name).into(),
            now_ms().into(),
            worker.slots.into(),
            (&images).into(),
            (&worker.version).into(),
            (&cache).into(),
        ],
    )
    .await?;
    Ok(())
}

/// Every worker that has called in, by name.
pub async fn list(db: &Db) -> AppResult<Vec<WorkerView>> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT name, last_seen, slots, images, version, cache FROM workers ORDER BY name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(WorkerView {
                name: row.text(0)?,
                last_seen: row.int(1)?,
                slots: row.int(2)?,
                images: serde_json::from_str(&row.text(3)?).map_err(AppError::internal)?,
                version: row.text(4)?,
                cache: serde_json::from_str(&row.text(5)?).map_err(AppError::internal)?,
            })
        })
        .collect()
}

/// The names of the images any worker has, sorted, each once.
pub async fn known_images(db: &Db) -> AppResult<Vec<String>> {
    let names: std::collections::BTreeSet<String> = list(db)
        .await?
        .into_iter()
        .flat_map(|w| w.images.into_iter().map(|i| i.name))
        .collect();
    Ok(names.into_iter().collect())
}
