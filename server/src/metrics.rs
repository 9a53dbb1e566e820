//! Prometheus text at /metrics: jobs by state and queue depth per image (read from the
//! database by the caller), lease and HTTP latency histograms and counters (from this process).

use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;
use vmfarm_proto::JobState;
use vmfarm_proto::wire::CacheStats;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    submitted: u64,
    finished: Vec<(JobState, u64)>,
    lease: Histogram,
    http: Vec<(String, u16, Histogram)>,
}

#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

/// What `/metrics` reads from the database.
pub struct Figures {
    /// `(state, jobs)`.
    pub by_state: Vec<(String, i64)>,
    /// `(image, queued jobs)`.
    pub queue_depth: Vec<(String, i64)>,
    /// Each worker's network proxy cache, as it last called in.
    pub proxy_caches: Vec<(String, CacheStats)>,
}

/// A metric of a worker's proxy cache: its name, type, help, and how to read it.
type CacheSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CacheStats) -> u64,
);

/// The workers' proxy caches, each a labelled series per figure.
fn render_caches(out: &mut String, caches: &[(String, CacheStats)]) {
    let series: [CacheSeries; 6] = [
        (
            "vmfarm_proxy_cache_hits_total",
            "counter",
            "Cacheable requests answered from the worker's proxy cache.",
            |c| c.hits,
        ),
        (
            "vmfarm_proxy_cache_misses_total",
            "counter",
            "Cacheable requests the worker's proxy fetched from their origin.",
            |c| c.misses,
        ),
        (
            "vmfarm_proxy_cache_served_bytes_total",
            "counter",
            "Bytes the worker's proxy served from its cache.",
            |c| c.bytes_from_cache,
        ),
        (
            "vmfarm_proxy_cache_fetched_bytes_total",
            "counter",
            "Bytes of cacheable answers the worker's proxy fetched.",
            |c| c.bytes_fetched,
        ),
        (
            "vmfarm_proxy_cache_entries",
            "gauge",
            "Files in the worker's proxy cache.",
            |c| c.entries,
        ),
        (
            "vmfarm_proxy_cache_bytes",
            "gauge",
            "Size of the worker's proxy cache.",
            |c| c.size,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (worker, cache) in caches {
            let _ = writeln!(out, "{name}{{worker=\"{worker}\"}} {}", value(cache));
        }
    }
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut inner) = self.0.lock() {
            f(&mut inner);
        }
    }

    pub fn jobs_submitted(&self, n: usize) {
        self.with(|m| m.submitted += n as u64);
    }

    pub fn job_finished(&self, state: JobState) {
        self.with(|m| match m.finished.iter_mut().find(|(s, _)| *s == state) {
            Some((_, n)) => *n += 1,
            None => m.finished.push((state, 1)),
        });
    }

    pub fn lease_latency(&self, d: Duration) {
        self.with(|m| m.lease.observe(d.as_secs_f64()));
    }

    /// `route` is the matched route pattern (bounded cardinality), not the raw path.
    pub fn http_request(&self, route: &str, status: u16, d: Duration) {
        self.with(|m| {
            let h = match m
                .http
                .iter_mut()
                .position(|(r, s, _)| r == route && *s == status)
            {
                Some(i) => &mut m.http[i].2,
                None => {
                    m.http
                        .push((route.to_owned(), status, Histogram::default()));
                    let last = m.http.len() - 1;
                    &mut m.http[last].2
                }
            };
            h.observe(d.as_secs_f64());
        });
    }

    /// The metrics text, with the database's figures.
    pub fn render(&self, figures: &Figures) -> String {
        let Figures {
            by_state,
            queue_depth: depth,
            proxy_caches,
        } = figures;
        let mut out = String::new();
        out.push_str("# HELP vmfarm_jobs Jobs by state.\n# TYPE vmfarm_jobs gauge\n");
        for s in JobState::ALL {
            let n = by_state
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "vmfarm_jobs{{state=\"{s}\"}} {n}");
        }
        out.push_str(
            "# HELP vmfarm_queue_depth Queued jobs per image.\n# TYPE vmfarm_queue_depth gauge\n",
        );
        for (image, n) in depth {
            let _ = writeln!(out, "vmfarm_queue_depth{{image=\"{image}\"}} {n}");
        }
        render_caches(&mut out, proxy_caches);
        if let Ok(m) = self.0.lock() {
            out.push_str("# HELP vmfarm_jobs_submitted_total Jobs submitted to this process.\n# TYPE vmfarm_jobs_submitted_total counter\n");
            let _ = writeln!(out, "vmfarm_jobs_submitted_total {}", m.submitted);
            out.push_str("# HELP vmfarm_jobs_finished_total Jobs that ended, by final state.\n# TYPE vmfarm_jobs_finished_total counter\n");
            for (s, n) in &m.finished {
                let _ = writeln!(out, "vmfarm_jobs_finished_total{{state=\"{s}\"}} {n}");
            }
            out.push_str("# HELP vmfarm_lease_seconds Time to find and lease a job.\n# TYPE vmfarm_lease_seconds histogram\n");
            m.lease.render(&mut out, "vmfarm_lease_seconds", "");
            out.push_str("# HELP vmfarm_http_request_seconds HTTP latency by route and status.\n# TYPE vmfarm_http_request_seconds histogram\n");
            for (route, status, h) in &m.http {
                h.render(
                    &mut out,
                    "vmfarm_http_request_seconds",
                    &format!("route=\"{route}\",status=\"{status}\""),
                );
            }
        }
        out
    }
}
