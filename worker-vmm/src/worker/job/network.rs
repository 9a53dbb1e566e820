//! The job's network (DESIGN.md, "The VMM"): the guest has no network device. The agent listens
//! on a loopback port in the guest that the worker asked it to forward over SSH; each
//! connection to it is served by the job's proxy on the worker ([`JobNetwork`]), which lets
//! through only what the job's allow-list and the operator's policy allow. The tasks find the
//! proxy in the usual variables; root's tools (`sudo`, apt) in files written as root where the
//! image has sudo; and the guest trusts the certificate authorities the worker is told to add
//! (`guest.ca_certificates`).

use super::limits::Halt;
use super::{JobRun, create_private_dir, run_checked, write_private};
use crate::guest::Guest;
use crate::network::{FarmLog, JobNetwork};
use crate::worker::guest_paths::{FARM_DIR, quote};
use crate::worker::sources::{self, Gate};
use anyhow::Context;
use std::path::Path;
use std::sync::Arc;
use vmfarm_proto::network::HostPattern;

/// Where the worker's certificate authorities go in the guest.
const CA_FILE: &str = "/usr/local/share/ca-certificates/vmfarm-worker.crt";
/// The system's bundle of trusted authorities (Debian's layout), which the added ones join.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl JobRun<'_> {
    /// Starts the job's proxy and points the guest at it; the proxy variables of the tasks.
    pub(super) async fn network(&mut self, guest: &Guest) -> Result<Vec<(String, String)>, Halt> {
        let forward = async { Ok::<_, anyhow::Error>(guest.forward().await?) };
        let (port, mut connections) = self
            .limits
            .step("forwarding the guest's proxy port", forward)
            .await?;
        let log = self.log.clone();
        let farm: FarmLog = Arc::new(move |line: &str| log.farm(line));
        let network = JobNetwork::new(
            self.allow(),
            self.lease.network.allow_private.clone(),
            (&self.ctx.config.network).into(),
            self.ctx.cache.clone(),
            self.ctx.metrics.proxy.clone(),
            farm,
        );
        let serving = network.clone();
        self.proxy = Some(tokio::spawn(async move {
            while let Some(stream) = connections.recv().await {
                let network = serving.clone();
                tokio::spawn(async move { network.serve(stream).await });
            }
        }));
        self.network = Some(network);
        let allowed: Vec<String> = self.allow().iter().map(ToString::to_string).collect();
        self.log.farm(&format!(
            "network: through the worker's proxy (port {port} in the guest), to {}",
            if allowed.is_empty() {
                "nothing: the manifest has no [network]".to_owned()
            } else {
                allowed.join(", ")
            }
        ));
        let env = proxy_environment(port);
        let rooted = self.network_as_root(guest, port);
        self.limits
            .step("pointing the guest's tools at the proxy", rooted)
            .await?;
        Ok(env)
    }

    /// The gate the host's fetch of the sources goes through: a proxy of the job's on a loopback
    /// port of the host, which lets the remote sources' hosts through (and nothing else), with
    /// the operator's address policy and the job's byte limit; and an empty HOME.
    pub(super) async fn sources_gate(&mut self) -> anyhow::Result<Gate> {
        let allow = sources::hosts(&self.manifest.sources)
            .iter()
            // An address (not a name) cannot be a pattern: any host on its port is let through
            // for the fetch; non-public addresses stay refused unless allow_private covers them.
            .map(|host| {
                host.parse().or_else(|_| {
                    let port = host.rsplit_once(':').map_or("", |(_, port)| port);
                    format!("*:{port}").parse()
                })
            })
            .collect::<Result<Vec<HostPattern>, _>>()?;
        let log = self.log.clone();
        let farm: FarmLog = Arc::new(move |line: &str| log.farm(line));
        let network = JobNetwork::new(
            allow,
            self.lease.network.allow_private.clone(),
            (&self.ctx.config.network).into(),
            self.ctx.cache.clone(),
            self.ctx.metrics.proxy.clone(),
            farm,
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("listening for the sources' fetch")?;
        let proxy = format!("http://{}", listener.local_addr()?);
        let serving = network.clone();
        self.source_proxy = Some(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let network = serving.clone();
                tokio::spawn(async move { network.serve(stream).await });
            }
        }));
        self.source_network = Some(network);
        let home = self.run_dir.join("fetch-home");
        create_private_dir(&home)
            .await
            .context("making the fetch's HOME")?;
        Ok(Gate {
            proxy,
            home,
            max_bytes: self.ctx.config.network.max_bytes_per_job.0,
        })
    }

    /// The sources are fetched: their gate closes.
    pub(super) fn close_sources_gate(&mut self) {
        if let Some(proxy) = self.source_proxy.take() {
            proxy.abort();
        }
        if let Some(network) = self.source_network.take() {
            network.close();
        }
    }

    /// What the tasks may reach: the manifest's `[network] allow` (nothing without it).
    pub(super) fn allow(&self) -> Vec<HostPattern> {
        self.manifest
            .network
            .as_ref()
            .map(|n| n.patterns())
            .unwrap_or_default()
    }

    /// Lets the proxy reach `extra` hosts too while `step` runs (the image's package mirrors
    /// for the packages step).
    pub(super) fn allow_also(&self, extra: &[HostPattern]) {
        if let Some(network) = &self.network {
            let mut allow = self.allow();
            allow.extend(extra.iter().cloned());
            network.set_allow(allow);
        }
    }

    /// Back to the manifest's allow-list.
    pub(super) fn allow_only_the_manifests(&self) {
        if let Some(network) = &self.network {
            network.set_allow(self.allow());
        }
    }

    /// Where the image has sudo: `sudo` keeps the proxy variables, apt uses the proxy, and the
    /// worker's certificate authorities are trusted.
    async fn network_as_root(&self, guest: &Guest, port: u16) -> anyhow::Result<()> {
        let has_sudo = guest
            .exec_collect(
                "command -v sudo >/dev/null && sudo -n true",
                crate::guest::ExecLimits::timeout(std::time::Duration::from_secs(60)),
            )
            .await?
            .exit_status
            == 0;
        if !has_sudo {
            self.log.farm(
                "network: the image has no sudo; only the tasks' variables point at the proxy",
            );
            return Ok(());
        }
        let mut script = root_network_script(port);
        let authorities = &self.ctx.ca_certificates;
        if !authorities.is_empty() {
            let local = self.run_dir.join("ca.crt");
            write_private(&local, authorities.as_bytes())
                .await
                .context("staging the certificate authorities")?;
            let remote = format!("{FARM_DIR}/ca.crt");
            guest.upload(&local, &remote).await?;
            script.push_str(&format!(
                "install -D -m 0644 {remote} {CA_FILE}\n\
                 if [ -f {CA_BUNDLE} ]; then cat {remote} >> {CA_BUNDLE}; \
                 else install -D -m 0644 {remote} {CA_BUNDLE}; fi\n",
                remote = quote(&remote)
            ));
        }
        let local = self.run_dir.join("network-as-root.sh");
        write_private(&local, script.as_bytes())
            .await
            .context("staging the network setup")?;
        let remote = format!("{FARM_DIR}/network-as-root.sh");
        guest.upload(&local, &remote).await?;
        run_checked(guest, &format!("sudo -n sh -e {}", quote(&remote))).await
    }
}

/// The certificate authorities the guests of this worker trust besides their own: the PEM
/// files of `paths` (`guest.ca_certificates`; a folder stands for its `*.crt` files), read once
/// when the worker starts.
pub fn trusted_authorities(paths: &[std::path::PathBuf]) -> anyhow::Result<Arc<str>> {
    let mut pem = String::new();
    for path in paths {
        for file in pem_files(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                anyhow::bail!(
                    "{} holds no PEM certificate: remove it from guest.ca_certificates, or put \
                     the authority's PEM file there",
                    file.display()
                );
            }
            pem.push_str(text.trim_end());
            pem.push('\n');
        }
    }
    Ok(pem.into())
}

/// The PEM files `path` names: itself, or a folder's `*.crt` files in name order (a missing
/// folder: none).
fn pem_files(path: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    if !path.is_dir() {
        return Ok(if path.exists() {
            vec![path.to_owned()]
        } else {
            Vec::new()
        });
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .with_context(|| format!("reading {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    files.sort();
    Ok(files)
}

/// The proxy variables, as curl, wget, pip, cargo, git and npm read them; loopback is direct.
fn proxy_environment(port: u16) -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{port}");
    let direct = "localhost,127.0.0.1,::1".to_owned();
    ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"]
        .into_iter()
        .map(|name| (name.to_owned(), proxy.clone()))
        .chain(["no_proxy", "NO_PROXY"].map(|name| (name.to_owned(), direct.clone())))
        .collect()
}

/// A shell script run as root: `sudo` keeps the proxy variables (it resets the environment
/// otherwise) and apt goes through the proxy even without them.
fn root_network_script(port: u16) -> String {
    let proxy = format!("http://127.0.0.1:{port}");
    format!(
        "mkdir -p /etc/sudoers.d /etc/apt/apt.conf.d\n\
         printf '%s\\n' 'Defaults env_keep += \"http_proxy https_proxy HTTP_PROXY HTTPS_PROXY no_proxy NO_PROXY\"' \
         > /etc/sudoers.d/vmfarm-proxy\n\
         chmod 0440 /etc/sudoers.d/vmfarm-proxy\n\
         printf '%s\\n' 'Acquire::http::Proxy \"{proxy}\";' 'Acquire::https::Proxy \"{proxy}\";' \
         > /etc/apt/apt.conf.d/90vmfarm-proxy\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_tasks_find_the_proxy_in_the_usual_variables() {
        let env = proxy_environment(41234);
        for name in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            assert!(
                env.contains(&(name.into(), "http://127.0.0.1:41234".into())),
                "{name}"
            );
        }
        assert!(env.contains(&("no_proxy".into(), "localhost,127.0.0.1,::1".into())));
    }

    #[test]
    fn test_root_keeps_the_variables_and_apt_uses_the_proxy() {
        let script = root_network_script(3128);
        assert!(script.contains("env_keep += \"http_proxy https_proxy"));
        assert!(script.contains("Acquire::http::Proxy \"http://127.0.0.1:3128\";"));
    }

    #[test]
    fn test_a_folder_of_authorities_is_its_crt_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.crt", "a.crt", "notes.txt"] {
            std::fs::write(dir.path().join(name), "x").unwrap();
        }
        let files = pem_files(dir.path()).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a.crt", "b.crt"]);
        assert!(pem_files(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn test_authorities_are_gathered_and_a_file_without_pem_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("a.crt"), pem).unwrap();
        let paths = [dir.path().to_owned(), dir.path().join("missing")];
        assert_eq!(&*trusted_authorities(&paths).unwrap(), pem);
        std::fs::write(dir.path().join("b.crt"), "not a certificate").unwrap();
        let err = trusted_authorities(&paths).unwrap_err().to_string();
        assert!(err.contains("b.crt holds no PEM certificate"), "{err}");
        assert!(
            err.contains("remove it from guest.ca_certificates"),
            "{err}"
        );
    }
}
