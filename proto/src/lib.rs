//! Types shared by vmfarm's parts: the job manifest and its validation, job and task states,
//! the rules for names, and the payloads that cross between the CLI, server, worker and guest.
//!
//! `CONTRACTS.md` (beside `DESIGN.md`) is the prose form of what this crate fixes in types.

// Defined before the modules that use it.
/// Serde as text: `Display` out, `FromStr` in, the parse error kept as the message.
macro_rules! serde_as_text {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod api;
pub mod cache;
pub mod config_paths;
pub mod guest;
pub mod manifest;
#[cfg(feature = "metrics")]
pub mod metric_labels;
pub mod names;
pub mod network;
pub mod state;
pub mod tunnel;
pub mod units;
pub mod wire;

pub use manifest::{Manifest, ManifestError, ManifestErrors};
pub use state::{JobState, TaskState};
