//! The platform's PostgreSQL as a connection: the target (never printing its password), the
//! connect that tells "not there" from "refused", and [`DbError`], the one error type of every
//! database adapter call ([`super::release`], [`super::regions`], [`super::packages`]).
//!
//! Where the target comes from (flags, `DATABASE_URL`, the install config, `PG*`, the stack's
//! `.env`) is site configuration: [`crate::site::targets::database`].
//!
//! TLS: none. bkbundle reaches the stack's PostgreSQL on the install host (published on
//! 127.0.0.1 by default); a URL asking for `sslmode=require` fails with tokio-postgres' message.

use crate::error::{chain, Error, Kind};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Which database, for messages: never holds the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbName {
    /// `user@host:port/database`
    pub display: String,
    /// Where it came from, e.g. `--database-url`.
    pub source: String,
}

/// A database to connect to.
#[derive(Clone)]
pub struct DbTarget {
    pub config: tokio_postgres::Config,
    pub name: DbName,
}

impl std::fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbTarget({} from {})", self.name.display, self.name.source)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("where the platform's database is was not given: none of --database-url, DATABASE_URL, [database] url, PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE or the stack's POSTGRES_PASSWORD is set")]
    NoDatabase,
    #[error("the database given by {source_name} is not usable: {message}")]
    BadDatabaseUrl { source_name: String, message: String },
    #[error("cannot reach PostgreSQL at {} (from {}): {message}; nothing was changed", db.display, db.source)]
    Unreachable { db: DbName, message: String },
    #[error("PostgreSQL at {} (from {}) refused user {user}: {message}; nothing was changed", db.display, db.source)]
    Refused { db: DbName, user: String, message: String },
    /// The server's tables are not there (yet): it migrates at start-up. Install waits for this.
    #[error("the server has not run its migrations yet in {}: {detail}", db.display)]
    NotMigrated { db: DbName, detail: String },
    /// A newer release: a NOT NULL column bkbundle has no value for.
    #[error("the database {} ({release}) has a schema this bkbundle does not know: {detail}; nothing was changed", db.display)]
    UnknownSchema {
        db: DbName,
        release: String,
        detail: String,
    },
    #[error("PostgreSQL at {}: {what} failed: {message}; the transaction was rolled back, nothing was changed", db.display)]
    Database { db: DbName, what: String, message: String },
    #[error("{0}")]
    Internal(String),
}

pub const DB_HINT: &str = "give the database with --database-url postgres://USER:PASSWORD@HOST:PORT/DB, DATABASE_URL, [database] url in the install config, the PG* variables, or --env-file with the stack's .env (POSTGRES_*)";

impl From<DbError> for Error {
    fn from(e: DbError) -> Error {
        let message = e.to_string();
        match e {
            DbError::NoDatabase | DbError::BadDatabaseUrl { .. } => Error::new(Kind::Input, message).hint(DB_HINT),
            DbError::Unreachable { .. } => Error::new(Kind::External, message)
                .hint("is the stack running? `docker compose ps postgres` in the install directory; it publishes PostgreSQL on INTERNAL_BIND_IP:POSTGRES_PORT (127.0.0.1:5432 by default)")
                .hint(DB_HINT),
            DbError::Refused { .. } => Error::new(Kind::External, message)
                .hint("check the user, password and database name: the stack's are POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB in its .env")
                .hint(DB_HINT),
            DbError::NotMigrated { .. } => Error::new(Kind::External, message).hint(
                "the server creates its tables when it starts: wait until the `server` service is healthy and run again (`bkbundle install` waits by itself, up to [database] migrations_timeout_secs)",
            ),
            DbError::UnknownSchema { .. } => Error::new(Kind::Unsupported, message).hint(
                "this bkbundle knows BK-Lite's node_mgmt tables up to migration 0044 (2026-08): use the bkbundle that came with the server's bundle, or a newer bkbundle",
            ),
            DbError::Database { .. } => Error::new(Kind::External, message)
                .hint("run again with -v; if it persists, check the server's database with psql"),
            DbError::Internal(_) => Error::new(Kind::Internal, message),
        }
    }
}

/// Connect, telling "not there" from "refused".
pub async fn connect(t: &DbTarget) -> Result<Client, DbError> {
    let (client, connection) = t.config.connect(NoTls).await.map_err(|e| classify_connect(t, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("database connection ended: {e}");
        }
    });
    Ok(client)
}

fn classify_connect(t: &DbTarget, e: &tokio_postgres::Error) -> DbError {
    let user = t.config.get_user().unwrap_or("(no user)").to_string();
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            || *code == SqlState::INVALID_CATALOG_NAME
            || code.code().starts_with("28")
        {
            return DbError::Refused {
                db: t.name.clone(),
                user,
                message: db.message().to_string(),
            };
        }
    }
    let text = chain(e);
    if text.contains("password missing") || text.starts_with("authentication error") {
        return DbError::Refused {
            db: t.name.clone(),
            user,
            message: text,
        };
    }
    DbError::Unreachable {
        db: t.name.clone(),
        message: text,
    }
}

/// A failed statement, named by what it was doing (`what`), with the server's message.
pub fn db_err(t: &DbTarget, what: &str, e: tokio_postgres::Error) -> DbError {
    let message = match e.as_db_error() {
        Some(db) => format!(
            "{}{}",
            db.message(),
            db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        None => chain(&e),
    };
    DbError::Database {
        db: t.name.clone(),
        what: what.into(),
        message,
    }
}
