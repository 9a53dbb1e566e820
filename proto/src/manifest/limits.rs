//! The limits a manifest is held to. Each error that enforces one names it.

use crate::units::{GIB, MIB};
use std::time::Duration;

/// Largest manifest text, in bytes (the server answers 413 past it).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
pub const MAX_IMAGES: usize = 16;
pub const MAX_TAGS: usize = 32;
pub const MAX_SECRETS: usize = 32;
pub const MAX_SOURCES: usize = 16;
pub const MAX_TASKS: usize = 64;
pub const MAX_ARTIFACTS: usize = 64;
pub const MAX_TRIGGERS: usize = 8;
/// Entries of `packages`.
pub const MAX_PACKAGES: usize = 256;
/// Patterns of `[network] allow`.
pub const MAX_ALLOW: usize = 64;
pub const MAX_ENV_VARS: usize = 128;
pub const MAX_ENV_VALUE_BYTES: usize = 4096;
pub const MAX_SCRIPT_BYTES: usize = 64 * 1024;
pub const MAX_URL_BYTES: usize = 2048;
pub const MIN_PRIORITY: i64 = -1000;
pub const MAX_PRIORITY: i64 = 1000;
pub const MAX_CPUS: i64 = 64;
pub const MIN_MEMORY: u64 = 128 * MIB;
pub const MAX_MEMORY: u64 = 64 * GIB;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `[[caches]]` of one manifest, and paths of one cache.
pub const MAX_CACHES: usize = crate::cache::CacheMount::MAX;
pub const MAX_CACHE_PATHS: usize = crate::cache::CacheMount::MAX_PATHS;
/// A cache disk's size: room for ext4's own structures at the least.
pub const MIN_CACHE_SIZE: u64 = 64 * MIB;
pub const MAX_CACHE_SIZE: u64 = 64 * GIB;
