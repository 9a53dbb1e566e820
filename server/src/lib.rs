//! vmfarm's server.
