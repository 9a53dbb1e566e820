//! Secrets: values a job's tasks read from `~/.secrets/NAME`. Each belongs to a user; the jobs of
//! its owner and of the users it is shared with may name it, nobody else's. Values are sealed with
//! AES-256-GCM (the `aes-gcm` crate of RustCrypto, already in the build through russh) under a
//! key kept outside the database: `VMFARM_SECRET_KEY` (64 hex digits), or `<data dir>/secret.key`
//! (mode 0600, made on first use). The secret's name is the associated data, so a value moved to
//! another row does not open. The database alone reveals no value.

use crate::db::{Db, DbFailure, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use vmfarm_proto::manifest::SecretRef;
use vmfarm_proto::names::{NameKind, check_name};
use vmfarm_proto::{ManifestError, ManifestErrors};

/// The environment variable that gives the key instead of the key file.
pub const KEY_ENV: &str = "VMFARM_SECRET_KEY";
/// The key file's name in the data directory.
pub const KEY_FILE: &str = "secret.key";
/// Largest secret value.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
const NONCE_BYTES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{0}")]
    Invalid(String),
    #[error("the secret key: {0}")]
    Key(String),
    #[error("cannot make random bytes")]
    Random(#[from] getrandom::Error),
    #[error("database error")]
    Db(#[from] DbFailure),
}

/// The key that seals and opens secret values.
#[derive(Clone)]
pub struct SecretKey(Aes256Gcm);

impl SecretKey {
    /// The key of `VMFARM_SECRET_KEY`, or of `<data_dir>/secret.key`; a missing file is made
    /// (0600) when `make` (the server at start), and refused otherwise (a command that would
    /// seal with a key the server does not have).
    pub fn load(data_dir: &Path, make: bool) -> Result<SecretKey, SecretError> {
        if let Ok(hex_key) = std::env::var(KEY_ENV) {
            return Self::from_hex(&hex_key)
                .map_err(|e| SecretError::Key(format!("{KEY_ENV}: {e}")));
        }
        let path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mode = std::fs::metadata(&path)
                    .map_err(|e| SecretError::Key(format!("{}: {e}", path.display())))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::Key(format!(
                        "{} can be read by others (mode {:o}): `chmod 600` it",
                        path.display(),
                        mode & 0o777
                    )));
                }
                Self::from_hex(&text)
                    .map_err(|e| SecretError::Key(format!("{}: {e}", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !make => {
                Err(SecretError::Key(format!(
                    "{} does not exist and {KEY_ENV} is not set: start the server once on this data directory (it makes the key), or set {KEY_ENV} to the server's key",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)?;
                let text = hex::encode(key);
                crate::files::write_secret_file(&path, &text).map_err(|e| {
                    SecretError::Key(format!("cannot write {}: {e}", path.display()))
                })?;
                tracing::info!(path = %path.display(), "made the key that seals secrets");
                Self::from_hex(&text).map_err(SecretError::Key)
            }
            Err(e) => Err(SecretError::Key(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    fn from_hex(text: &str) -> Result<SecretKey, String> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or("it must be 64 hex digits (32 random bytes, as `openssl rand -hex 32` gives)")?;
        Aes256Gcm::new_from_slice(&bytes)
            .map(SecretKey)
            .map_err(|e| e.to_string())
    }

    /// `value` sealed for secret `name`: a random nonce, then the ciphertext and its tag.
    fn seal(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce)?;
        let sealed = self
            .0
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: value,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Key("cannot seal the value".into()))?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// The value of secret `name` from what [`Self::seal`] made; `None` when it does not open
    /// (another key, another name, or changed bytes).
    fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, ciphertext) = sealed.split_at_checked(NONCE_BYTES)?;
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
        self.0
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .ok()
    }
}

/// A new secret's value and who may use it.
pub struct NewSecret<'a> {
    pub name: &'a str,
    pub owner: &'a str,
    /// Other users whose jobs may name it.
    pub shared_with: &'a [String],
    pub value: &'a [u8],
}

/// Stores (or replaces) a secret, sealed.
pub async fn set(db: &Db, key: &SecretKey, new: &NewSecret<'_>) -> Result<(), SecretError> {
    let name = new.name;
    check_name(NameKind::Secret, name).map_err(|e| SecretError::Invalid(e.to_string()))?;
    if new.value.is_empty() || new.value.len() > MAX_VALUE_BYTES {
        return Err(SecretError::Invalid(format!(
            "secret `{name}` is {} bytes; it must be 1 to {MAX_VALUE_BYTES}",
            new.value.len()
        )));
    }
    for user in std::iter::once(new.owner).chain(new.shared_with.iter().map(String::as_str)) {
        crate::users::check_name(user).map_err(SecretError::Invalid)?;
    }
    let sealed = key.seal(name, new.value)?;
    let row = (
        name.to_owned(),
        new.owner.to_owned(),
        new.shared_with.join(","),
        sealed,
    );
    db.write(move |tx| {
        Box::pin(async move {
            let (name, owner, shared, sealed) = &row;
            tx.execute("DELETE FROM secrets WHERE name = $1", &[name.into()])
                .await?;
            tx.execute(
                "INSERT INTO secrets (name, value, updated_at, owner, shared_with, sealed) \
                 VALUES ($1, $2, $3, $4, $5, 1)",
                &[
                    name.into(),
                    sealed.as_slice().into(),
                    now_ms().into(),
                    owner.into(),
                    shared.into(),
                ],
            )
            .await
        })
    })
    .await?;
    Ok(())
}

/// A stored secret, without its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub owner: String,
    pub shared_with: Vec<String>,
    pub updated_at: i64,
}

/// Every stored secret, by name: who owns it and who may use it, never its value.
pub async fn list(db: &Db) -> Result<Vec<SecretInfo>, DbFailure> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT name, owner, shared_with, updated_at FROM secrets ORDER BY name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(SecretInfo {
                name: row.text(0)?,
                owner: row.text(1)?,
                shared_with: split_users(&row.text(2)?),
                updated_at: row.int(3)?,
            })
        })
        .collect()
}

fn split_users(text: &str) -> Vec<String> {
    text.split(',')
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether `user`'s jobs may name a secret owned by `owner` and shared with `shared_with`.
fn may_use(user: &str, owner: &str, shared_with: &str) -> bool {
    !user.is_empty() && (owner == user || shared_with.split(',').any(|u| u == user))
}

/// Refuses, at their line and column, the secrets of a manifest that `user`'s jobs may not name
/// (missing ones are refused in the same words, so that names do not tell what exists).
pub async fn check_usable(tx: &mut WriteTx, wanted: &[SecretRef], user: &str) -> AppResult<()> {
    let mut errors = Vec::new();
    for secret in wanted {
        let row = tx
            .fetch_optional(
                "SELECT owner, shared_with FROM secrets WHERE name = $1",
                &[secret.name.as_str().into()],
            )
            .await?;
        let usable = match row {
            Some(row) => may_use(user, &row.text(0)?, &row.text(1)?),
            None => false,
        };
        if !usable {
            errors.push(ManifestError {
                line: secret.at.line,
                column: secret.at.column,
                message: format!(
                    "`{name}` is not a secret that jobs of user `{user}` may use: its owner stores \
                     it with `vmfarm server secret set {name} --user {user}`, or shares it with \
                     `--share-with {user}`",
                    name = secret.name
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(AppError::Manifest(ManifestErrors(errors)))
    }
}

/// Why a secret's value is not handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withheld {
    /// Missing, or not the user's to use.
    NotUsable,
    /// Stored, but it does not open with this server's key.
    Unopened,
}

/// The value of secret `name` when `user` may use it and it opens with `key`.
pub async fn open_for(
    q: &mut impl Query,
    key: &SecretKey,
    name: &str,
    user: &str,
) -> AppResult<Result<Vec<u8>, Withheld>> {
    let row = q
        .fetch_optional(
            "SELECT owner, shared_with, value, sealed FROM secrets WHERE name = $1",
            &[name.into()],
        )
        .await?;
    let row = match row {
        Some(row) if may_use(user, &row.text(0)?, &row.text(1)?) => row,
        _ => return Ok(Err(Withheld::NotUsable)),
    };
    Ok((row.int(3)? == 1)
        .then(|| row.blob(2))
        .transpose()?
        .and_then(|sealed| key.open(name, &sealed))
        .ok_or(Withheld::Unopened))
}

/// What a lease carries of a job's secrets: the values (base64) that the job's owner may still
/// use and that open with this server's key, and a line for the job's log about each one left out.
pub async fn for_lease(
    tx: &mut WriteTx,
    key: &SecretKey,
    names_json: &str,
    owner: &str,
) -> AppResult<(BTreeMap<String, String>, Vec<String>)> {
    use base64::Engine;
    let names: Vec<String> = serde_json::from_str(names_json).map_err(AppError::internal)?;
    let mut values = BTreeMap::new();
    let mut problems = Vec::new();
    for name in names {
        match open_for(tx, key, &name, owner).await? {
            Ok(value) => {
                values.insert(name, base64::engine::general_purpose::STANDARD.encode(value));
            }
            Err(Withheld::NotUsable) => problems.push(format!(
                "secret `{name}` is left out: it was removed, or it is no longer shared with user `{owner}`, since the job was submitted"
            )),
            Err(Withheld::Unopened) => problems.push(format!(
                "secret `{name}` is left out: it does not open with this server's key ({KEY_ENV} or <data dir>/{KEY_FILE}); store it again"
            )),
        }
    }
    Ok((values, problems))
}

/// Seals the values stored before secrets were sealed (at start; the upgrade of a database made
/// by an earlier vmfarm). Returns how many.
pub async fn seal_stored(db: &Db, key: &SecretKey) -> Result<usize, SecretError> {
    let rows = db
        .read()
        .fetch_all("SELECT name, value FROM secrets WHERE sealed = 0", &[])
        .await?;
    let mut sealed = Vec::with_capacity(rows.len());
    for row in rows {
        let name = row.text(0)?;
        let value = key.seal(&name, &row.blob(1)?)?;
        sealed.push((name, value));
    }
    let count = sealed.len();
    db.write(move |tx| {
        Box::pin(async move {
            for (name, value) in &sealed {
                tx.execute(
                    "UPDATE secrets SET value = $1, sealed = 1 WHERE name = $2 AND sealed = 0",
                    &[value.as_slice().into(), name.into()],
                )
                .await?;
            }
            Ok::<_, DbFailure>(())
        })
    })
    .await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn test_a_sealed_value_opens_only_with_its_key_and_name() {
        let sealed = key().seal("deploy-key", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(key().open("deploy-key", &sealed).unwrap(), b"hunter2");
        assert_eq!(key().open("other", &sealed), None, "bound to its name");
        let other = SecretKey::from_hex(&"cd".repeat(32)).unwrap();
        assert_eq!(other.open("deploy-key", &sealed), None, "bound to its key");
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert_eq!(key().open("deploy-key", &changed), None, "changed bytes");
        assert_eq!(key().open("deploy-key", &sealed[..5]), None, "short");
        assert_ne!(
            key().seal("deploy-key", b"hunter2").unwrap(),
            sealed,
            "fresh nonce"
        );
    }

    #[test]
    fn test_bad_keys_say_what_a_key_is() {
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(31)] {
            let err = SecretKey::from_hex(bad).err().unwrap();
            assert!(err.contains("64 hex digits"), "{err}");
        }
    }

    #[test]
    fn test_the_key_file_is_made_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let refused = SecretKey::load(dir.path(), false)
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("start the server once"), "{refused}");
        let first = SecretKey::load(dir.path(), true).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = first.seal("s", b"v").unwrap();
        let again = SecretKey::load(dir.path(), false).unwrap();
        assert_eq!(
            again.open("s", &sealed).unwrap(),
            b"v",
            "the same key on reload"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretKey::load(dir.path(), true).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn test_sharing_names_users_exactly() {
        assert!(may_use("alice", "alice", ""));
        assert!(may_use("bob", "alice", "carol,bob"));
        assert!(!may_use("bo", "alice", "carol,bob"));
        assert!(!may_use("", "alice", ""));
    }
}
