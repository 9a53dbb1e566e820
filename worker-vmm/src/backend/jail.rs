//! The worker's side of the VMM jail (DESIGN.md: "Each VMM process is jailed"): each guest's
//! VMM process gets a user of its own from the configured range and a cgroup with the guest's
//! memory, CPU and pids limits; the backends start it with those ([`GuestJail`]) and an empty
//! environment. The integrated VMM jails itself (`vm run --jail`, `vmfarm_vmm::jail`); QEMU gets
//! what it offers (`-sandbox`, `-runas`/`-run-with user=`, `-chroot`) plus the cgroup, new IPC,
//! UTS and network namespaces and resource limits set between fork and exec.
//!
//! The jail needs root. `[jail] mode = "auto"` (the default) jails when the worker runs as root
//! and otherwise runs VMMs unjailed as the worker's user, saying so once in the log; `"on"`
//! refuses to start without it; `"off"` never jails.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{JailConfig, JailMode};
use vmfarm_proto::units::ByteSize;

/// How a worker jails its VMMs: the user range, the cgroups and their limits.
#[derive(Debug)]
pub struct Jailer {
    config: JailConfig,
    /// `None` where no cgroup hierarchy could be used (mode `auto`, said in the log).
    cgroups: Option<Cgroups>,
    /// Users given to running VMMs.
    taken: Mutex<BTreeSet<u32>>,
}

/// The cgroup hierarchies guests' cgroups are made in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v2: `<root>/<parent>`, with memory, cpu and pids enabled below it.
    V2(PathBuf),
    /// cgroup v1: `<root>/memory/<parent>`, `<root>/cpu/<parent>`, `<root>/pids/<parent>`.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

/// What the jail of one guest's VMM is: its user and its cgroup directories. Dropping it (after
/// the VMM has ended) removes the cgroups and gives the user back.
#[derive(Debug)]
pub struct GuestJail {
    pub uid: u32,
    pub gid: u32,
    /// One directory with cgroup v2, one per controller with v1.
    pub cgroups: Vec<PathBuf>,
    /// The memory limit of the cgroup, in bytes (the guest's RAM + `memory_overhead`).
    pub memory: u64,
    jailer: Arc<Jailer>,
}

impl GuestJail {
    /// Why the VMM ended, when its cgroup says the kernel killed a process of it for want of
    /// memory (`oom_kill` in v2's `memory.events` or v1's `memory.oom_control`).
    pub fn memory_exhausted(&self) -> Option<String> {
        let kills: u64 = self
            .cgroups
            .iter()
            .flat_map(|dir| ["memory.events", "memory.oom_control"].map(|file| dir.join(file)))
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .filter_map(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .sum();
        (kills > 0).then(|| {
            format!(
                "the guest's VMM reached its memory limit of {} (the guest's memory + [jail] \
                 memory_overhead in the worker's config) and the kernel killed it",
                ByteSize(self.memory)
            )
        })
    }
}

/// The jail of a guest could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("all {0} users of [jail] first_uid/uid_count are taken by running guests")]
    NoUser(u32),
    #[error("making the guest's cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the worker decided about the jail at start: the jailer, or none and why.
pub type JailChoice = (Option<Arc<Jailer>>, String);

/// The jail this worker runs VMMs in, per `config` and whether it runs as root; `Err` when
/// `mode = "on"` and the jail cannot be had.
pub fn choose_jail(config: &JailConfig) -> Result<JailChoice, String> {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    choose_jail_as(config, root)
}

fn choose_jail_as(config: &JailConfig, root: bool) -> Result<JailChoice, String> {
    match (config.mode, root) {
        (JailMode::Off, _) => Ok((None, "the VMM jail is off ([jail] mode = \"off\")".into())),
        (JailMode::On, false) => Err(
            "[jail] mode = \"on\" needs the worker to run as root (it makes users, namespaces \
             and cgroups for each VMM); run it as root, or set mode = \"auto\" or \"off\""
                .into(),
        ),
        (JailMode::Auto, false) => Ok((
            None,
            "VMMs run unjailed as the worker's own user: the jail needs root (run the worker \
             as root for it, or set [jail] mode = \"off\" to silence this)"
                .into(),
        )),
        (mode, true) => {
            let (cgroups, why) = match Cgroups::find(&config.cgroup_root, &config.cgroup_parent) {
                Ok(cgroups) => {
                    let why = format!(
                        "each VMM runs jailed as its own user (uids {}..{}) in a cgroup under {}",
                        config.first_uid,
                        config.first_uid + config.uid_count,
                        cgroups.describe()
                    );
                    (Some(cgroups), why)
                }
                Err(e) if mode == JailMode::On => return Err(e),
                Err(e) => (
                    None,
                    format!("each VMM runs jailed as its own user, but with no cgroup: {e}"),
                ),
            };
            let jailer = Jailer {
                config: config.clone(),
                cgroups,
                taken: Mutex::new(BTreeSet::new()),
            };
            Ok((Some(Arc::new(jailer)), why))
        }
    }
}

impl Cgroups {
    /// The hierarchies under `root` (where cgroup file systems are mounted), with this worker's
    /// cgroup `parent/worker-<pid>` made in each (several workers may share a host), and what
    /// workers that are gone left under `parent` removed. cgroup v2 when `root` is a v2
    /// hierarchy with memory, cpu and pids; else v1 with those three controllers mounted at
    /// `root/memory`, `root/cpu` and `root/pids`.
    pub fn find(root: &Path, parent: &str) -> Result<Cgroups, String> {
        Self::find_for(root, parent, std::process::id())
    }

    fn find_for(root: &Path, parent: &str, worker: u32) -> Result<Cgroups, String> {
        let parent = Path::new(parent).join(format!("worker-{worker}"));
        let v2_controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
        let cgroups = match v2_controllers {
            Ok(list) => {
                let have: BTreeSet<&str> = list.split_whitespace().collect();
                let missing: Vec<&str> = ["memory", "cpu", "pids"]
                    .into_iter()
                    .filter(|c| !have.contains(c))
                    .collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "the cgroup v2 hierarchy at {} lacks the {} controller(s)",
                        root.display(),
                        missing.join(", ")
                    ));
                }
                Cgroups::V2(root.join(&parent))
            }
            Err(_) => {
                let dir = |c: &str| -> Result<PathBuf, String> {
                    let mount = root.join(c);
                    if mount.join("cgroup.procs").exists() {
                        Ok(mount.join(&parent))
                    } else {
                        Err(format!(
                            "no cgroup v2 hierarchy at {} and no cgroup v1 {c} controller at {}",
                            root.display(),
                            mount.display()
                        ))
                    }
                };
                Cgroups::V1 {
                    memory: dir("memory")?,
                    cpu: dir("cpu")?,
                    pids: dir("pids")?,
                }
            }
        };
        cgroups.prepare().map_err(|e| {
            format!(
                "cannot make the guests' parent cgroup {}: {e}",
                cgroups.describe()
            )
        })?;
        Ok(cgroups)
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            Cgroups::V2(dir) => vec![dir],
            Cgroups::V1 { memory, cpu, pids } => vec![memory, cpu, pids],
        }
    }

    fn describe(&self) -> String {
        match self {
            Cgroups::V2(dir) => format!("{} (v2)", dir.display()),
            Cgroups::V1 { memory, cpu, pids } => format!(
                "{}, {} and {} (v1)",
                memory.display(),
                cpu.display(),
                pids.display()
            ),
        }
    }

    /// Makes this worker's cgroups and enables the controllers down to them (v2); removes the
    /// cgroups of workers that are gone (`worker-<pid>` with no such process), killing what
    /// still runs in them: a VMM whose worker was killed outright (QEMU, having changed user, no
    /// longer gets the parent-death signal).
    fn prepare(&self) -> io::Result<()> {
        for mine in self.parents() {
            if let Some(shared) = mine.parent() {
                std::fs::create_dir_all(shared)?;
                remove_gone_workers(shared);
            }
            std::fs::create_dir_all(mine)?;
        }
        if let Cgroups::V2(mine) = self {
            let enable = "+memory +cpu +pids";
            let shared = mine.parent().unwrap_or(mine);
            if let Some(above) = shared.parent() {
                std::fs::write(above.join("cgroup.subtree_control"), enable)?;
            }
            std::fs::write(shared.join("cgroup.subtree_control"), enable)?;
            std::fs::write(mine.join("cgroup.subtree_control"), enable)?;
        }
        Ok(())
    }

    /// Makes the cgroup `name` with the limits of a guest of `vcpus` and `memory` bytes (its
    /// RAM plus the VMM's overhead), at most `pids` tasks.
    fn make(
        &self,
        name: &str,
        vcpus: u32,
        memory: u64,
        pids: u32,
    ) -> Result<Vec<PathBuf>, JailError> {
        const PERIOD_US: u64 = 100_000;
        let quota = u64::from(vcpus) * PERIOD_US;
        let mut made = Vec::new();
        let result = (|| -> Result<(), (PathBuf, io::Error)> {
            let write = |dir: &Path, file: &str, value: String| {
                let path = dir.join(file);
                std::fs::write(&path, value).map_err(|e| (path, e))
            };
            let mkdir = |dir: PathBuf, made: &mut Vec<PathBuf>| {
                std::fs::create_dir(&dir).map_err(|e| (dir.clone(), e))?;
                made.push(dir.clone());
                Ok::<_, (PathBuf, io::Error)>(dir)
            };
            match self {
                Cgroups::V2(parent) => {
                    let dir = mkdir(parent.join(name), &mut made)?;
                    write(&dir, "memory.max", memory.to_string())?;
                    if dir.join("memory.swap.max").exists() {
                        write(&dir, "memory.swap.max", "0".into())?;
                    }
                    write(&dir, "cpu.max", format!("{quota} {PERIOD_US}"))?;
                    write(&dir, "pids.max", pids.to_string())?;
                }
                Cgroups::V1 {
                    memory: m,
                    cpu,
                    pids: p,
                } => {
                    let dir = mkdir(m.join(name), &mut made)?;
                    write(&dir, "memory.limit_in_bytes", memory.to_string())?;
                    if dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(&dir, "memory.memsw.limit_in_bytes", memory.to_string())?;
                    }
                    let dir = mkdir(cpu.join(name), &mut made)?;
                    write(&dir, "cpu.cfs_period_us", PERIOD_US.to_string())?;
                    write(&dir, "cpu.cfs_quota_us", quota.to_string())?;
                    let dir = mkdir(p.join(name), &mut made)?;
                    write(&dir, "pids.max", pids.to_string())?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(made),
            Err((path, source)) => {
                remove_cgroups(&made);
                Err(JailError::Cgroup { path, source })
            }
        }
    }
}

/// Removes the `worker-<pid>` cgroups under `shared` whose worker is gone, with the guest
/// cgroups in them and what still runs there.
fn remove_gone_workers(shared: &Path) {
    for entry in std::fs::read_dir(shared).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("worker-") else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let worker = entry.path();
        for guest in std::fs::read_dir(&worker).into_iter().flatten().flatten() {
            let path = guest.path();
            if path.is_dir() {
                kill_all_in(&path);
                remove_cgroups(std::slice::from_ref(&path));
            }
        }
        remove_cgroups(std::slice::from_ref(&worker));
    }
}

/// Kills (SIGKILL) every process in the cgroup `dir`.
fn kill_all_in(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        tracing::warn!(cgroup = %dir.display(), pid, "killing a VMM left by an earlier worker");
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes guest cgroups once their processes are gone: tried for a while, as a VMM killed a
/// moment ago may not have left yet.
fn remove_cgroups(dirs: &[PathBuf]) {
    for dir in dirs {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if tries >= 50 => {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a guest's cgroup");
                    break;
                }
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

impl Jailer {
    /// A user and a cgroup for the VMM of a guest with `vcpus` and `memory_mib`.
    pub fn guest(self: &Arc<Self>, vcpus: u32, memory_mib: u32) -> Result<GuestJail, JailError> {
        let uid = {
            let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
            let first = self.config.first_uid;
            let uid = (first..first.saturating_add(self.config.uid_count))
                .find(|uid| !taken.contains(uid))
                .ok_or(JailError::NoUser(self.config.uid_count))?;
            taken.insert(uid);
            uid
        };
        let mut jail = GuestJail {
            uid,
            gid: uid,
            cgroups: Vec::new(),
            memory: (u64::from(memory_mib) << 20) + self.config.memory_overhead.0,
            jailer: self.clone(),
        };
        if let Some(cgroups) = &self.cgroups {
            jail.cgroups = cgroups.make(
                &format!("guest-{uid}"),
                vcpus,
                jail.memory,
                self.config.pids,
            )?;
        }
        Ok(jail)
    }
}

impl Drop for GuestJail {
    fn drop(&mut self) {
        remove_cgroups(&self.cgroups);
        let mut taken = self.jailer.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.remove(&self.uid);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A jailer of users 5000 and 5001 that makes no cgroups, and its config.
    pub(crate) fn jailer_without_cgroups() -> (Arc<Jailer>, JailConfig) {
        let config = JailConfig {
            first_uid: 5000,
            uid_count: 2,
            ..JailConfig::default()
        };
        let jailer = Arc::new(Jailer {
            config: config.clone(),
            cgroups: None,
            taken: Mutex::new(BTreeSet::new()),
        });
        (jailer, config)
    }

    fn config(mode: JailMode) -> JailConfig {
        JailConfig {
            mode,
            ..JailConfig::default()
        }
    }

    #[test]
    fn test_the_jail_needs_root_unless_it_is_off() {
        let (jailer, why) = choose_jail_as(&config(JailMode::Auto), false).unwrap();
        assert!(
            jailer.is_none() && why.contains("unjailed") && why.contains("root"),
            "{why}"
        );
        let err = choose_jail_as(&config(JailMode::On), false).unwrap_err();
        assert!(err.contains("needs the worker to run as root"), "{err}");
        let (jailer, why) = choose_jail_as(&config(JailMode::Off), true).unwrap();
        assert!(jailer.is_none() && why.contains("off"), "{why}");
    }

    /// v2 and v1 layouts in a scratch folder (the real hierarchies are tested through the
    /// backends): the limits written are the guest's.
    #[test]
    fn test_guest_cgroups_carry_the_guests_limits() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        // A worker that is gone (no process 4000000000) left a cgroup: it goes.
        std::fs::create_dir_all(v2.join("vmfarm/worker-4000000000/guest-1")).unwrap();
        let cgroups = Cgroups::find_for(&v2, "vmfarm", 42).unwrap();
        assert_eq!(cgroups, Cgroups::V2(v2.join("vmfarm/worker-42")));
        assert!(!v2.join("vmfarm/worker-4000000000").exists());
        let made = cgroups.make("guest-7", 2, 600 << 20, 99).unwrap();
        assert_eq!(made, [v2.join("vmfarm/worker-42/guest-7")]);
        let read =
            |p: &str| std::fs::read_to_string(v2.join("vmfarm/worker-42/guest-7").join(p)).unwrap();
        assert_eq!(read("memory.max"), (600u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "200000 100000");
        assert_eq!(read("pids.max"), "99");
        assert_eq!(
            std::fs::read_to_string(v2.join("vmfarm/worker-42/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );

        let v1 = dir.path().join("v1");
        for c in ["memory", "cpu", "pids"] {
            std::fs::create_dir_all(v1.join(c)).unwrap();
            std::fs::write(v1.join(c).join("cgroup.procs"), "").unwrap();
        }
        let cgroups = Cgroups::find_for(&v1, "vmfarm", 42).unwrap();
        let made = cgroups.make("guest-8", 1, 300 << 20, 50).unwrap();
        assert_eq!(made.len(), 3);
        let read = |p: &str| std::fs::read_to_string(v1.join(p)).unwrap();
        assert_eq!(
            read("memory/vmfarm/worker-42/guest-8/memory.limit_in_bytes"),
            (300u64 << 20).to_string()
        );
        assert_eq!(
            read("cpu/vmfarm/worker-42/guest-8/cpu.cfs_quota_us"),
            "100000"
        );
        assert_eq!(read("pids/vmfarm/worker-42/guest-8/pids.max"), "50");

        let err = Cgroups::find(&dir.path().join("none"), "vmfarm").unwrap_err();
        assert!(err.contains("no cgroup v1 memory controller"), "{err}");
        std::fs::write(v2.join("cgroup.controllers"), "cpu memory\n").unwrap();
        let err = Cgroups::find(&v2, "vmfarm").unwrap_err();
        assert!(err.contains("lacks the pids controller"), "{err}");
    }

    /// cgroup v2's counter (v1's is read from the kernel in tests/vm_jail.rs).
    #[test]
    fn test_a_kill_at_the_memory_limit_is_read_from_memory_events() {
        let (jailer, _) = jailer_without_cgroups();
        let mut jail = jailer.guest(1, 256).unwrap();
        assert_eq!(jail.memory_exhausted(), None);
        let dir = tempfile::tempdir().unwrap();
        jail.cgroups = vec![dir.path().to_owned()];
        let events = |kills: u32| format!("low 0\nhigh 0\nmax 7\noom 1\noom_kill {kills}\n");
        std::fs::write(dir.path().join("memory.events"), events(0)).unwrap();
        assert_eq!(jail.memory_exhausted(), None);
        std::fs::write(dir.path().join("memory.events"), events(1)).unwrap();
        let why = jail.memory_exhausted().unwrap();
        assert!(why.contains("memory limit of 768MiB"), "{why}");
        jail.cgroups.clear();
    }

    #[test]
    fn test_each_running_guest_has_a_user_of_its_own() {
        let (jailer, _) = jailer_without_cgroups();
        let a = jailer.guest(1, 256).unwrap();
        let b = jailer.guest(1, 256).unwrap();
        assert_eq!((a.uid, a.gid, b.uid), (5000, 5000, 5001));
        let err = jailer.guest(1, 256).unwrap_err();
        assert!(err.to_string().contains("all 2 users"), "{err}");
        drop(a);
        assert_eq!(jailer.guest(1, 256).unwrap().uid, 5000);
    }
}
