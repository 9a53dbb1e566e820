//! vmfarm's server: the HTTP API, the durable job queue with leases, logs, artifacts,
//! schedules and the web UI's routes.

pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod jobs;
pub mod leases;
pub mod logs;
pub mod metrics;
pub mod random;
pub mod routes;
pub mod schedules;
pub mod serve;
pub mod state;
pub mod store;
pub mod triggers;
pub mod web;
