//! The worker's Prometheus metrics, on a listener of its own (`[metrics]` in its config):
//! how long guests take to boot and jobs to start, jobs and guests running, its slots, and its
//! jobs' network proxy (bytes moved, cache hits). The names and units follow Prometheus' usual
//! ones; the Grafana dashboard in configs/ reads exactly these.

use super::budget::Budget;
use crate::config::MetricsListener;
use crate::network::{ProxyCache, ProxyMeter};
use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use vmfarm_proto::JobState;
use vmfarm_proto::metric_labels::{ImageLabel, StateLabel};

/// Bounds of boot and start times, in seconds: 0.25 s (a warm start) to 10 minutes (a whole OS
/// booting under emulation).
const STARTS: [f64; 12] = [
    0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 600.0,
];

/// The worker's metrics, shared by the daemon, its jobs and the listener.
pub struct WorkerMetrics {
    registry: Registry,
    boot: Family<ImageLabel, Histogram>,
    job_start: Family<ImageLabel, Histogram>,
    finished: Family<StateLabel, Counter>,
    jobs_running: Gauge,
    guests_running: Gauge,
    /// The jobs' networks add the bytes they move here.
    pub proxy: ProxyMeter,
}

/// Read at each scrape: the slots (total and taken) and the proxy cache's own counters.
struct AtScrape {
    budget: Arc<Budget>,
    cache: ProxyCache,
}

impl std::fmt::Debug for AtScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtScrape")
    }
}

impl Collector for AtScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ((cpus, memory_mib), (cpus_used, memory_used_mib)) = self.budget.sizes();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, unit, value: u64| {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
        };
        let mib = 1024 * 1024;
        gauge(
            &mut encoder,
            "vmfarm_worker_cpus",
            "vCPUs the worker's slots hold.",
            None,
            cpus.into(),
        )?;
        gauge(
            &mut encoder,
            "vmfarm_worker_cpus_in_use",
            "vCPUs of the slots taken by jobs (and the one held for the next lease).",
            None,
            cpus_used.into(),
        )?;
        gauge(
            &mut encoder,
            "vmfarm_worker_memory",
            "Guest memory the worker's slots hold.",
            Some(&Unit::Bytes),
            memory_mib.saturating_mul(mib),
        )?;
        gauge(
            &mut encoder,
            "vmfarm_worker_memory_in_use",
            "Guest memory of the slots taken by jobs (and the one held for the next lease).",
            Some(&Unit::Bytes),
            memory_used_mib.saturating_mul(mib),
        )?;
        let cache = self.cache.stats();
        let counter =
            |encoder: &mut DescriptorEncoder, name: &str, help: &str, unit, value: u64| {
                let metric = ConstCounter::new(value);
                metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
            };
        counter(
            &mut encoder,
            "vmfarm_worker_proxy_cache_hits",
            "Cacheable requests answered from the proxy's cache.",
            None,
            cache.hits,
        )?;
        counter(
            &mut encoder,
            "vmfarm_worker_proxy_cache_misses",
            "Cacheable requests the proxy fetched from their origin.",
            None,
            cache.misses,
        )?;
        counter(
            &mut encoder,
            "vmfarm_worker_proxy_cache_served",
            "Bytes the proxy served from its cache.",
            Some(&Unit::Bytes),
            cache.bytes_from_cache,
        )?;
        counter(
            &mut encoder,
            "vmfarm_worker_proxy_cache_fetched",
            "Bytes of cacheable answers the proxy fetched from their origins.",
            Some(&Unit::Bytes),
            cache.bytes_fetched,
        )?;
        gauge(
            &mut encoder,
            "vmfarm_worker_proxy_cache_size",
            "Size of the proxy's cache.",
            Some(&Unit::Bytes),
            cache.size,
        )?;
        Ok(())
    }
}

impl WorkerMetrics {
    pub fn new(budget: Arc<Budget>, cache: ProxyCache) -> WorkerMetrics {
        let mut registry = Registry::default();
        let histograms = || Histogram::new(STARTS);
        let boot = Family::<ImageLabel, Histogram>::new_with_constructor(histograms as fn() -> _);
        registry.register_with_unit(
            "vmfarm_worker_boot_duration",
            "Time from starting a guest to its agent (or cloud-init) saying it is ready, by image.",
            Unit::Seconds,
            boot.clone(),
        );
        let job_start =
            Family::<ImageLabel, Histogram>::new_with_constructor(histograms as fn() -> _);
        registry.register_with_unit(
            "vmfarm_worker_job_start_duration",
            "Time from a job's lease to its guest running it (SSH open, reported running), by image.",
            Unit::Seconds,
            job_start.clone(),
        );
        let finished = Family::<StateLabel, Counter>::default();
        registry.register(
            "vmfarm_worker_jobs_finished",
            "Jobs this worker ran to their end, by end state.",
            finished.clone(),
        );
        let jobs_running = Gauge::default();
        registry.register(
            "vmfarm_worker_jobs_running",
            "Jobs leased by this worker and not yet ended (its slots in use).",
            jobs_running.clone(),
        );
        let guests_running = Gauge::default();
        registry.register(
            "vmfarm_worker_guests_running",
            "Guests running, kept failed guests included.",
            guests_running.clone(),
        );
        let proxy = ProxyMeter::default();
        registry.register_with_unit(
            "vmfarm_worker_proxy_received",
            "Bytes guests sent through the jobs' network proxy.",
            Unit::Bytes,
            proxy.from_guests.clone(),
        );
        registry.register_with_unit(
            "vmfarm_worker_proxy_sent",
            "Bytes the jobs' network proxy sent to guests.",
            Unit::Bytes,
            proxy.to_guests.clone(),
        );
        registry.register(
            "vmfarm_worker_proxy_connections",
            "Connections guests opened to the jobs' network proxy.",
            proxy.connections.clone(),
        );
        registry.register_collector(Box::new(AtScrape { budget, cache }));
        WorkerMetrics {
            registry,
            boot,
            job_start,
            finished,
            jobs_running,
            guests_running,
            proxy,
        }
    }

    /// A guest of `image` said it was ready `took` after it was started.
    pub fn guest_ready(&self, image: &str, took: Duration) {
        self.boot
            .get_or_create(&image_label(image))
            .observe(took.as_secs_f64());
    }

    /// A job of `image` started running `took` after its lease.
    pub fn job_started(&self, image: &str, took: Duration) {
        self.job_start
            .get_or_create(&image_label(image))
            .observe(took.as_secs_f64());
    }

    /// A job runs until the returned value is dropped.
    pub fn job_running(&self) -> Running {
        Running::new(&self.jobs_running)
    }

    /// A guest runs until the returned value is dropped.
    pub fn guest_running(&self) -> Running {
        Running::new(&self.guests_running)
    }

    /// A job ended as `state`.
    pub fn job_finished(&self, state: JobState) {
        let label = StateLabel {
            state: state.as_str().to_owned(),
        };
        self.finished.get_or_create(&label).inc();
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector that fails leaves its part out.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn image_label(image: &str) -> ImageLabel {
    ImageLabel {
        image: image.to_owned(),
    }
}

/// One of a gauge's running things, counted down when dropped.
pub struct Running(Gauge);

impl Running {
    fn new(gauge: &Gauge) -> Running {
        gauge.inc();
        Running(gauge.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The content type of the metrics text.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct Listener {
    metrics: Arc<WorkerMetrics>,
    /// sha256 of the token asked for; `None`: open.
    token_hash: Option<[u8; 32]>,
}

/// Serves `/metrics` on `config.listen` (when set) for as long as the worker runs, and says
/// where (the address it is bound to). Refuses a listener that has no token and is not `open`.
pub async fn serve(
    config: &MetricsListener,
    metrics: Arc<WorkerMetrics>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(listen) = config.listen else {
        return Ok(None);
    };
    anyhow::ensure!(
        config.open || !config.token.is_empty(),
        "metrics.listen is set but metrics.token is empty: give the scraper a token \
         (metrics.token or VMFARM_METRICS_TOKEN), or set metrics.open = true to let anyone \
         who reaches {listen} read the metrics"
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening for /metrics on {listen}"))?;
    let bound = listener.local_addr()?;
    let state = Arc::new(Listener {
        metrics,
        token_hash: (!config.open).then(|| Sha256::digest(config.token.trim().as_bytes()).into()),
    });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .with_state(state);
    tracing::info!(listen = %bound, open = config.open, "serving the worker's /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the /metrics listener stopped");
        }
    });
    Ok(Some(bound))
}

async fn scrape(State(listener): State<Arc<Listener>>, headers: HeaderMap) -> Response {
    if let Some(want) = &listener.token_hash {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|token| <[u8; 32]>::from(Sha256::digest(token.trim().as_bytes())));
        if given.as_ref() != Some(want) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "the worker's /metrics needs `Authorization: Bearer <metrics.token>`\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        listener.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn metrics(dir: &std::path::Path) -> Arc<WorkerMetrics> {
        let cache = ProxyCache::open(dir, 1 << 20).await.unwrap();
        Arc::new(WorkerMetrics::new(Arc::new(Budget::new(4, 2048)), cache))
    }

    #[tokio::test]
    async fn test_the_listener_asks_for_its_token_and_shows_what_runs() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = metrics(dir.path()).await;
        let mut config = MetricsListener {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            token: String::new(),
            open: false,
        };
        let refused = serve(&config, metrics.clone()).await.unwrap_err();
        assert!(
            refused.to_string().contains("metrics.token is empty"),
            "{refused}"
        );
        config.token = "s3cret".into();
        let at = serve(&config, metrics.clone()).await.unwrap().unwrap();
        let url = format!("http://{at}/metrics");
        let http = reqwest::Client::new();
        for wrong in [None, Some("s3cre"), Some("s3cret2")] {
            let mut request = http.get(&url);
            if let Some(token) = wrong {
                request = request.bearer_auth(token);
            }
            assert_eq!(
                request.send().await.unwrap().status(),
                StatusCode::UNAUTHORIZED
            );
        }
        let scrape = || async {
            let answer = http.get(&url).bearer_auth("s3cret").send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK);
            answer.text().await.unwrap()
        };
        let guest = metrics.guest_running();
        let job = metrics.job_running();
        metrics.guest_ready("tiny", Duration::from_millis(1500));
        metrics.job_started("tiny", Duration::from_millis(2500));
        metrics.job_finished(JobState::Failed);
        let text = scrape().await;
        for line in [
            "vmfarm_worker_cpus 4",
            "vmfarm_worker_memory_bytes 2147483648",
            "vmfarm_worker_jobs_running 1",
            "vmfarm_worker_guests_running 1",
            "vmfarm_worker_boot_duration_seconds_bucket{le=\"2.0\",image=\"tiny\"} 1",
            "vmfarm_worker_job_start_duration_seconds_sum{image=\"tiny\"} 2.5",
            "vmfarm_worker_jobs_finished_total{state=\"failed\"} 1",
            "vmfarm_worker_proxy_cache_hits_total 0",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        drop((guest, job));
        let text = scrape().await;
        assert!(text.contains("vmfarm_worker_guests_running 0"), "{text}");
        assert!(text.contains("vmfarm_worker_jobs_running 0"), "{text}");
    }
}
