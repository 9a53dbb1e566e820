//! Users: people who log in to the web UI and own jobs, groups, schedules, secrets and tokens.
//! They come from the server's config (`[[users]]`) or from the database (`vmfarm server user
//! add`); the built-in `admin` owns what existed before owners and every token made without a
//! user, and cannot log in with a password.

use crate::config::ServerConfig;
use crate::db::{Db, DbFailure, Query, now_ms};
use crate::error::AppError;

/// The built-in admin user.
pub const ADMIN: &str = "admin";

/// Checks a user name for `vmfarm server user add` and logins.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "user name `{name}`: use 1 to 64 of letters, digits, `-`, `_`, `.`, `@`"
        ))
    }
}

/// Adds a user, or replaces a user's password (an admin stays one; `admin` makes one).
pub async fn add(db: &Db, name: &str, password: &str, admin: bool) -> Result<(), AppError> {
    check_name(name).map_err(AppError::BadRequest)?;
    if name == ADMIN {
        return Err(AppError::BadRequest(format!(
            "`{ADMIN}` is the built-in admin, which has no password: add a user of your own with --admin"
        )));
    }
    if password.chars().count() < 8 {
        return Err(AppError::BadRequest(
            "the password is shorter than 8 characters".into(),
        ));
    }
    let hash = crate::web::session::hash_password(password)?;
    db.execute(
        "INSERT INTO users (name, password_hash, created_at, admin) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash, \
         admin = CASE WHEN excluded.admin = 1 THEN 1 ELSE users.admin END",
        &[
            name.into(),
            (&hash).into(),
            now_ms().into(),
            i64::from(admin).into(),
        ],
    )
    .await?;
    Ok(())
}

/// What is known of a user: `None` when neither the config nor the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Its password hash, when it may log in with one.
    pub password_hash: Option<String>,
    pub admin: bool,
}

/// Looks a user up in the config first, then in the database.
pub async fn find(db: &Db, config: &ServerConfig, name: &str) -> Result<Option<Known>, DbFailure> {
    let stored = db
        .read()
        .fetch_optional(
            "SELECT password_hash, admin FROM users WHERE name = $1",
            &[name.into()],
        )
        .await?;
    let stored = match stored {
        Some(row) => Some((row.text(0)?, row.int(1)? != 0)),
        None => None,
    };
    let configured = config.users.iter().find(|u| u.name == name);
    Ok(match (configured, stored) {
        (None, None) => None,
        (Some(user), stored) => Some(Known {
            password_hash: Some(user.password_hash.clone()),
            admin: user.admin || stored.is_some_and(|(_, admin)| admin),
        }),
        (None, Some((hash, admin))) => Some(Known {
            password_hash: (!hash.is_empty()).then_some(hash),
            admin,
        }),
    })
}

/// Whether user `name` is an admin: by its database row's flag (`stored`, read with the token
/// or the session), or by the config.
pub fn is_admin(config: &ServerConfig, name: &str, stored: Option<i64>) -> bool {
    stored.is_some_and(|flag| flag != 0) || config.users.iter().any(|u| u.name == name && u.admin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{Database, TestApp, on_both_databases};

    on_both_databases!(test_a_password_change_keeps_an_admin_and_the_builtin_admin_has_none);

    async fn test_a_password_change_keeps_an_admin_and_the_builtin_admin_has_none(db: Database) {
        let app = TestApp::new(db).await;
        let (db, config) = (&app.state.db, &app.state.config);
        add(db, "carol", "first-password", true).await.unwrap();
        add(db, "carol", "second-password", false).await.unwrap();
        let carol = find(db, config, "carol").await.unwrap().unwrap();
        assert!(carol.admin, "a new password does not take admin away");
        let err = add(db, ADMIN, "any-password", false).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("built-in admin, which has no password"),
            "{err}"
        );
        let admin = find(db, config, ADMIN).await.unwrap().unwrap();
        assert_eq!((admin.admin, admin.password_hash), (true, None));
    }
}
