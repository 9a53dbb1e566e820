//! The job's cloud-init NoCloud seed for a guest that boots by firmware: a small FAT disk
//! labelled `CIDATA` with `meta-data` (the instance id and host name) and `user-data`, which
//! makes the build user with the job's SSH key and passwordless sudo, lets the worker's
//! variables through SSH (`AcceptEnv`), names the host, and leaves cloud-init's printing of
//! the host keys' fingerprints on the console, which the worker pins
//! ([`super::console::Announcer::CloudInit`]).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::images::tools::{self, MCOPY, MKFS_VFAT};

/// The seed's size: two small text files.
const SEED_KIB: u32 = 1024;

/// What the seed says.
#[derive(Debug, Clone)]
pub struct Seed<'a> {
    /// The guest's host name, also its instance id.
    pub hostname: &'a str,
    /// The build user's name (its home is /home/build).
    pub user: &'a str,
    /// The job's public key, as an OpenSSH line (`ssh-ed25519 AAAA...`).
    pub public_key: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Tool(#[from] crate::images::ImageError),
    #[error("writing the cloud-init seed in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Seed<'_> {
    /// `user-data`: YAML, every value quoted as JSON (a subset of YAML), so that no value can
    /// add keys.
    pub fn user_data(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            "#cloud-config\n\
             hostname: {host}\n\
             manage_etc_hosts: true\n\
             users:\n\
             \x20 - name: {user}\n\
             \x20   homedir: /home/build\n\
             \x20   shell: /bin/sh\n\
             \x20   sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n\
             \x20   lock_passwd: true\n\
             \x20   ssh_authorized_keys:\n\
             \x20     - {key}\n\
             disable_root: true\n\
             ssh_pwauth: false\n\
             write_files:\n\
             \x20 - path: /etc/ssh/sshd_config.d/90-vmfarm.conf\n\
             \x20   content: \"AcceptEnv *\\n\"\n\
             # An SSH server that started before the file was there reads it again.\n\
             runcmd:\n\
             \x20 - [sh, -c, \"systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || service sshd reload 2>/dev/null || true\"]\n",
            host = q(self.hostname),
            user = q(self.user),
            key = q(self.public_key),
        )
    }

    /// `meta-data`.
    pub fn meta_data(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            q(self.hostname),
            q(self.hostname)
        )
    }

    /// Writes the seed disk `dir/seed.img` (and its two files beside it); returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, SeedError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SeedError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let user_data = dir.join("user-data");
        let meta_data = dir.join("meta-data");
        std::fs::write(&user_data, self.user_data()).map_err(io(&user_data))?;
        std::fs::write(&meta_data, self.meta_data()).map_err(io(&meta_data))?;
        let image = dir.join("seed.img");
        let _ = std::fs::remove_file(&image);
        let size = SEED_KIB.to_string();
        let args: [&OsStr; 5] = [
            "-n".as_ref(),
            "CIDATA".as_ref(),
            "-C".as_ref(),
            image.as_os_str(),
            size.as_ref(),
        ];
        tools::run(MKFS_VFAT, &args, &dir.join("mkfs.log"))?;
        let args: [&OsStr; 5] = [
            "-i".as_ref(),
            image.as_os_str(),
            user_data.as_os_str(),
            meta_data.as_os_str(),
            "::/".as_ref(),
        ];
        tools::run(MCOPY, &args, &dir.join("mcopy.log"))?;
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_values_are_quoted_so_that_none_adds_keys() {
        let seed = Seed {
            hostname: "job-7",
            user: "build",
            public_key: "ssh-ed25519 AAAA\"\nruncmd: [reboot]",
        };
        let text = seed.user_data();
        assert!(text.contains("hostname: \"job-7\""), "{text}");
        assert!(
            text.contains(r#"- "ssh-ed25519 AAAA\"\nruncmd: [reboot]""#),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("runcmd:")).count(), 1);
        assert_eq!(
            seed.meta_data(),
            "instance-id: \"job-7\"\nlocal-hostname: \"job-7\"\n"
        );
    }
}
