//! The packages step: the manifest's `packages`, installed as root by the image's package
//! manager before the first task, shown like a task named `packages`. While it runs, the proxy
//! also lets the image's package mirrors through, whatever the manifest allows.

use super::limits::Halt;
use super::outcome::task_end;
use super::tasks::TaskOutput;
use super::{JobRun, Outcome};
use crate::guest::Guest;
use crate::worker::guest_paths::quote;
use vmfarm_proto::manifest::PACKAGES_TASK;
use vmfarm_proto::{JobState, TaskState};

impl JobRun<'_> {
    /// Installs the manifest's packages; `Some` when the job ends with this step.
    pub(super) async fn packages(
        &self,
        guest: &Guest,
        env: &[(String, String)],
    ) -> Result<Option<Outcome>, Halt> {
        let packages = &self.manifest.packages;
        if packages.is_empty() {
            return Ok(None);
        }
        self.report_task(PACKAGES_TASK, TaskState::Running, None)
            .await?;
        let manager = match self.ctx.image.package_manager() {
            Ok(manager) => manager,
            Err(why) => {
                self.log.farm(&why);
                self.report_task(PACKAGES_TASK, TaskState::Failed, None)
                    .await?;
                return Ok(Some(Outcome::new(JobState::Failed, why)));
            }
        };
        let command = manager
            .install_commands(packages)
            .iter()
            .map(|argv| {
                let words: Vec<String> = argv.iter().map(|w| quote(w)).collect();
                format!("sudo -n {}", words.join(" "))
            })
            .collect::<Vec<_>>()
            .join(" && ");
        self.log.farm(&format!("packages: {}", packages.join(" ")));
        self.allow_also(&manager.mirrors);
        let (limit, exec_limits) = self.limits.for_command(None);
        let mut output = TaskOutput {
            log: &self.log,
            task: PACKAGES_TASK,
        };
        let ran = guest.exec(&command, env, &mut output, exec_limits).await;
        self.allow_only_the_manifests();
        let end = task_end(PACKAGES_TASK, ran, limit).map_err(Halt::Failed)?;
        self.report_task(PACKAGES_TASK, end.state, end.exit_code)
            .await?;
        Ok(end.job)
    }
}
