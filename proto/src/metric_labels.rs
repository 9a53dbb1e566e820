//! The labels the server's and the workers' Prometheus metrics share (and the Grafana dashboard
//! in configs/ reads): one definition of each.

use prometheus_client::encoding::EncodeLabelSet;

/// `image="debian-12"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabel {
    pub image: String,
}

/// `state="succeeded"`: a job's state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}
