//! A real S3-compatible server for the tests and `vmfarm bench artifacts`: `s3s-fs` (the s3s
//! project's S3 service over a folder, installed by `scripts/install-deps.sh test`) on a
//! loopback port, with one bucket, stopped when dropped.

use crate::config::S3Bucket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "vmfarm-artifacts";
const ACCESS_KEY: &str = "vmfarm-test";
const SECRET_KEY: &str = "vmfarm-test-secret";

pub struct S3TestServer {
    child: Child,
    pub endpoint: String,
    /// The folder that holds the bucket's objects.
    pub bucket_dir: PathBuf,
}

impl S3TestServer {
    /// Starts `s3s-fs` (`$VMFARM_S3S_FS`, else from `PATH`) serving the folder `root`.
    pub fn start(root: &Path) -> std::io::Result<S3TestServer> {
        let bucket_dir = root.join(BUCKET);
        std::fs::create_dir_all(&bucket_dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let program = std::env::var_os("VMFARM_S3S_FS").unwrap_or_else(|| "s3s-fs".into());
        let child = Command::new(&program)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run {}: {e} (scripts/install-deps.sh test installs s3s-fs)",
                        Path::new(&program).display()
                    ),
                )
            })?;
        let mut server = S3TestServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                return Err(std::io::Error::other(format!("s3s-fs exited: {status}")));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("s3s-fs did not listen within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The server config's `[artifacts.s3]` for this server's bucket, under `prefix`.
    pub fn bucket(&self, prefix: &str) -> S3Bucket {
        S3Bucket {
            bucket: BUCKET.to_owned(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".to_owned(),
            prefix: prefix.to_owned(),
            access_key_id: Some(ACCESS_KEY.to_owned()),
            secret_access_key: Some(SECRET_KEY.to_owned()),
            allow_http: true,
        }
    }

    /// The same as a config file's section.
    pub fn toml(&self, prefix: &str) -> String {
        format!(
            "[artifacts.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nprefix = \"{prefix}\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nallow_http = true\n",
            self.endpoint
        )
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
