//! `vmfarm bench queue`: the job queue's throughput and lease latency on SQLite and PostgreSQL,
//! beside the rate of bare single-row insert+update transactions on the same database with the
//! same durability settings (the ceiling the queue can approach), both through a sqlx pool and
//! through the server's own write path. Job cycles are measured calling the queue directly and
//! over HTTP as a worker and a user make them, each with the CPU it cost; the HTTP cycles and the
//! leases are measured again with the jobs of 100 users sharing the queue (fair share's turns).

use super::stats::{ms, per_second, quantile};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use vmfarm_proto::JobState;
use vmfarm_proto::wire::{FENCE_HEADER, LeaseRequest, LeaseResponse, StateUpdate, WorkerImage};
use vmfarm_server::access::Submitter;
use vmfarm_server::config::{ApiToken, Scope, ServerConfig, WorkerToken};
use vmfarm_server::db::{DbFailure, SqliteSync};
use vmfarm_server::fence::LeaseCall;
use vmfarm_server::jobs;
use vmfarm_server::leases::{take, update};
use vmfarm_server::state::AppState;

const CLIENTS: usize = 8;
const CYCLES: usize = 4000;
const QUEUED: usize = 10_000;
const IMAGES: usize = 50;
const REFERENCE_TXNS: usize = 4000;
/// Users whose jobs share the queue in the fair-share runs.
const USERS: usize = 100;

pub async fn run(postgres: Option<String>) -> anyhow::Result<()> {
    println!(
        "vmfarm bench queue: {CLIENTS} concurrent clients, a server on loopback in this process (the CPU figures include the clients'), real databases"
    );
    let dir = tempfile::tempdir()?;
    // The server's choice (sqlite_synchronous) beside the other one, on the same disk.
    for (label, sync, tag) in [
        (
            "SQLite (WAL, synchronous=FULL: the default)",
            SqliteSync::Full,
            "sqlite-full",
        ),
        (
            "SQLite (WAL, synchronous=NORMAL)",
            SqliteSync::Normal,
            "sqlite-normal",
        ),
    ] {
        let url = format!("sqlite://{}/{tag}.db", dir.path().display());
        report(label, &url, sync, &dir.path().join(tag), false).await?;
    }
    match postgres {
        Some(url) => {
            report(
                "PostgreSQL",
                &fresh_postgres_database(&url).await?,
                SqliteSync::default(),
                &dir.path().join("postgresql"),
                true,
            )
            .await?
        }
        None => println!(
            "\nPostgreSQL: not measured — pass --postgres URL (or set VMFARM_TEST_POSTGRES; scripts/test-postgres.sh start makes one)"
        ),
    }
    Ok(())
}

/// A new, empty database on the server of `url`, so that each run starts from nothing.
async fn fresh_postgres_database(url: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let name = format!(
        "vmfarm_bench_{}_{}",
        std::process::id(),
        vmfarm_server::db::now_ms()
    );
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let (prefix, _) = url
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("{url} does not end with /DATABASE"))?;
    Ok(format!("{prefix}/{name}"))
}

/// The bench's own tokens: one per worker, and one to submit with.
fn worker_token(client: usize) -> String {
    format!("vmf_bench_worker_{client}")
}

const SUBMIT_TOKEN: &str = "vmf_bench_submit";

/// A server listening on loopback; its state and its base URL.
async fn start(
    url: &str,
    sync: SqliteSync,
    data_dir: &std::path::Path,
) -> anyhow::Result<(AppState, String)> {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.to_owned(),
        database_url: url.to_owned(),
        sqlite_synchronous: sync,
        workers: (0..CLIENTS)
            .map(|client| WorkerToken {
                name: format!("bench-{client}"),
                token: worker_token(client),
            })
            .collect(),
        tokens: vec![ApiToken {
            name: "bench".into(),
            token: SUBMIT_TOKEN.into(),
            scopes: vec![Scope::Submit],
            user: vmfarm_server::users::ADMIN.into(),
            max_priority: None,
        }],
        ..ServerConfig::default()
    };
    // The leased jobs are never finished here: no lease may expire during the run.
    config.leases.ttl = vmfarm_proto::units::HumanDuration(Duration::from_secs(3600));
    let running = vmfarm_server::serve::start(config).await?;
    Ok((running.state, format!("http://{}", running.addr)))
}

async fn report(
    label: &str,
    url: &str,
    sync: SqliteSync,
    data_dir: &std::path::Path,
    replicas: bool,
) -> anyhow::Result<()> {
    println!("\n== {label} ==");
    let (state, base) = start(url, sync, data_dir).await?;
    let reference = reference_rate(&state).await?;
    let writer_reference = writer_reference_rate(&state).await?;
    let (cycles, cycle_cpu) = measure_cpu(cycle_rate(&state)).await?;
    let one = std::slice::from_ref(&base);
    let (http_cycles, http_cpu) =
        measure_cpu(http_cycle_rate(one, &[SUBMIT_TOKEN.to_owned()])).await?;
    let user_tokens = user_tokens(&state).await?;
    let (shared_cycles, shared_cpu) = measure_cpu(http_cycle_rate(one, &user_tokens)).await?;
    let (leases_per_s, mut latencies, submit_rate) = lease_rate(&state, 1).await?;
    let (shared_leases_per_s, mut shared_latencies, shared_submit_rate) =
        lease_rate(&state, USERS).await?;
    // Last (it keeps running): a second replica on the same database and data folder
    // (PostgreSQL only: SQLite has one writer process), measured beside the first alone.
    let replicas = match replicas {
        true => {
            let (_, second) = start(url, sync, data_dir).await?;
            let both = [base.clone(), second];
            let alone = http_cycle_rate(one, &[SUBMIT_TOKEN.to_owned()]).await?;
            let two = http_cycle_rate(&both, &[SUBMIT_TOKEN.to_owned()]).await?;
            Some((alone, two))
        }
        false => None,
    };
    println!("{:<52} {:>12}", "measure", "value");
    println!(
        "{:<52} {:>10.0}/s",
        "reference: insert+update transactions (sqlx pool)", reference
    );
    println!(
        "{:<52} {:>10.0}/s",
        "reference: insert+update through the server's writer", writer_reference
    );
    println!(
        "{:<52} {:>10.0}/s",
        "submit+lease+boot+run+finish cycles, in-process", cycles
    );
    println!(
        "{:<52} {:>12}",
        "  CPU per cycle (whole process)",
        micros(cycle_cpu, CYCLES)
    );
    println!(
        "{:<52} {:>10.0}/s",
        "same cycles over HTTP (5 API calls each)", http_cycles
    );
    println!(
        "{:<52} {:>12}",
        "  CPU per cycle (server and HTTP clients)",
        micros(http_cpu, CYCLES)
    );
    if let Some((alone, two)) = replicas {
        println!(
            "{:<52} {:>10.0}/s",
            "HTTP cycles, one replica (again)", alone
        );
        println!(
            "{:<52} {:>10.0}/s",
            "HTTP cycles, two replicas (submit on one, lease on the other)", two
        );
        println!("{:<52} {:>12.2}", "ratio two replicas / one", two / alone);
    }
    println!(
        "{:<52} {:>10.0}/s",
        format!("same, submitted by {USERS} users in turn"),
        shared_cycles
    );
    println!(
        "{:<52} {:>12}",
        "  CPU per cycle (server and HTTP clients)",
        micros(shared_cpu, CYCLES)
    );
    println!(
        "{:<52} {:>12.2}",
        "ratio HTTP cycles / reference (sqlx pool)",
        http_cycles / reference
    );
    println!(
        "{:<52} {:>12.2}",
        "ratio HTTP cycles / reference (writer)",
        http_cycles / writer_reference
    );
    println!(
        "{:<52} {:>10.0}/s",
        format!("submits (filling {QUEUED} jobs)"),
        submit_rate
    );
    println!(
        "{:<52} {:>10.0}/s",
        format!("leases, {QUEUED} queued over {IMAGES} images"),
        leases_per_s
    );
    println!(
        "{:<52} {:>12}",
        "lease latency p50",
        ms(quantile(&mut latencies, 0.5))
    );
    println!(
        "{:<52} {:>12}",
        "lease latency p99",
        ms(quantile(&mut latencies, 0.99))
    );
    println!(
        "{:<52} {:>10.0}/s",
        format!("submits, {USERS} users (filling {QUEUED} jobs)"),
        shared_submit_rate
    );
    println!(
        "{:<52} {:>10.0}/s",
        format!("leases, {QUEUED} queued over {IMAGES} images, {USERS} users"),
        shared_leases_per_s
    );
    println!(
        "{:<52} {:>12}",
        format!("lease latency p50, {USERS} users"),
        ms(quantile(&mut shared_latencies, 0.5))
    );
    println!(
        "{:<52} {:>12}",
        format!("lease latency p99, {USERS} users"),
        ms(quantile(&mut shared_latencies, 0.99))
    );
    println!(
        "(targets on 2 cores: > 2000 cycles/s on SQLite; lease p99 < 10 ms with {QUEUED} queued)"
    );
    Ok(())
}

/// Bare single-row transactions: insert a row and update it, as many clients at once.
async fn reference_rate(state: &AppState) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_reference (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)",
    )
    .execute(state.db.pool())
    .await?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let pool = state.db.pool().clone();
        set.spawn(async move {
            for i in 0..REFERENCE_TXNS / CLIENTS {
                let id = (client * REFERENCE_TXNS + i) as i64;
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_reference (id, v) VALUES ($1, 0)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE bench_reference SET v = v + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(per_second(REFERENCE_TXNS, started.elapsed()))
}

/// The same transactions through the server's write path (one thread, group commit).
async fn writer_reference_rate(state: &AppState) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let db = state.db.clone();
        set.spawn(async move {
            for i in 0..REFERENCE_TXNS / CLIENTS {
                let id = ((CLIENTS + client) * REFERENCE_TXNS + i) as i64;
                db.write(move |tx| {
                    Box::pin(async move {
                        let id = [id.into()];
                        tx.execute("INSERT INTO bench_reference (id, v) VALUES ($1, 0)", &id)
                            .await?;
                        tx.execute("UPDATE bench_reference SET v = v + 1 WHERE id = $1", &id)
                            .await
                    })
                })
                .await?;
            }
            Ok::<_, DbFailure>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(per_second(REFERENCE_TXNS, started.elapsed()))
}

/// What `work` gives, and the CPU time this process spent meanwhile (every thread: the
/// server's, the database's and the bench's own clients').
async fn measure_cpu<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let before = process_cpu()?;
    let out = work.await?;
    Ok((out, process_cpu()?.saturating_sub(before)))
}

/// User + system CPU time of this process, from /proc/self/stat (in USER_HZ ticks, which
/// Linux fixes at 100 per second for user space).
fn process_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i - 3)
            .ok_or_else(|| anyhow::anyhow!("short /proc/self/stat"))?
            .parse()?)
    };
    Ok(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
}

fn micros(total: Duration, count: usize) -> String {
    format!("{:.0} µs", total.as_secs_f64() * 1e6 / count as f64)
}

fn request(worker: &str, images: &[String]) -> LeaseRequest {
    LeaseRequest {
        name: worker.to_owned(),
        images: images
            .iter()
            .map(|name| WorkerImage {
                name: name.clone(),
                version: "1".into(),
            })
            .collect(),
        slots: 1,
        version: "bench".into(),
        cache: Default::default(),
        caches: Vec::new(),
    }
}

fn manifest(image: &str) -> String {
    format!("image = \"{image}\"\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n")
}

/// One job's whole life through the queue: submit, lease, booting, running, succeeded.
async fn cycle_rate(state: &AppState) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let state = state.clone();
        set.spawn(async move {
            let image = format!("cycle-{client}");
            let worker = format!("bench-{client}");
            let req = request(&worker, std::slice::from_ref(&image));
            for _ in 0..CYCLES / CLIENTS {
                jobs::submit(
                    &state,
                    &manifest(&image),
                    None,
                    &Submitter::uncapped(vmfarm_server::users::ADMIN),
                )
                .await?;
                let lease = take::try_lease(&state, &worker, &req)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no job to lease"))?;
                let call = LeaseCall {
                    worker: worker.clone(),
                    lease_id: lease.lease_id.clone(),
                    fence: i64::try_from(lease.fence)?,
                };
                for next in [JobState::Booting, JobState::Running, JobState::Succeeded] {
                    let update = StateUpdate {
                        job_state: Some(next),
                        ..StateUpdate::default()
                    };
                    update::update_state(&state, &call, &update).await?;
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(per_second(CYCLES, started.elapsed()))
}

/// The owner of the `i`th job of a run shared by `users` users (the built-in admin alone for 1).
fn bench_user(i: usize, users: usize) -> String {
    if users == 1 {
        vmfarm_server::users::ADMIN.to_owned()
    } else {
        format!("user-{}", i % users)
    }
}

/// A submit token for each of the [`USERS`] users (stored in the database, as
/// `vmfarm server token create` stores them).
async fn user_tokens(state: &AppState) -> anyhow::Result<Vec<String>> {
    use vmfarm_server::auth::{ApiCaller, Caller, TokenSource, store_token};
    let mut tokens = Vec::with_capacity(USERS);
    for u in 0..USERS {
        let token = format!("vmf_bench_user_{u}");
        let caller = Caller::Api(ApiCaller {
            name: format!("bench-{u}"),
            user: bench_user(u, USERS),
            admin: false,
            scopes: vec![Scope::Submit],
            max_priority: None,
        });
        store_token(&state.db, &token, &caller, TokenSource::Cli).await?;
        tokens.push(token);
    }
    Ok(tokens)
}

/// The cycle of [`cycle_rate`] as a worker and a user make it: five API calls over HTTP
/// (submit, lease, booting, running, succeeded), with tokens, JSON and the server's middleware.
/// Submits take `tokens` in turn (one user's, or many users').
/// With several replicas (`bases`), each client submits through one and makes its worker's
/// calls through the next, so that every cycle crosses replicas.
async fn http_cycle_rate(bases: &[String], tokens: &[String]) -> anyhow::Result<f64> {
    let tokens = Arc::new(tokens.to_vec());
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let submit_base = bases[client % bases.len()].clone();
        let base = bases[(client + 1) % bases.len()].clone();
        let (http, tokens) = (http.clone(), tokens.clone());
        set.spawn(async move {
            let image = format!("http-{client}");
            let worker = worker_token(client);
            let req = request(&format!("bench-{client}"), std::slice::from_ref(&image));
            for i in 0..CYCLES / CLIENTS {
                http.post(format!("{submit_base}/api/jobs"))
                    .bearer_auth(&tokens[(client + i * CLIENTS) % tokens.len()])
                    .body(manifest(&image))
                    .send()
                    .await?
                    .error_for_status()?;
                let lease: LeaseResponse = http
                    .post(format!("{base}/api/workers/lease"))
                    .bearer_auth(&worker)
                    .json(&req)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                for next in [JobState::Booting, JobState::Running, JobState::Succeeded] {
                    let update = StateUpdate {
                        job_state: Some(next),
                        ..StateUpdate::default()
                    };
                    http.post(format!("{base}/api/leases/{}/state", lease.lease_id))
                        .bearer_auth(&worker)
                        .header(FENCE_HEADER, lease.fence.to_string())
                        .json(&update)
                        .send()
                        .await?
                        .error_for_status()?;
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(per_second(CYCLES, started.elapsed()))
}

/// Fills the queue with `QUEUED` jobs over `IMAGES` images of `users` users (job `i` is image
/// `i % IMAGES`'s and user `i % users`'s: with 100 users each has one image's jobs, the hard case
/// for turns), then drains it with workers that each have a fifth of the images; returns
/// leases/s, every lease's latency and submits/s.
async fn lease_rate(state: &AppState, users: usize) -> anyhow::Result<(f64, Vec<Duration>, f64)> {
    let images: Arc<Vec<String>> = Arc::new((0..IMAGES).map(|i| format!("img-{i:02}")).collect());
    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let state = state.clone();
        let images = images.clone();
        set.spawn(async move {
            for i in (client..QUEUED).step_by(CLIENTS) {
                let submitter = Submitter::uncapped(&bench_user(i, users));
                jobs::submit(&state, &manifest(&images[i % IMAGES]), None, &submitter).await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let submit_rate = per_second(QUEUED, started.elapsed());

    let started = Instant::now();
    let mut set = JoinSet::new();
    for client in 0..CLIENTS {
        let state = state.clone();
        // Every image is covered by some workers; each worker has a fifth of them.
        let mine: Vec<String> = images
            .iter()
            .enumerate()
            .filter(|(i, _)| (i + client) % 5 == 0)
            .map(|(_, name)| name.clone())
            .collect();
        set.spawn(async move {
            let worker = format!("bench-{client}");
            let req = request(&worker, &mine);
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                let lease = take::try_lease(&state, &worker, &req).await?;
                latencies.push(t.elapsed());
                if lease.is_none() {
                    latencies.pop();
                    return Ok::<_, anyhow::Error>(latencies);
                }
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = set.join_next().await {
        latencies.extend(r??);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(
        latencies.len() == QUEUED,
        "leased {} of {QUEUED} jobs",
        latencies.len()
    );
    Ok((per_second(latencies.len(), elapsed), latencies, submit_rate))
}
