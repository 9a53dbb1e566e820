//! Teardown, whatever step ended the job: the guest shut down (killed if it does not end),
//! what still runs on the host stopped, the scratch folder removed.

use super::JobRun;
use super::ssh_sessions::SshSessions;
use crate::backend::Vm;
use crate::guest::Guest;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl JobRun<'_> {
    /// Teardown, 1: ends the job's `vmfarm ssh` sessions, asks the agent to shut the guest
    /// down (presses the ACPI power button of a guest without the agent), and gives the guest
    /// 10 s to end (CONTRACTS.md). Whether it shut down cleanly (then its disks are whole).
    pub(super) async fn shut_down(
        &self,
        guest: Arc<Guest>,
        sessions: SshSessions,
        vm: &mut dyn Vm,
    ) -> bool {
        let log = self.log.clone();
        shut_down(guest, sessions, vm, &move |line| log.farm(line)).await
    }

    /// Teardown, 2: ends the guest's VMM if it is still running (a step that failed never
    /// asked it to shut down); its own files go with it.
    pub(super) async fn kill(&self, vm: Box<dyn Vm>) {
        let log = self.log.clone();
        kill(vm, &move |line| log.farm(line)).await;
    }

    /// Teardown, 3: stops what the job still runs on the host (the console's copy, a fetch
    /// whose tools are then killed) and removes the scratch folder.
    pub(super) async fn clean_up(&mut self) {
        // A kept guest's files stay until it goes ([`KeptGuest::hold`]).
        let remove_dir = self.kept.is_none();
        if let Some(console) = self.console.take() {
            console.abort();
        }
        if let Some(proxy) = self.proxy.take() {
            proxy.abort();
        }
        if let Some(network) = self.network.take() {
            network.close();
        }
        self.close_sources_gate();
        if let Some(fetch) = self.fetch.take() {
            fetch.abort();
            // The runtime drops an aborted task (and so kills its tools) soon after: wait for
            // that, so that nothing writes into the scratch folder while it is removed.
            let _ = fetch.await;
        }
        if remove_dir {
            remove_run_dir(&self.run_dir).await;
        }
    }
}

/// Ends the guest's `vmfarm ssh` sessions, asks the agent to shut the guest down, and gives the
/// guest 10 s to end; says what went wrong with `note`. Whether the guest ended on its own
/// after a clean shutdown.
async fn shut_down(
    guest: Arc<Guest>,
    sessions: SshSessions,
    vm: &mut dyn Vm,
    note: &(dyn Fn(&str) + Sync),
) -> bool {
    sessions.stop().await;
    // The sessions held the only other references to the guest's SSH.
    let Ok(guest) = Arc::into_inner(guest).ok_or(()) else {
        note("the guest's SSH is still in use; killing the guest");
        return false;
    };
    // A guest without the agent gets its ACPI power button; the agent shuts its guest down.
    let asked = match vm.power_off().await {
        Ok(true) => {
            guest.disconnect().await;
            true
        }
        Ok(false) => match guest.shutdown().await {
            Ok(()) => true,
            Err(e) => {
                note(&format!("the guest did not shut down cleanly: {e}"));
                false
            }
        },
        Err(e) => {
            note(&format!("the guest's power button: {e}"));
            false
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), vm.wait()).await {
        Ok(Ok(_)) => asked,
        Ok(Err(e)) => {
            note(&format!("waiting for the guest: {e}"));
            false
        }
        Err(_) => {
            note("the guest did not end within 10 s of shutdown; killing it");
            false
        }
    }
}

async fn kill(mut vm: Box<dyn Vm>, note: &(dyn Fn(&str) + Sync)) {
    if let Err(e) = vm.kill().await {
        note(&format!("stopping the guest: {e}"));
        tracing::error!(error = %e, "killing a guest failed");
    }
}

/// A failed job's guest, kept for `vmfarm ssh` after the job's end was reported.
pub(super) struct KeptGuest {
    pub guest: Arc<Guest>,
    pub sessions: SshSessions,
    /// How long it is kept at least.
    pub keep: Duration,
    /// Its VMM, once the steps hand it over (behind a lock only so that the job's state stays
    /// shareable between its steps).
    pub vm: std::sync::Mutex<Option<Box<dyn Vm>>>,
    pub run_dir: PathBuf,
}

/// The longest a session may hold a kept guest past its keep time.
const SESSION_GRACE: Duration = Duration::from_secs(3600);

impl KeptGuest {
    /// Keeps the guest for its time, and on while a session is open (for at most an hour
    /// more); then ends the sessions and the guest and removes the job's files.
    pub(super) async fn hold(self, job: &str) {
        let since = Instant::now();
        let note = |line: &str| tracing::warn!(job, "{line}");
        loop {
            let elapsed = since.elapsed();
            if elapsed >= self.keep
                && (self.sessions.open() == 0 || elapsed >= self.keep + SESSION_GRACE)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::info!(job, kept = ?since.elapsed(), "the failed job's kept guest goes");
        let KeptGuest {
            guest,
            sessions,
            vm,
            run_dir,
            ..
        } = self;
        if let Some(mut vm) = vm.into_inner().unwrap_or_else(|e| e.into_inner()) {
            // The kept guest's job failed: it stores no cache, whatever the shutdown.
            let _ = shut_down(guest, sessions, vm.as_mut(), &note).await;
            kill(vm, &note).await;
        } else {
            sessions.stop().await;
        }
        remove_run_dir(&run_dir).await;
    }
}

impl Drop for JobRun<'_> {
    /// Nothing of the job's outlives it, even if it never got to its teardown.
    fn drop(&mut self) {
        if let Some(console) = self.console.take() {
            console.abort();
        }
        if let Some(fetch) = self.fetch.take() {
            fetch.abort();
        }
    }
}

/// Removes the job's scratch folder; tried twice, as a tool killed a moment ago may still have
/// been writing there.
pub(super) async fn remove_run_dir(dir: &Path) {
    for pause in [Some(Duration::from_millis(200)), None] {
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a job's scratch folder")
                }
            },
        }
    }
}
