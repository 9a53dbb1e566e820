//! Types shared by vmfarm's parts.
