//! vmfarm's server: the HTTP API, the durable job queue with leases, logs, artifacts,
//! schedules and the web UI's routes.

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod commit_manifests;
pub mod commit_status;
pub mod config;
pub mod db;
pub mod error;
pub mod extract;
pub mod fence;
pub mod files;
pub mod forges;
pub mod image_demand;
pub mod job_end;
pub mod job_views;
pub mod jobs;
pub mod leases;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod outbox;
pub mod pushes;
pub mod random;
pub mod replicas;
pub mod retention;
pub mod routes;
pub mod s3_test_server;
pub mod schedules;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod store;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod triggers;
pub mod tunnels;
pub mod users;
pub mod web;
pub mod workers;
