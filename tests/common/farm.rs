//! Guests for end-to-end tests: images built (or reused from the cache) by `vmfarm images
//! build`, and `vmfarm worker` processes that run jobs in them.

use super::{TestServer, worker_name, worker_token};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The cache's test images dir, with `names` built there (reused when up to date).
pub fn images(names: &[&str]) -> PathBuf {
    for name in names {
        image_version_dir(name);
    }
    test_images_dir()
}

/// The folder of image `name`'s current version in the cache's test images dir, built (or reused).
pub fn image_version_dir(name: &str) -> PathBuf {
    let agent = std::env::var_os("VMFARM_AGENT").unwrap_or_else(|| {
        panic!(
            "VMFARM_AGENT is not set: run the tests with scripts/test.sh, or build the agent \
             (cargo build -p vmfarm-agent --release --target x86_64-unknown-linux-musl) and point VMFARM_AGENT at it"
        )
    });
    let out = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["images", "build", name, "--images-dir"])
        .arg(test_images_dir())
        .arg("--recipes")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/images"))
        .env("VMFARM_AGENT", &agent)
        .output()
        .expect("run vmfarm images build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "building image {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `NAME VERSION up to date in 1.2 s: ..., DIR`
    let dir = stdout.trim_end().rsplit(", ").next().map(PathBuf::from);
    match dir {
        Some(dir) if dir.join("image.toml").is_file() => dir,
        _ => panic!("`vmfarm images build {name}` did not name the image's folder: {stdout}"),
    }
}

fn test_images_dir() -> PathBuf {
    let cache = std::env::var_os("VMFARM_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/vmfarm"),
        PathBuf::from,
    );
    cache.join("test-images")
}

/// A `vmfarm worker` process.
pub struct TestWorker {
    child: Option<Child>,
    pub work_dir: tempfile::TempDir,
    config: PathBuf,
}

impl TestWorker {
    /// Starts worker `i` of `server` on `images_dir`; `extra` is TOML appended to its config.
    pub fn start(server: &TestServer, i: usize, images_dir: &Path, extra: &str) -> TestWorker {
        Self::start_on(&[server], i, images_dir, extra)
    }

    /// [`TestWorker::start`] with the URLs of a farm's replicas, in the order it tries them.
    pub fn start_on(
        replicas: &[&TestServer],
        i: usize,
        images_dir: &Path,
        extra: &str,
    ) -> TestWorker {
        let urls: Vec<String> = replicas.iter().map(|s| format!("\"{}\"", s.url)).collect();
        let server = match urls.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let work_dir = tempfile::tempdir().unwrap();
        let config = work_dir.path().join("worker.toml");
        // Each test's worker is new: unless a test is about warm starts, its first job of each
        // image would have a template snapshot made beside it, for nothing.
        let warm_start = if extra.contains("[warm_start]") {
            ""
        } else {
            "[warm_start]\nenabled = false\n"
        };
        std::fs::write(
            &config,
            format!(
                "server = {server}\nname = \"{}\"\ntoken = \"{}\"\nimages_dir = \"{}\"\nwork_dir = \"{}\"\n{extra}\n{warm_start}\
                 # Workers of tests running at once each get users of their own.\n\
                 [jail]\nfirst_uid = {}\nuid_count = 16\n",
                worker_name(i),
                worker_token(i),
                images_dir.display(),
                work_dir.path().join("work").display(),
                2_000_000 + (std::process::id() % 100_000) * 128 + i as u32 * 16,
            ),
        )
        .unwrap();
        let mut worker = TestWorker {
            child: None,
            work_dir,
            config,
        };
        worker.spawn();
        worker
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.work_dir.path().join("worker.log")).unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_vmfarm"))
                .args(["worker", "--config"])
                .arg(&self.config)
                .env("VMFARM_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start vmfarm worker"),
        );
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The worker process's peak resident memory so far, in MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> u64 {
        let pid = self.child.as_ref().expect("the worker runs").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib / 1024
    }

    /// Bytes the worker's scratch folder holds on disk now (sparse files count what they use).
    pub fn disk_use(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        let mut stack = vec![self.work_dir.path().join("work")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else {
                    total += meta.blocks() * 512;
                }
            }
        }
        total
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.work_dir.path().join("worker.log")).unwrap_or_default()
    }

    /// Guest processes (QEMU or `vm run`) still running on this worker's files.
    pub fn guest_processes(&self) -> Vec<String> {
        let needle = self.work_dir.path().display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.contains("worker --config") {
                found.push(cmdline);
            }
        }
        found
    }

    /// Files left in the worker's scratch folder (overlays, sockets).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.work_dir.path().join("work")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push(path);
                }
            }
        }
        out
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill9();
    }
}
