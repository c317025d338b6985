//! Key files on disk: the router's private key (created on first start, reused after) and
//! peers' preshared keys. The format is `wg genkey`'s: one base64 key and a newline.
//!
//! Secrets are refused when group or others have any permission on the file, like ssh does
//! with private keys: a key others could read is a key others may have copied. A new private
//! key file appears atomically with mode 0600 — it never exists half-written or with looser
//! permissions, and two routers starting at once cannot each write a different key.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tailsk8s_dataplane::key::{Key, KeyError};
use thiserror::Error;

/// Mode of a new key file: owner read/write only.
const KEY_FILE_MODE: u32 = 0o600;
/// Mode of a key directory the router creates.
const KEY_DIR_MODE: u32 = 0o700;
/// Permission bits that group or others must not have on a key file.
const GROUP_OTHER_BITS: u32 = 0o077;
/// A key file is 45 bytes; anything much larger is not a key file and is not read whole.
const MAX_KEY_FILE_LEN: u64 = 1024;

/// Why a key file could not be used. Causes are part of the message, not `source()` (shown
/// once by both `{}` and anyhow's `{:#}`).
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("{}: {context}: {error}", path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        error: io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}; must not be accessible by group or others (chmod 600 {path})",
        path = path.display()
    )]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The content is not one base64 key (the content itself is never shown: it is a secret).
    #[error("{}: not a WireGuard key: {error}", path.display())]
    BadContent { path: PathBuf, error: KeyError },
}

fn io_error<'a>(
    path: &'a Path,
    context: &'static str,
) -> impl FnOnce(io::Error) -> KeyFileError + 'a {
    move |error| KeyFileError::Io {
        path: path.to_path_buf(),
        context,
        error,
    }
}

/// The router's private key from `path`, clamped; when the file does not exist, a new key is
/// generated and stored there first (parent directories are created with mode 0700).
pub fn load_or_create_private_key(path: &Path) -> Result<Key, KeyFileError> {
    match load_key(path) {
        Ok(key) => return Ok(key.clamped()),
        Err(KeyFileError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = Key::generate_private();
    if store_new_key(path, &key)? {
        tracing::info!(
            "created private key file {} (public key {})",
            path.display(),
            key.public_key()
        );
        Ok(key)
    } else {
        // Another process created the file between our read and our write: use its key, so
        // both end up with the same one.
        load_key(path).map(Key::clamped)
    }
}

/// A key (preshared or private, unclamped) from an existing key file.
pub fn load_key(path: &Path) -> Result<Key, KeyFileError> {
    let file = File::open(path).map_err(io_error(path, "cannot open key file"))?;
    // Check the file we opened, not the path again: no window for a swap in between.
    let meta = file
        .metadata()
        .map_err(io_error(path, "cannot read key file metadata"))?;
    if !meta.is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_BITS != 0 {
        return Err(KeyFileError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::with_capacity(64);
    file.take(MAX_KEY_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(io_error(path, "cannot read key file"))?;
    let bad = |error| KeyFileError::BadContent {
        path: path.to_path_buf(),
        error,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad(KeyError::Base64))?;
    Key::from_base64(text).map_err(bad)
}

/// Writes `key` to a new file at `path`: to a temporary file first (O_EXCL, 0600, synced),
/// then linked to its name, which fails rather than replacing a file that appeared meanwhile.
/// Returns false when `path` already existed (nothing written).
fn store_new_key(path: &Path, key: &Key) -> Result<bool, KeyFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(KEY_DIR_MODE)
        .create(dir)
        .map_err(io_error(dir, "cannot create key directory"))?;

    let (tmp_path, mut tmp) = create_temp_file(dir, path)?;
    let written = tmp
        .write_all(format!("{}\n", key.to_base64()).as_bytes())
        .and_then(|()| tmp.sync_all());
    drop(tmp);
    let linked = written.and_then(|()| fs::hard_link(&tmp_path, path));
    // The temporary name goes in every case; the key lives on under `path` if linked.
    let _ = fs::remove_file(&tmp_path);
    match linked {
        Ok(()) => {
            // Make the new name durable too (best effort: some filesystems refuse to sync dirs).
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(KeyFileError::Io {
            path: path.to_path_buf(),
            context: "cannot write key file",
            error,
        }),
    }
}

/// A new, exclusively created temporary file next to `target`.
fn create_temp_file(dir: &Path, target: &Path) -> Result<(PathBuf, File), KeyFileError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let base = target
        .file_name()
        .map_or_else(|| "key".into(), |n| n.to_string_lossy().into_owned());
    let mut attempts = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = dir.join(format!(".{base}.tmp-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(KEY_FILE_MODE)
            .open(&tmp_path)
        {
            Ok(file) => return Ok((tmp_path, file)),
            // A leftover of a crashed process with our pid: try the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 16 => attempts += 1,
            Err(error) => {
                return Err(KeyFileError::Io {
                    path: tmp_path,
                    context: "cannot create temporary key file",
                    error,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_key_file(path: &Path, content: &str, mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn missing_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tailsk8s/private.key");
        let key = load_or_create_private_key(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(path.parent().unwrap()), 0o700);
        assert_eq!(mode_of(&dir.path().join("state")), 0o700);
        let content = fs::read_to_string(&path).unwrap();
        assert_eq!(content, format!("{}\n", key.to_base64()));
        assert_eq!(key, key.clamped());
        // Second start: the same key, and no temporary files left behind.
        assert_eq!(load_or_create_private_key(&path).unwrap(), key);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("private.key")]);
    }

    #[test]
    fn existing_key_is_read_and_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let unclamped = "/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        write_key_file(&path, &format!("{unclamped}\n"), 0o600);
        let key = load_or_create_private_key(&path).unwrap();
        assert_eq!(key, Key::from_base64(unclamped).unwrap().clamped());
        assert_ne!(key, Key::from_base64(unclamped).unwrap());
        // The file is left as it was.
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{unclamped}\n"));
        // A preshared key is used as written: no clamping.
        assert_eq!(
            load_key(&path).unwrap(),
            Key::from_base64(unclamped).unwrap()
        );
    }

    #[test]
    fn loose_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let key = Key::generate_private().to_base64();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o601, 0o610] {
            write_key_file(&path, &key, mode);
            let err = load_or_create_private_key(&path).unwrap_err();
            assert!(
                matches!(err, KeyFileError::LoosePermissions { mode: m, .. } if m == mode),
                "{err:?}"
            );
            let shown = err.to_string();
            assert!(shown.contains(&format!("mode {mode:04o}")), "{shown}");
            assert!(
                shown.contains(&format!("chmod 600 {}", path.display())),
                "{shown}"
            );
            assert!(matches!(
                load_key(&path),
                Err(KeyFileError::LoosePermissions { .. })
            ));
        }
        // Owner-only modes are fine, including read-only.
        write_key_file(&path, &key, 0o400);
        assert!(load_key(&path).is_ok());
    }

    #[test]
    fn garbage_content_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        for garbage in [
            "",
            "hunter2\n",
            &"A".repeat(5000),
            "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm!=",
        ] {
            write_key_file(&path, garbage, 0o600);
            let err = load_or_create_private_key(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::BadContent { .. }), "{err:?}");
            let secret = garbage.trim();
            assert!(
                secret.is_empty() || !err.to_string().contains(secret),
                "{err}"
            );
            // The bad file is not replaced by a new key.
            assert_eq!(fs::read_to_string(&path).unwrap(), garbage);
        }
        fs::write(&path, [0xff, 0xfe, 0xfd]).unwrap();
        assert!(matches!(
            load_key(&path),
            Err(KeyFileError::BadContent { .. })
        ));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        DirBuilder::new().mode(0o700).create(&sub).unwrap();
        assert!(matches!(load_key(&sub), Err(KeyFileError::NotAFile { .. })));
        assert!(matches!(
            load_or_create_private_key(&sub),
            Err(KeyFileError::NotAFile { .. })
        ));
        let missing = dir.path().join("missing.psk");
        let err = load_key(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.psk"), "{err}");
        // Loading a preshared key never creates one.
        assert!(!missing.exists());
    }

    #[test]
    fn a_file_that_appears_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let theirs = Key::generate_private();
        write_key_file(&path, &format!("{theirs}\n"), 0o600);
        assert!(!store_new_key(&path, &Key::generate_private()).unwrap());
        assert_eq!(load_key(&path).unwrap(), theirs);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn uncreatable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        let err = load_or_create_private_key(&blocker.join("private.key")).unwrap_err();
        assert!(matches!(err, KeyFileError::Io { .. }), "{err:?}");
    }
}
