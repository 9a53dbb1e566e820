//! The worker daemon (DESIGN.md "A job's way", steps 2-5): leases jobs, boots their guests,
//! runs their tasks over SSH, streams logs, collects artifacts, reports states.

pub mod backend_choice;
pub mod budget;
pub mod caches;
pub mod daemon;
pub mod guest_paths;
pub mod heartbeat;
pub mod job;
pub mod log_masker;
pub mod log_shipper;
pub mod metrics;
pub mod server_client;
pub mod sources;
pub mod templates;
