//! The server's Prometheus metrics at `/metrics` (OpenMetrics text, through the Prometheus
//! project's `prometheus-client` crate): what this process counted and timed (HTTP requests by
//! route and status, leases, queue waits, job runs, outbound calls), and at each scrape what the
//! database holds (jobs by state, queue depth per image), which every replica reports alike.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmfarm_proto::JobState;
use vmfarm_proto::metric_labels::{ImageLabel, StateLabel};

/// Bounds of request and lease durations, in seconds: 0.5 ms to 10 s.
const FAST: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bounds of queue waits and job runs, in seconds: a second to six hours.
const SLOW: [f64; 13] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The matched route pattern (bounded cardinality), not the raw path.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutboundLabels {
    /// `webhook` or `commit_status`.
    kind: String,
    /// `delivered`, `retry` (failed, tried again later) or `failed` (out of attempts).
    outcome: String,
}

/// What an outbound call came to, for `vmfarm_outbound_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Delivered,
    Retry,
    Failed,
}

/// What each scrape reads from the database, shared with the collector that writes it.
#[derive(Debug, Default)]
pub struct Figures {
    /// `(state, jobs)`.
    pub by_state: Vec<(String, i64)>,
    /// `(image, queued jobs)`.
    pub queue_depth: Vec<(String, i64)>,
}

/// Writes the last [`Figures`] read: every state (zero included) and every image with a queue.
#[derive(Debug, Default)]
struct DatabaseFigures(Arc<Mutex<Figures>>);

impl Collector for DatabaseFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = self.0.lock().map_err(|_| std::fmt::Error)?;
        let gauge = ConstGauge::new(0i64);
        let mut jobs = encoder.encode_descriptor(
            "vmfarm_jobs",
            "Jobs by state, in the database.",
            None,
            gauge.metric_type(),
        )?;
        for s in JobState::ALL {
            let n = figures
                .by_state
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            ConstGauge::new(n).encode(jobs.encode_family(&[("state", s.as_str())])?)?;
        }
        let mut depth = encoder.encode_descriptor(
            "vmfarm_queue_depth",
            "Queued jobs per image, in the database.",
            None,
            gauge.metric_type(),
        )?;
        for (image, n) in deepest_queues(&figures.queue_depth) {
            ConstGauge::new(n).encode(depth.encode_family(&[("image", image)])?)?;
        }
        Ok(())
    }
}

/// Images with a `vmfarm_queue_depth` series of their own: a submitter may name any image, and
/// each name would be a series; past the deepest queues, the rest are summed as [`OTHER_IMAGES`].
const MAX_IMAGE_SERIES: usize = 100;
/// The image label of the queues summed (not an image name: names have no parentheses).
const OTHER_IMAGES: &str = "(others)";

/// `queue` (image, jobs) as its series: the [`MAX_IMAGE_SERIES`] deepest, then the others' sum.
fn deepest_queues(queue: &[(String, i64)]) -> Vec<(&str, i64)> {
    let mut deepest: Vec<(&str, i64)> = queue.iter().map(|(i, n)| (i.as_str(), *n)).collect();
    deepest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if deepest.len() > MAX_IMAGE_SERIES {
        let others = deepest.split_off(MAX_IMAGE_SERIES);
        deepest.push((OTHER_IMAGES, others.iter().map(|(_, n)| n).sum()));
    }
    deepest
}

/// The server's metrics: one set per server process (each test's server has its own).
pub struct Metrics {
    registry: Registry,
    figures: Arc<Mutex<Figures>>,
    requests: Family<RequestLabels, Histogram>,
    lease: Histogram,
    queue_wait: Family<ImageLabel, Histogram>,
    job_run: Family<StateLabel, Histogram>,
    submitted: Counter,
    finished: Family<StateLabel, Counter>,
    outbound: Family<OutboundLabels, Counter>,
}

fn fast() -> Histogram {
    Histogram::new(FAST)
}

fn slow() -> Histogram {
    Histogram::new(SLOW)
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let figures = Arc::new(Mutex::new(Figures::default()));
        registry.register_collector(Box::new(DatabaseFigures(figures.clone())));
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(fast as fn() -> _);
        registry.register_with_unit(
            "vmfarm_http_request_duration",
            "HTTP requests by method, route and status, and how long each took to answer.",
            Unit::Seconds,
            requests.clone(),
        );
        let lease = fast();
        registry.register_with_unit(
            "vmfarm_lease_duration",
            "Time to find and lease a job for a worker, when one was leased.",
            Unit::Seconds,
            lease.clone(),
        );
        let queue_wait = Family::<ImageLabel, Histogram>::new_with_constructor(slow as fn() -> _);
        registry.register_with_unit(
            "vmfarm_queue_wait",
            "Time from a job's submit to its lease, by image.",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let job_run = Family::<StateLabel, Histogram>::new_with_constructor(slow as fn() -> _);
        registry.register_with_unit(
            "vmfarm_job_duration",
            "Time from a job's start on its worker to its end, by end state (jobs that ran).",
            Unit::Seconds,
            job_run.clone(),
        );
        let submitted = Counter::default();
        registry.register(
            "vmfarm_jobs_submitted",
            "Jobs submitted through this server process.",
            submitted.clone(),
        );
        let finished = Family::<StateLabel, Counter>::default();
        registry.register(
            "vmfarm_jobs_finished",
            "Jobs that ended through this server process, by end state.",
            finished.clone(),
        );
        let outbound = Family::<OutboundLabels, Counter>::default();
        registry.register(
            "vmfarm_outbound_calls",
            "Webhook deliveries and commit status reports made, by kind and outcome \
             (retry: failed and tried again later; failed: out of attempts).",
            outbound.clone(),
        );
        Metrics {
            registry,
            figures,
            requests,
            lease,
            queue_wait,
            job_run,
            submitted,
            finished,
            outbound,
        }
    }
}

impl Metrics {
    pub fn jobs_submitted(&self, n: usize) {
        self.submitted.inc_by(n as u64);
    }

    /// A job ended as `state`; `ran` is how long it ran on its worker, if it started.
    pub fn job_finished(&self, state: JobState, ran: Option<Duration>) {
        let label = StateLabel {
            state: state.as_str().to_owned(),
        };
        self.finished.get_or_create(&label).inc();
        if let Some(ran) = ran {
            self.job_run
                .get_or_create(&label)
                .observe(ran.as_secs_f64());
        }
    }

    /// A job of `image` was leased after waiting `waited` since its submit, and the lease took
    /// `took` to find it.
    pub fn job_leased(&self, image: &str, waited: Duration, took: Duration) {
        self.lease.observe(took.as_secs_f64());
        let label = ImageLabel {
            image: image.to_owned(),
        };
        self.queue_wait
            .get_or_create(&label)
            .observe(waited.as_secs_f64());
    }

    /// An outbound call of `kind` (`webhook`, `commit_status`) came to `outcome`.
    pub fn outbound_call(&self, kind: &str, outcome: CallOutcome) {
        let outcome = match outcome {
            CallOutcome::Delivered => "delivered",
            CallOutcome::Retry => "retry",
            CallOutcome::Failed => "failed",
        };
        let labels = OutboundLabels {
            kind: kind.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.outbound.get_or_create(&labels).inc();
    }

    /// `route` is the matched route pattern, not the raw path; a method outside HTTP's usual
    /// ones counts as `other` (any word is a method to HTTP: a caller must not be able to make
    /// series without end).
    pub fn http_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
        let method = METHODS.iter().find(|m| **m == method).unwrap_or(&"other");
        let labels = RequestLabels {
            method: (*method).to_owned(),
            route: route.to_owned(),
            status,
        };
        self.requests
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The metrics text, with the database's `figures`.
    pub fn render(&self, figures: Figures) -> String {
        if let Ok(mut last) = self.figures.lock() {
            *last = figures;
        }
        let mut out = String::new();
        // Writing to a String fails only if a collector fails, which the lock above rules out.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_queue_of_many_images_has_bounded_series() {
        let queue: Vec<(String, i64)> = (0..150).map(|i| (format!("img-{i:03}"), i)).collect();
        let metrics = Metrics::default();
        let text = metrics.render(Figures {
            by_state: Vec::new(),
            queue_depth: queue,
        });
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vmfarm_queue_depth{"))
            .collect();
        assert_eq!(series.len(), MAX_IMAGE_SERIES + 1, "{text}");
        assert!(series.contains(&"vmfarm_queue_depth{image=\"img-149\"} 149"));
        assert!(!text.contains("img-049"));
        // The 50 shallowest, 0 to 49, summed.
        assert!(series.contains(&"vmfarm_queue_depth{image=\"(others)\"} 1225"));
    }

    #[test]
    fn test_unusual_methods_share_one_series() {
        let metrics = Metrics::default();
        for method in ["FOO1", "FOO2", "GET", "BAR"] {
            metrics.http_request(method, "unmatched", 404, Duration::from_millis(1));
        }
        let text = metrics.render(Figures::default());
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vmfarm_http_request_duration_seconds_count"))
            .collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        assert!(
            counts
                .iter()
                .any(|l| l.contains("method=\"other\"") && l.ends_with(" 3")),
            "{counts:?}"
        );
    }
}
