//! The images `vmfarm up` builds into its images dir: the default ones at start, then, on
//! demand, any image that a queued job names, that the dir lacks and that a recipe makes. Each
//! build is said in the logs of the jobs waiting for it; a job whose image cannot be built
//! ends in `error` saying why, so that no job of `up` waits for an image with no word.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfarm_server::image_demand;
use vmfarm_server::state::AppState;
use vmfarm_worker::images::recipe::RecipeError;
use vmfarm_worker::images::{self, BuildOptions, Recipe};

/// The images `up` makes sure of at start, smallest first so that the first jobs can start
/// early.
const DEFAULT_IMAGES: [&str; 2] = ["tiny", "debian-12"];

/// How often the queue is looked at besides when a job is queued.
const LOOK_EVERY: Duration = Duration::from_secs(5);

/// Where recipes are: `VMFARM_RECIPES`, else as `vmfarm images build` finds them.
fn recipes_dir() -> PathBuf {
    std::env::var_os("VMFARM_RECIPES")
        .map_or_else(vmfarm_worker::images::default_recipes, PathBuf::from)
}

/// Builds the default images, then the images queued jobs ask for, until the process ends.
pub async fn run(state: AppState, images_dir: PathBuf) {
    let recipes = recipes_dir();
    for name in DEFAULT_IMAGES {
        match Recipe::load(name, &recipes) {
            Ok(recipe) => {
                build(&state, recipe, &images_dir).await;
            }
            Err(e) => eprintln!("image {name}: {e}"),
        }
    }
    // Images without a recipe, said once each in the logs of the jobs queued then.
    let mut said_no_recipe = BTreeSet::new();
    loop {
        let wanted = match missing(&state, &images_dir).await {
            Ok(wanted) => wanted,
            Err(e) => {
                eprintln!("vmfarm up: cannot read the queue for images to build: {e}");
                Vec::new()
            }
        };
        for name in wanted {
            match Recipe::load(&name, &recipes) {
                Ok(recipe) => build(&state, recipe, &images_dir).await,
                Err(e @ RecipeError::NotFound { .. }) => {
                    if said_no_recipe.insert(name.clone()) {
                        let line = format!(
                            "vmfarm up cannot build image `{name}`: {e}; the job waits for a \
                             worker that offers it"
                        );
                        say(&state, &name, &line).await;
                    }
                }
                Err(e) => {
                    fail(
                        &state,
                        &name,
                        &format!("image `{name}` cannot be built: {e}"),
                    )
                    .await
                }
            }
        }
        let work = state.events.work.notified();
        let _ = tokio::time::timeout(LOOK_EVERY, work).await;
    }
}

/// The images that queued jobs name, that the images dir does not have and that no worker
/// (another one, joined to this farm) offers.
async fn missing(state: &AppState, images_dir: &Path) -> anyhow::Result<Vec<String>> {
    let have = images::current(images_dir)?;
    let offered = vmfarm_server::workers::offered_images(&state.db).await?;
    Ok(image_demand::queued_images(state)
        .await?
        .into_iter()
        .filter(|name| !have.contains_key(name) && !offered.contains(name))
        .collect())
}

/// Builds (or finds up to date) `recipe`'s image, saying so on stderr and in the logs of the
/// jobs that wait for it; when it cannot be built, those jobs end in `error`.
async fn build(state: &AppState, recipe: Recipe, images_dir: &Path) {
    let name = recipe.name.clone();
    say(
        state,
        &name,
        &format!(
            "vmfarm up is building image `{name}` for this job (the first time takes minutes)"
        ),
    )
    .await;
    eprintln!("image {name}: making sure it is built (the first time takes minutes)");
    let images_dir = images_dir.to_owned();
    let built = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let agent = match std::env::var_os("VMFARM_AGENT") {
            Some(agent) => PathBuf::from(agent),
            None => images::default_agent()?,
        };
        let options = BuildOptions {
            images_dir,
            cache_dir: images::cache_dir(),
            agent,
        };
        let name = recipe.name.clone();
        Ok(images::build(&recipe, &options, &mut |step| {
            eprintln!("image {name}: {step}")
        })?)
    })
    .await;
    match built {
        Ok(Ok(report)) => {
            let version = &report.image.manifest.version;
            let done = if report.reused { "ready" } else { "built" };
            eprintln!("image {name}: {done} ({version})");
            say(
                state,
                &name,
                &format!("image `{name}` is {done} (version {version}); the job starts when the worker takes it"),
            )
            .await;
        }
        Ok(Err(e)) => {
            eprintln!("image {name}: cannot be built: {e:#}");
            fail(
                state,
                &name,
                &format!("vmfarm up could not build image `{name}`: {e:#}"),
            )
            .await;
        }
        Err(e) => {
            eprintln!("image {name}: the build stopped: {e}");
            fail(
                state,
                &name,
                &format!("vmfarm up could not build image `{name}`: {e}"),
            )
            .await;
        }
    }
}

/// Writes `line` in the log of each job queued for `image`.
async fn say(state: &AppState, image: &str, line: &str) {
    if let Err(e) = image_demand::tell_queued(state, image, line).await {
        eprintln!("vmfarm up: cannot write to the logs of the jobs for image {image}: {e}");
    }
}

/// Ends each job queued for `image` in `error` with `reason`.
async fn fail(state: &AppState, image: &str, reason: &str) {
    match image_demand::end_queued(state, image, reason).await {
        Ok(0) => {}
        Ok(n) => eprintln!("vmfarm up: {n} job(s) for image {image} ended in error: {reason}"),
        Err(e) => eprintln!("vmfarm up: cannot end the jobs for image {image}: {e}"),
    }
}
