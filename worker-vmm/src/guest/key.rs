//! The per-job SSH key: made for one job, its public half goes to the guest in the job's identity.

use std::io::Read as _;
use std::sync::Arc;

use base64::Engine as _;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;

/// An ed25519 key made for one job.
#[derive(Clone)]
pub struct JobKey {
    key: Arc<PrivateKey>,
}

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobKey")
            .field("public", &self.public_blob_base64())
            .finish()
    }
}

impl JobKey {
    /// A fresh key from the host's random source.
    pub fn generate() -> std::io::Result<Self> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Ok(Self::from_seed(&seed))
    }

    pub fn from_seed(seed: &[u8; 32]) -> Self {
        JobKey {
            key: Arc::new(PrivateKey::from(Ed25519Keypair::from_seed(seed))),
        }
    }

    /// The identity's `key=`: base64 of the public key's OpenSSH wire blob.
    pub fn public_blob_base64(&self) -> String {
        // Encoding an ed25519 public key into a Vec cannot fail.
        let blob = self.key.public_key().to_bytes().unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(blob)
    }

    /// The public key as an `authorized_keys` line (for a cloud-init seed).
    pub fn public_openssh(&self) -> String {
        format!("ssh-ed25519 {} vmfarm-job", self.public_blob_base64())
    }

    pub(crate) fn private(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_generated_keys_differ_and_encode_as_ssh_ed25519_blobs() {
        let a = JobKey::generate().unwrap();
        let b = JobKey::generate().unwrap();
        assert_ne!(a.public_blob_base64(), b.public_blob_base64());
        // "\0\0\0\x0bssh-ed25519" in base64
        assert!(a.public_blob_base64().starts_with("AAAAC3NzaC1lZDI1NTE5"));
    }
}
