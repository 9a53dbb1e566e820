//! vmfarm's server: the HTTP API, the durable job queue with leases, logs, artifacts,
//! schedules and the web UI's routes.

pub mod config;
