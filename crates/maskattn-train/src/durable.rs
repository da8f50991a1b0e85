//! Writing files so that a crash, a full disk or a failed write never leaves a half-written
//! file where a good one was: new data goes to a new name, is flushed to the disk (fsync),
//! and takes its place with one rename. A path that is not a regular file (a symbolic link,
//! a FIFO, a device) is never replaced: it is refused.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Fails if `path` exists and is not a regular file (a link is not followed).
pub fn refuse_special(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            let kind = if m.file_type().is_symlink() {
                "a symbolic link"
            } else if m.is_dir() {
                "a folder"
            } else {
                "a FIFO, socket or device"
            };
            bail!(
                "{}: not a regular file ({kind}); refusing to replace it",
                path.display()
            )
        }
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path`, which must not exist yet, and flushes it to the disk.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Flushes a folder's entries (new names, renames) to the disk. Folders cannot be opened
/// as files on Windows, whose renames need no such step.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing the folder {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The temporary name `path` is written under before it is renamed: hidden, in the same
/// folder (a rename does not cross file systems), with the same extension (the picture
/// writers choose their format by it).
pub fn temp_name(path: &Path) -> std::path::PathBuf {
    let stem = path
        .file_stem()
        .map_or("out".into(), |s| s.to_string_lossy());
    let name = match path.extension() {
        Some(ext) => format!(".{stem}.tmp.{}", ext.to_string_lossy()),
        None => format!(".{stem}.tmp"),
    };
    path.with_file_name(name)
}

/// Replaces (or creates) the regular file `path` with what `write` puts into a temporary
/// file beside it: flushed, then renamed over `path`. On any error `path` is untouched and
/// the temporary file is gone. The caller flushes the folder ([`sync_dir`]) when the new
/// name must survive a power cut.
pub fn replace_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    refuse_special(path)?;
    let tmp = temp_name(path);
    // A leftover of a crash (or a link planted there) is removed, never written through.
    let _ = fs::remove_file(&tmp);
    let done = write(&tmp)
        .and_then(|()| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing {}", tmp.display()))
        })
        .and_then(|()| {
            fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        fs::write(&p, "old").unwrap();
        let r = replace_with(&p, |tmp| {
            fs::write(tmp, "half")?;
            bail!("disk full")
        });
        assert!(r.is_err());
        assert_eq!(fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        replace_with(&p, |tmp| Ok(fs::write(tmp, "new")?)).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_new(&p, b"x").is_err(), "write_new never overwrites");
    }

    /// A link, a FIFO or a folder where a file would go is refused and left as it is.
    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "keep").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let fifo = dir.path().join("fifo.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let sub = dir.path().join("sub.json");
        fs::create_dir(&sub).unwrap();
        let mut paths = vec![(link, "a symbolic link"), (sub, "a folder")];
        if made.is_ok_and(|s| s.success()) {
            paths.push((fifo, "a FIFO"));
        }
        for (p, kind) in paths {
            let e = replace_with(&p, |tmp| Ok(fs::write(tmp, "new")?)).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("not a regular file") && e.contains(kind), "{e}");
            assert!(!fs::symlink_metadata(&p).unwrap().is_file());
            assert!(!temp_name(&p).exists());
        }
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
    }
}
