//! Teardown, whatever step ended the job: the guest shut down (killed if it does not end),
//! what still runs on the host stopped, the scratch folder removed.

use super::JobRun;
use crate::backend::Vm;
use crate::guest::Guest;
use std::path::Path;
use std::time::Duration;

impl JobRun<'_> {
    /// Teardown, 1: asks the agent to shut the guest down, and gives the guest 10 s to end
    /// (CONTRACTS.md).
    pub(super) async fn shut_down(&self, guest: Guest, vm: &mut dyn Vm) {
        if let Err(e) = guest.shutdown().await {
            self.log
                .farm(&format!("the guest did not shut down cleanly: {e}"));
        }
        match tokio::time::timeout(Duration::from_secs(10), vm.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.log.farm(&format!("waiting for the guest: {e}")),
            Err(_) => self
                .log
                .farm("the guest did not end within 10 s of shutdown; killing it"),
        }
    }

    /// Teardown, 2: ends the guest's VMM if it is still running (a step that failed never
    /// asked it to shut down); its own files go with it.
    pub(super) async fn kill(&self, mut vm: Box<dyn Vm>) {
        if let Err(e) = vm.kill().await {
            self.log.farm(&format!("stopping the guest: {e}"));
            tracing::error!(error = %e, "killing a guest failed");
        }
    }

    /// Teardown, 3: stops what the job still runs on the host (the console's copy, a fetch
    /// whose tools are then killed) and removes the scratch folder.
    pub(super) async fn clean_up(&mut self) {
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
        remove_run_dir(&self.run_dir).await;
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
