//! Template snapshots on the `qemu` backend: a guest booted to where its agent waits for a job
//! is paused and saved, and jobs' guests are restored from it.
//!
//! The guest's memory is a file (`memory-backend-file`): the template's QEMU maps it shared, so
//! the file holds the guest's memory when it is paused; the migration stream QEMU then writes
//! (its `x-ignore-shared` capability) holds only the devices' state. A restored guest maps a
//! sealed copy of the memory file ([`SealedMemory`]) privately: its pages are shared by every
//! guest restored from it until one writes a page, which then becomes that guest's own copy.
//! Both ends of the stream are the devices' state file, handed to QEMU as a descriptor over its
//! control socket (`getfd`), so a jailed QEMU, in its own root, reads it as well. The template's
//! disk, frozen when it was paused, is under each restored guest's own overlay.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;

use super::qemu::{QEMU, QMP_LINE, QemuBackend, RunWith, confine_before_exec};
use super::saving::{
    io_error, keep_disk, last_words, no_cache_disks, refused, wait_for_template, within,
};
use super::{
    BackendError, Boot, BootSpec, OVERLAY, SealedMemory, Snapshot, clear_environment,
    die_with_parent,
};

/// The longest a restore may take before the job boots cold instead (it takes some 60 ms here).
const RESTORE_LIMIT: Duration = Duration::from_secs(30);

/// The guest's memory backed by a file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryFile<'a> {
    pub(crate) path: &'a Path,
    /// Shared (the template: the file is the memory) or private (a restored guest: copy on
    /// write).
    pub(crate) shared: bool,
}

impl MemoryFile<'_> {
    /// QEMU's arguments for it (the machine names it as its memory).
    pub(crate) fn args(&self, memory_mib: u32) -> [String; 2] {
        let share = if self.shared { "on" } else { "off" };
        [
            "-object".into(),
            format!(
                "memory-backend-file,id=ram,size={memory_mib}M,mem-path={},share={share}",
                self.path.display()
            ),
        ]
    }
}

/// What this host's QEMU says it is (`qemu-system-x86_64 --version`, first line), read once:
/// a snapshot from another QEMU is not restored.
pub(crate) fn qemu_version() -> &'static str {
    static FOUND: OnceLock<String> = OnceLock::new();
    FOUND.get_or_init(|| {
        std::process::Command::new(QEMU)
            .arg("--version")
            .env_clear()
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|text| text.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown QEMU".into())
    })
}

impl QemuBackend {
    /// Boots `spec`'s guest, jailed as jobs' guests are (its memory becomes every restored
    /// guest's start), with its memory in `into`'s file, waits until its agent waits for a job,
    /// pauses it, and saves its devices' state; its disk is `into`'s, over `spec.base_disk`.
    /// QEMU opens every file (memory, disk, sockets) before it enters its jail.
    pub(crate) async fn save_snapshot(
        &self,
        spec: &BootSpec,
        into: &Snapshot,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let Boot::Linux(linux) = &spec.boot else {
            return Err(BackendError::Unsupported {
                backend: "qemu",
                why: "only guests with vmfarm's agent (a kernel boot) are snapshotted".into(),
            });
        };
        for dir in [&into.dir, &spec.run_dir] {
            std::fs::create_dir_all(dir).map_err(BackendError::RunDir)?;
        }
        // The sockets, QEMU's messages and, until it is saved, the disk go in the guest's
        // folder; the memory in `into`. QEMU opens its disk again when it pauses for the save,
        // after a jailed QEMU entered its root (the guest's folder) as the jail's user: the disk
        // is named from the folder, QEMU's working directory before and after, and is that
        // user's while QEMU runs (as a restored guest's overlay is).
        let run = &spec.run_dir;
        let disk = run.join(OVERLAY);
        crate::vmm::qcow2::overlay::create_overlay(&spec.base_disk, &disk)
            .map_err(BackendError::Overlay)?;
        let jail = self
            .jail
            .as_ref()
            .map(|j| j.guest(spec.vcpus, spec.memory_mib))
            .transpose()?;
        if let Some(jail) = &jail {
            std::os::unix::fs::chown(&disk, Some(jail.uid), Some(jail.gid))
                .map_err(BackendError::RunDir)?;
        }
        let (socket, qmp) = (run.join("ssh.sock"), run.join("qmp.sock"));
        let messages = run.join("qemu.stderr");
        let stderr = std::fs::File::create(&messages).map_err(BackendError::RunDir)?;
        let memory = MemoryFile {
            path: &into.memory(),
            shared: true,
        };
        let mut command = Command::new(QEMU);
        command
            .current_dir(run)
            .args(self.args(spec, linux, Path::new(OVERLAY), &socket, Some(memory)))
            .args([
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", qmp.display()),
            ]);
        // First: the confinement's forks must leave a process that dies with the worker.
        die_with_parent(command.as_std_mut());
        if let Some(jail) = &jail {
            command.args(Self::jail_args(RunWith::of_host(), run, jail));
            confine_before_exec(&mut command, jail).map_err(BackendError::Spawn)?;
        }
        clear_environment(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(BackendError::Spawn)?;
        let mut console = child
            .stdout
            .take()
            .ok_or_else(|| refused("reading the template's console", "no console".into()))?;
        if let Err(e) = wait_for_template(&mut console, timeout, &messages).await {
            let _ = child.kill().await;
            return Err(e);
        }
        // The console is read no more: the paused guest prints nothing.
        let saved = within(
            "QEMU",
            timeout,
            "saving the template guest",
            save_devices(&qmp, &into.devices()),
        )
        .await;
        let _ = child.kill().await;
        let _ = child.wait().await;
        let jailed = jail.is_some();
        // QEMU says why a save failed on its stderr only.
        let saved = match saved {
            Err(BackendError::Snapshot { what, source }) => {
                let said = last_words(&messages).await;
                Err(refused(what, format!("{source}; QEMU said: {said}")))
            }
            // The frozen disk joins the snapshot, the worker's again (restores read it only).
            Ok(()) => keep_disk(&disk, &into.disk(), jailed)
                .map_err(io_error("keeping the template's disk")),
            other => other,
        };
        // The jail (its user, its cgroup) goes once QEMU has ended and its disk is given back.
        drop(jail);
        for socket in [socket, qmp] {
            let _ = std::fs::remove_file(socket);
        }
        saved
    }

    /// Starts QEMU for `spec` with `from`'s memory (see [`QemuBackend::boot_with`]), hands it
    /// the devices' state, and returns once it runs the guest.
    pub(crate) async fn restore_snapshot(
        &self,
        spec: &BootSpec,
        from: &Snapshot,
        sealed: &SealedMemory,
    ) -> Result<Box<dyn super::Vm>, BackendError> {
        no_cache_disks(spec, "qemu")?;
        let spec = BootSpec {
            base_disk: from.disk(),
            ..spec.clone()
        };
        let memory = MemoryFile {
            path: &sealed.path(),
            shared: false,
        };
        let qmp = spec.run_dir.join("qmp.sock");
        let mut vm = self.boot_with(&spec, Some((memory, qmp.as_path()))).await?;
        let sent = within(
            "QEMU",
            RESTORE_LIMIT,
            "restoring the guest",
            load_devices(&qmp, &from.devices()),
        )
        .await;
        if let Err(e) = sent {
            let _ = vm.kill().await;
            return Err(e);
        }
        Ok(vm)
    }
}

/// QEMU's control socket: one command at a time, its answer read past any events.
struct Qmp {
    lines: tokio::io::Lines<BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &Path) -> std::io::Result<Qmp> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if started.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut qmp = Qmp {
            lines: BufReader::new(read.take(QMP_LINE as u64 * 1024)).lines(),
            write,
        };
        qmp.next().await?; // the greeting
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn next(&mut self) -> std::io::Result<Value> {
        let line = self
            .lines
            .next_line()
            .await?
            .ok_or_else(|| std::io::Error::other("QEMU closed its control socket"))?;
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// Hands QEMU `file`'s descriptor under `name` (`getfd`, the descriptor passed along with the
    /// command).
    async fn send_fd(&mut self, name: &str, file: &std::fs::File) -> std::io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd as _;
        let request = json!({"execute": "getfd", "arguments": {"fdname": name}});
        let bytes = format!("{request}\n");
        let fds = [file.as_raw_fd()];
        let socket: &UnixStream = self.write.as_ref();
        let sent = loop {
            socket.writable().await?;
            let attempt = socket.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(bytes.as_bytes())];
                let control = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(socket.as_raw_fd(), &iov, &control, MsgFlags::empty(), None)
                    .map_err(std::io::Error::from)
            });
            match attempt {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => break other?,
            }
        };
        if sent != bytes.len() {
            return Err(std::io::Error::other(
                "QEMU's control socket took part of getfd",
            ));
        }
        self.answer("getfd").await.map(drop)
    }

    /// Runs `command` and returns its `return`; an `error` answer is an error.
    async fn execute(&mut self, command: &str, arguments: Value) -> std::io::Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        self.answer(command).await
    }

    /// The answer to `command`, past any events.
    async fn answer(&mut self, command: &str) -> std::io::Result<Value> {
        loop {
            let answer = self.next().await?;
            if let Some(value) = answer.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = answer.get("error") {
                return Err(std::io::Error::other(format!(
                    "QEMU refused {command}: {error}"
                )));
            }
        }
    }
}

/// Has the QEMU behind `qmp` run `command` (`migrate` or `migrate-incoming`) with `file`'s
/// descriptor as the stream, file-backed memory left out of it, and waits until it completed.
async fn migrate(
    qmp: &mut Qmp,
    command: &str,
    file: &std::fs::File,
    what: &'static str,
) -> Result<(), BackendError> {
    let capability = json!({"capability": "x-ignore-shared", "state": true});
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [capability]}),
    )
    .await
    .map_err(io_error(what))?;
    qmp.send_fd(STATE_FD, file).await.map_err(io_error(what))?;
    qmp.execute(command, json!({"uri": format!("fd:{STATE_FD}")}))
        .await
        .map_err(io_error(what))?;
    loop {
        let state = qmp
            .execute("query-migrate", json!({}))
            .await
            .map_err(io_error(what))?;
        match state.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => return Err(refused(what, state.to_string())),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Pauses the guest of the QEMU at `qmp` and has it write its devices' state (its memory is left
/// in its file) to `devices`.
async fn save_devices(qmp: &Path, devices: &Path) -> Result<(), BackendError> {
    let mut qmp = Qmp::connect(qmp)
        .await
        .map_err(io_error("connecting to the template's QEMU"))?;
    let file = std::fs::File::create(devices).map_err(io_error("creating the devices' state"))?;
    qmp.execute("stop", json!({}))
        .await
        .map_err(io_error("pausing the template guest"))?;
    migrate(&mut qmp, "migrate", &file, "saving the template guest").await?;
    file.sync_all()
        .map_err(io_error("writing the devices' state"))
}

/// Has the QEMU at `qmp`, started with `-incoming defer`, load the devices' state from
/// `devices`, and runs the guest (the template was paused when saved, so QEMU leaves the
/// restored guest paused).
async fn load_devices(qmp: &Path, devices: &Path) -> Result<(), BackendError> {
    let mut qmp = Qmp::connect(qmp)
        .await
        .map_err(io_error("connecting to the restoring QEMU"))?;
    let file = std::fs::File::open(devices).map_err(io_error("opening the devices' state"))?;
    migrate(&mut qmp, "migrate-incoming", &file, "restoring the guest").await?;
    qmp.execute("cont", json!({}))
        .await
        .map(drop)
        .map_err(io_error("running the restored guest"))
}

/// The name the devices' state file's descriptor gets in QEMU.
const STATE_FD: &str = "devices";
