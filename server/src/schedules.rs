//! Schedules: a cron expression (UTC unless a time zone is named) that enqueues a manifest as a
//! group tagged `scheduled:<name>`. A schedule remembers the time of its newest run; a tick
//! enqueues once when one or more cron times have passed since, so runs missed while the server
//! was down are made up by one run, not one per missed time. `tick` takes the time, so tests
//! drive it with any clock.

use crate::access::{Reach, Submitter};
use crate::db::{DbFailure, Query, WriteTx, now_ms, where_all};
use crate::error::{AppError, AppResult};
use crate::jobs::Origin;
use crate::state::AppState;
use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmfarm_proto::api::GroupView;

/// The longest schedule name (so that `scheduled:<name>` is a valid tag).
pub const MAX_NAME: usize = 54;

/// A checked cron expression in its time zone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: croner::Cron,
    tz: Tz,
}

impl CronSpec {
    /// Parses `expr` (five fields, or six with seconds) in `timezone` (an IANA name, or UTC).
    pub fn parse(expr: &str, timezone: Option<&str>) -> Result<CronSpec, String> {
        let tz = match timezone.map(str::trim).filter(|t| !t.is_empty()) {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                format!("unknown time zone `{name}`: use an IANA name such as Europe/Paris")
            })?,
        };
        let cron = croner::Cron::new(expr.trim())
            .with_seconds_optional()
            .parse()
            .map_err(|e| format!("invalid cron expression `{expr}`: {e}"))?;
        Ok(CronSpec { cron, tz })
    }

    /// The first cron time strictly after `after_ms` (unix ms), if there is one.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let start = Utc.timestamp_millis_opt(after_ms).single()?;
        let local: DateTime<Tz> = start.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The newest cron time in `(after_ms, now_ms]`, if any.
    pub fn latest_due(&self, after_ms: i64, now_ms: i64) -> Option<i64> {
        let mut due = None;
        let mut cursor = after_ms;
        // Bounded: a every-second schedule missed for a long while stops here and runs at `now`.
        for _ in 0..100_000 {
            match self.next_after(cursor) {
                Some(t) if t <= now_ms => {
                    due = Some(t);
                    cursor = t;
                }
                _ => return due,
            }
        }
        due.map(|_| now_ms)
    }
}

/// Checks a schedule's name.
pub fn check_schedule_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !first_ok || !rest_ok || name.len() > MAX_NAME {
        return Err(format!(
            "schedule name `{name}`: use 1 to {MAX_NAME} of a-z, 0-9, `-`, `_`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// A new schedule, from the config, the UI or the API.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSchedule {
    pub name: String,
    pub cron: String,
    #[serde(default)]
    pub timezone: Option<String>,
    /// The manifest's TOML text.
    pub manifest: String,
}

/// A schedule as the API and the UI show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    pub name: String,
    /// The user whose jobs its runs are.
    pub owner: String,
    pub cron: String,
    pub timezone: String,
    pub source: String,
    pub manifest: String,
    pub last_run_at: i64,
    pub next_run_at: Option<i64>,
}

/// Where a schedule came from: `config` ones are replaced at each start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    Ui,
}

/// Checks and stores a schedule for `submitter` (replacing one of the same name within `reach`,
/// which keeps its owner and its run history; a config schedule takes the config's owner).
/// Another user's schedule of that name is not replaced from the API or the web UI.
pub async fn save(
    state: &AppState,
    new: &NewSchedule,
    source: Source,
    now: i64,
    submitter: &Submitter,
    reach: &Reach,
) -> AppResult<()> {
    check_schedule_name(&new.name).map_err(AppError::BadRequest)?;
    let spec = CronSpec::parse(&new.cron, new.timezone.as_deref()).map_err(AppError::BadRequest)?;
    let manifest = crate::jobs::parse_manifest(state, &new.manifest, submitter)?;
    let source = match source {
        Source::Config => "config",
        Source::Ui => "ui",
    };
    let (new, reach, user) = (new.clone(), reach.clone(), submitter.user.clone());
    let timezone = spec.tz.name().to_owned();
    state
        .db
        .write(move |tx| {
            Box::pin(async move {
                let existing = tx
                    .fetch_optional(
                        "SELECT owner FROM schedules WHERE name = $1",
                        &[new.name.as_str().into()],
                    )
                    .await?;
                let owner = match existing {
                    // The config says whose its schedules are, whoever had the name before.
                    _ if source == "config" => user,
                    Some(row) => {
                        let owner = row.text(0)?;
                        if !reach.covers(&owner) {
                            return Err(AppError::Conflict(format!(
                                "the schedule name `{}` is taken: choose another",
                                new.name
                            )));
                        }
                        owner
                    }
                    None => user,
                };
                crate::secrets::check_usable(tx, &manifest.secrets, &owner).await?;
                tx.execute(
                    "INSERT INTO schedules (name, cron, timezone, manifest, source, created_at, last_run_at, owner) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6, $7) ON CONFLICT (name) DO UPDATE SET cron = excluded.cron, \
                     timezone = excluded.timezone, manifest = excluded.manifest, source = excluded.source",
                    &[
                        new.name.as_str().into(),
                        new.cron.trim().into(),
                        timezone.as_str().into(),
                        new.manifest.as_str().into(),
                        source.into(),
                        now.into(),
                        owner.as_str().into(),
                    ],
                )
                .await?;
                Ok(())
            })
        })
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot read the manifest {path} of schedule `{name}`")]
    Read {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("schedule `{name}` in the server config: {message}")]
    Invalid { name: String, message: String },
    #[error("cannot read or write the schedules")]
    Db(#[source] DbFailure),
}

/// Stores the config's schedules (at start), and drops those the config no longer has.
pub async fn load_config(state: &AppState) -> Result<(), ScheduleError> {
    let stored = state
        .db
        .read()
        .fetch_all("SELECT name FROM schedules WHERE source = 'config'", &[])
        .await
        .map_err(ScheduleError::Db)?;
    for row in stored {
        let name = row.text(0).map_err(ScheduleError::Db)?;
        if !state.config.schedules.iter().any(|s| s.name == name) {
            state
                .db
                .execute(
                    "DELETE FROM schedules WHERE name = $1 AND source = 'config'",
                    &[name.as_str().into()],
                )
                .await
                .map_err(ScheduleError::Db)?;
            tracing::info!(schedule = %name, "schedule removed from the config: dropped");
        }
    }
    for s in &state.config.schedules {
        if crate::users::find(&state.db, &state.config, &s.owner)
            .await
            .map_err(ScheduleError::Db)?
            .is_none()
        {
            return Err(ScheduleError::Invalid {
                name: s.name.clone(),
                message: format!(
                    "its owner `{}` is not a user: add it with `vmfarm server user add {}`, or [[users]] in the config",
                    s.owner, s.owner
                ),
            });
        }
        let manifest =
            std::fs::read_to_string(&s.manifest).map_err(|source| ScheduleError::Read {
                name: s.name.clone(),
                path: s.manifest.clone(),
                source,
            })?;
        let new = NewSchedule {
            name: s.name.clone(),
            cron: s.cron.clone(),
            timezone: s.timezone.clone(),
            manifest,
        };
        let submitter = Submitter::uncapped(&s.owner);
        save(
            state,
            &new,
            Source::Config,
            now_ms(),
            &submitter,
            &Reach::All,
        )
        .await
        .map_err(|e| ScheduleError::Invalid {
            name: s.name.clone(),
            message: match e {
                AppError::Manifest(errors) => errors.render(&s.manifest.display().to_string()),
                other => other.to_string(),
            },
        })?;
    }
    Ok(())
}

/// The schedules within `reach` (the one named `name`, when given), by name.
async fn read(state: &AppState, name: Option<&str>, reach: &Reach) -> AppResult<Vec<ScheduleView>> {
    let mut args = Vec::new();
    let mut clauses: Vec<String> = reach.owner_clause("owner", &mut args).into_iter().collect();
    if let Some(name) = name {
        args.push(name.into());
        clauses.push(format!("name = ${}", args.len()));
    }
    let filter = where_all(&clauses);
    let sql = format!(
        "SELECT name, cron, timezone, manifest, source, last_run_at, owner FROM schedules {filter} \
         ORDER BY name"
    );
    let rows = state.db.read().fetch_all(&sql, &args).await?;
    rows.iter()
        .map(|row| {
            let (cron, timezone, last_run_at) = (row.text(1)?, row.text(2)?, row.int(5)?);
            let next_run_at = CronSpec::parse(&cron, Some(&timezone))
                .ok()
                .and_then(|spec| spec.next_after(last_run_at));
            Ok(ScheduleView {
                name: row.text(0)?,
                owner: row.text(6)?,
                cron,
                timezone,
                manifest: row.text(3)?,
                source: row.text(4)?,
                last_run_at,
                next_run_at,
            })
        })
        .collect()
}

/// The schedules within `reach`, by name.
pub async fn list(state: &AppState, reach: &Reach) -> AppResult<Vec<ScheduleView>> {
    read(state, None, reach).await
}

/// Schedule `name`, when it is within `reach` (otherwise the same `404` as a missing one).
pub async fn get(state: &AppState, name: &str, reach: &Reach) -> AppResult<ScheduleView> {
    read(state, Some(name), reach)
        .await?
        .pop()
        .ok_or_else(|| AppError::NotFound(format!("no schedule `{name}`")))
}

/// The newest runs of a schedule within `reach`, each a group with its jobs.
pub async fn runs(
    state: &AppState,
    name: &str,
    limit: i64,
    reach: &Reach,
) -> AppResult<Vec<GroupView>> {
    let mut out = Vec::new();
    for id in crate::job_views::newest_groups(&state.db, Some(name), limit, reach).await? {
        out.push(crate::job_views::group(&state.db, id, reach).await?);
    }
    Ok(out)
}

/// Enqueues every schedule that has a cron time in `(last run, now]`, once each. Returns the
/// groups made. Replicas may tick together: the claim on `last_run_at` and the run's jobs are
/// one transaction, so that exactly one replica makes the run (none of them twice, and a
/// replica that dies between the two makes none of it). A run that is refused (its manifest
/// or its owner's queue limit) is used up all the same, and said in the log; a schedule that
/// fails leaves the others to run.
pub async fn tick(state: &AppState, now: i64) -> AppResult<Vec<String>> {
    let mut made = Vec::new();
    for schedule in list(state, &Reach::All).await? {
        let name = schedule.name.clone();
        match run_due(state, schedule, now).await {
            Ok(Some(group)) => made.push(group),
            Ok(None) => {}
            Err(e) => tracing::error!(schedule = %name, error = %e, "scheduled run refused"),
        }
    }
    Ok(made)
}

/// Makes `schedule`'s run if one is due at `now` and no replica made it: the group made.
async fn run_due(state: &AppState, schedule: ScheduleView, now: i64) -> AppResult<Option<String>> {
    let ScheduleView {
        name,
        owner,
        cron,
        timezone,
        manifest,
        last_run_at,
        ..
    } = schedule;
    let spec = CronSpec::parse(&cron, Some(&timezone)).map_err(AppError::BadRequest)?;
    let Some(due) = spec.latest_due(last_run_at, now) else {
        return Ok(None);
    };
    // Its runs are its owner's jobs; the owner's token cap was checked when it was saved.
    let submitter = Submitter::uncapped(&owner);
    let made = match crate::jobs::prepare(state, &manifest, Some(&name), &submitter) {
        Ok(group) => {
            let name = name.clone();
            state
                .db
                .write(move |tx| {
                    Box::pin(async move {
                        if claim(tx, &name, due, last_run_at).await? {
                            group.insert(tx, &Origin::default()).await.map(Some)
                        } else {
                            AppResult::Ok(None)
                        }
                    })
                })
                .await
        }
        Err(refused) => Err(refused),
    };
    match made {
        Ok(Some(mut response)) => {
            crate::jobs::queued(state, response.jobs.len());
            crate::workers::say_waiting(&state.db, &mut response.jobs).await;
            tracing::info!(schedule = %name, group = %response.group_id, "scheduled run enqueued");
            Ok(Some(response.group_id))
        }
        Ok(None) => Ok(None),
        // Refused (not a failed write): the run is used up, by one replica, and said.
        Err(refused) if !matches!(refused, AppError::Internal(_)) => {
            let used = state
                .db
                .write(move |tx| Box::pin(async move { claim(tx, &name, due, last_run_at).await }))
                .await?;
            if used {
                return Err(refused);
            }
            Ok(None)
        }
        Err(failed) => Err(failed),
    }
}

/// Claims schedule `name`'s run due at `due` (its last run at `last`): whether this write won
/// it (another replica's claim, or an edit, leaves nothing to claim).
async fn claim(tx: &mut WriteTx, name: &str, due: i64, last: i64) -> Result<bool, DbFailure> {
    let claimed = tx
        .execute(
            "UPDATE schedules SET last_run_at = $1 WHERE name = $2 AND last_run_at = $3",
            &[due.into(), name.into(), last.into()],
        )
        .await?;
    Ok(claimed == 1)
}

/// Ticks every second on the system clock, for as long as the server runs.
pub async fn run(state: AppState) {
    loop {
        if let Err(e) = tick(&state, now_ms()).await {
            tracing::error!(error = %e, "schedule tick failed; trying again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};

    on_both_databases!(
        test_replicas_ticking_together_make_one_run,
        test_a_refused_run_is_used_up_and_the_others_go_on,
    );

    async fn create(app: &TestApp, name: &str, image: &str) {
        let new = serde_json::json!({
            "name": name, "cron": "* * * * *", "timezone": "UTC",
            "manifest": format!("image = \"{image}\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n"),
        });
        let created = app
            .call(
                axum::http::Method::POST,
                "/api/schedules",
                Some(ADMIN),
                &[("content-type", "application/json".into())],
                axum::body::Body::from(new.to_string()),
            )
            .await;
        assert_eq!(
            created.status,
            axum::http::StatusCode::CREATED,
            "{:?}",
            created.body
        );
    }

    /// The owner's queue is full: each due run is refused once, used up, and the schedule after
    /// it runs its turn too.
    async fn test_a_refused_run_is_used_up_and_the_others_go_on(database: Database) {
        let app = TestApp::with_config(database, |c| c.limits.max_queued_per_user = Some(1)).await;
        create(&app, "first", "tiny").await;
        create(&app, "second", "tiny").await;
        let start = now_ms();
        let made = tick(&app.state, start + 60_000).await.unwrap();
        assert_eq!(made.len(), 1, "one run fits the queue: {made:?}");
        for minute in 2..=3 {
            let made = tick(&app.state, start + minute * 60_000).await.unwrap();
            assert!(made.is_empty(), "{made:?}");
        }
        for schedule in list(&app.state, &Reach::All).await.unwrap() {
            let last = start + 3 * 60_000;
            assert!(
                schedule.last_run_at > last - 60_000 && schedule.last_run_at <= last,
                "{} last ran at {}, due {last}",
                schedule.name,
                schedule.last_run_at
            );
        }
    }

    /// Two servers on one database tick at the same moment, many times over: each due run is
    /// made once.
    async fn test_replicas_ticking_together_make_one_run(database: Database) {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::test_utils::fresh_database_url(database, dir.path()).await;
        let a = TestApp::on(tempfile::tempdir().unwrap(), url.clone(), |_| {}).await;
        let b = TestApp::on(tempfile::tempdir().unwrap(), url, |_| {}).await;
        create(&a, "minutely", "tiny").await;
        let start = now_ms();
        let mut made = Vec::new();
        for minute in 1..=5 {
            let at = start + minute * 60_000;
            let (x, y) = tokio::join!(tick(&a.state, at), tick(&b.state, at));
            let (x, y) = (x.unwrap(), y.unwrap());
            assert_eq!(x.len() + y.len(), 1, "minute {minute}: {x:?} {y:?}");
            made.extend(x.into_iter().chain(y));
        }
        let groups =
            crate::job_views::newest_groups(&a.state.db, Some("minutely"), 50, &Reach::All)
                .await
                .unwrap();
        assert_eq!(groups.len(), 5, "{groups:?} made {made:?}");
    }

    fn ms(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn test_next_run_in_utc_and_in_a_time_zone() {
        let utc = CronSpec::parse("0 3 * * *", None).unwrap();
        assert_eq!(
            utc.next_after(ms("2026-11-22T02:00:00Z")),
            Some(ms("2026-11-22T03:00:00Z"))
        );
        let paris = CronSpec::parse("0 3 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(
            paris.next_after(ms("2026-11-22T00:00:00Z")),
            Some(ms("2026-11-22T02:00:00Z"))
        );
    }

    #[test]
    fn test_missed_runs_collapse_into_the_newest() {
        let hourly = CronSpec::parse("0 * * * *", None).unwrap();
        let due = hourly.latest_due(ms("2026-11-22T00:30:00Z"), ms("2026-11-22T05:10:00Z"));
        assert_eq!(due, Some(ms("2026-11-22T05:00:00Z")));
        assert_eq!(
            hourly.latest_due(ms("2026-11-22T05:00:00Z"), ms("2026-11-22T05:10:00Z")),
            None
        );
    }

    #[test]
    fn test_bad_input_says_what_is_wrong() {
        let err = CronSpec::parse("61 * * * *", None).unwrap_err();
        assert!(
            err.contains("invalid cron expression `61 * * * *`"),
            "{err}"
        );
        let err = CronSpec::parse("0 3 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(err.contains("unknown time zone `Mars/Olympus`"), "{err}");
        assert!(check_schedule_name("Nightly").is_err());
        assert!(check_schedule_name("nightly-x86").is_ok());
    }
}
