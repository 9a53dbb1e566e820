//! The Grafana dashboard in configs/ (tests only): it reads exactly the metrics the server and
//! the workers expose, no name they do not have and none of theirs left out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The metric families an exposition declares (`# TYPE NAME KIND`), with their kind.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.to_owned()))
        .collect()
}

/// The family a series name in a query belongs to: a gauge by its name, a counter by its
/// `_total`, a histogram by its `_bucket`, `_count` or `_sum` (the series Prometheus has).
fn family_of<'a>(series: &'a str, known: &BTreeMap<String, String>) -> Option<&'a str> {
    let suffixes: &[(&str, &str)] = &[
        ("gauge", ""),
        ("counter", "_total"),
        ("histogram", "_bucket"),
        ("histogram", "_count"),
        ("histogram", "_sum"),
    ];
    suffixes.iter().find_map(|(kind, suffix)| {
        let family = series.strip_suffix(suffix)?;
        (known.get(family)? == kind).then_some(family)
    })
}

#[tokio::test]
async fn test_the_dashboard_reads_exactly_the_exposed_metrics() {
    use std::time::Duration;
    use vmfarm_proto::JobState;
    use vmfarm_server::metrics::{CallOutcome, Figures, Metrics};
    // A labelled family shows once it has a series: each is given one.
    let second = Duration::from_secs(1);
    let server = Metrics::default();
    server.http_request("GET", "/healthz", 200, second);
    server.job_leased("tiny", second, second);
    server.job_finished(JobState::Succeeded, Some(second));
    server.outbound_call("webhook", CallOutcome::Failed);
    let server = server.render(Figures::default());
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = vmfarm_worker::network::ProxyCache::open(cache_dir.path(), 1 << 20)
        .await
        .unwrap();
    let budget = Arc::new(vmfarm_worker::worker::budget::Budget::new(2, 1024));
    let worker = vmfarm_worker::worker::metrics::WorkerMetrics::new(budget, cache);
    worker.guest_ready("tiny", second);
    worker.job_started("tiny", second);
    worker.job_finished(JobState::Succeeded);
    let worker = worker.render();
    let mut exposed = families(&server);
    exposed.extend(families(&worker));
    assert!(exposed.len() > 20, "{exposed:?}");

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("vmfarm_"));
            for series in names {
                let family = family_of(series, &exposed).unwrap_or_else(|| {
                    panic!(
                        "panel `{}` reads `{series}`, which nothing exposes",
                        panel["title"]
                    )
                });
                used.insert(family.to_owned());
            }
        }
    }
    let unused: Vec<&String> = exposed.keys().filter(|f| !used.contains(*f)).collect();
    assert!(unused.is_empty(), "exposed but on no panel: {unused:?}");
}
