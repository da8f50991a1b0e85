//! Writing a program's output files (`attend -o`, `attention-map --out`) so that a failed run
//! leaves nothing behind and nothing that is not a file is ever replaced.
//!
//! What each kind of path gets:
//! - a regular file, or a path that does not exist yet: the output goes to a temporary file
//!   beside it (same folder, so the rename cannot cross file systems), is flushed to disk, and
//!   is renamed over the path only once complete. On any error — the writer's, a full disk,
//!   the rename's, a panic — the temporary file is removed and the old file stays as it was.
//!   A file that is replaced keeps its permission bits.
//! - a symbolic link: followed (chains too, relative links from their own folder) and the
//!   target treated by these rules, so the link itself stays a link and the file it names is
//!   replaced in *its* folder; a dangling link creates its target.
//! - a FIFO or a character device (`/dev/stdout`, `/dev/null`, a pipe a reader waits on),
//!   and any existing path under `/dev` or `/proc` (`/dev/stdout` redirected to a file):
//!   written through in place — replacing `/dev/null` by a regular file is never right.
//! - a directory, a block device, a socket: refused with a message; nothing is written.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// How an output path is written, decided from what is there now.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Temporary file beside `target`, then a rename onto it. `target` is the path after
    /// following symbolic links.
    Replace { target: PathBuf },
    /// Written in place: a FIFO or character device (`node` is the path after links).
    Through { node: PathBuf },
}

/// Symbolic links followed before giving up (Linux's own limit for path resolution).
const MAX_LINKS: usize = 40;

/// Decides how `path` is written; refuses what must not be written at all.
pub fn plan(path: &Path) -> Result<Plan> {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    // `metadata` follows every link, the kernel's magic ones too (`/dev/stdout` →
    // `/proc/self/fd/1` → `pipe:[…]`), which no hand-made resolution can.
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let target = if is_link {
                dangling_target(path)?
            } else {
                path.to_path_buf()
            };
            return Ok(Plan::Replace { target });
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
    };
    let ft = meta.file_type();
    // Names under /dev and /proc stand for open files and devices (`/dev/stdout` redirected
    // to a file is a regular file): write into what they name, never rename over them.
    let system = path.starts_with("/dev") || path.starts_with("/proc");
    if ft.is_fifo() || ft.is_char_device() || (ft.is_file() && system) {
        return Ok(Plan::Through {
            node: path.to_path_buf(),
        });
    }
    if ft.is_file() {
        let target = if is_link {
            fs::canonicalize(path).with_context(|| format!("following {}", path.display()))?
        } else {
            path.to_path_buf()
        };
        return Ok(Plan::Replace { target });
    }
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    bail!(
        "{} is {what}; an output must be a file, a FIFO or a character device",
        path.display()
    )
}

/// The path a dangling link chain ends at (the file to create), each relative link read
/// from the folder that holds it.
fn dangling_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        if !fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Ok(p);
        }
        let to = fs::read_link(&p).with_context(|| format!("reading link {}", p.display()))?;
        p = match p.parent() {
            Some(dir) if to.is_relative() => dir.join(to),
            _ => to,
        };
    }
    bail!(
        "{}: more than {MAX_LINKS} symbolic links to follow",
        path.display()
    )
}

/// Removes the temporary file when dropped, unless it was renamed into place: every early
/// return and unwinding panic between creating it and the rename cleans up.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A fresh name beside `target`: hidden, naming the program's process, and ending in the
/// target's own extension, so that writers which choose a format by extension (the picture
/// backends) still see `.png` or `.svg`.
fn temp_name(target: &Path) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let mut name = OsString::from(".");
    name.push(target.file_name().unwrap_or_default());
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if let Some(ext) = target.extension() {
        name.push(".");
        name.push(ext);
    }
    target.with_file_name(name)
}

/// Writes the output `path` with `write`, which is handed the path to write to — a temporary
/// file or the node itself, per [`plan`] — and must have finished with it when it returns.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    match plan(path)? {
        Plan::Through { node } => {
            write(&node).with_context(|| format!("writing {}", path.display()))
        }
        Plan::Replace { target } => {
            if target.file_name().is_none() {
                bail!("{}: not a file name", path.display());
            }
            let tmp = temp_name(&target);
            // Claim the name first (create_new never follows or reuses an existing node), so
            // the guard below only ever removes a file this process created.
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut guard = TempGuard {
                path: tmp.clone(),
                armed: true,
            };
            drop(file);
            write(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            // A full disk may only show when the data reaches it: flush before renaming, so
            // that a complete-looking file is a complete file.
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("flushing {}", tmp.display()))?;
            if let Ok(old) = fs::metadata(&target) {
                fs::set_permissions(&tmp, old.permissions())
                    .with_context(|| format!("copying permissions to {}", tmp.display()))?;
            }
            fs::rename(&tmp, &target)
                .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
            guard.armed = false;
            Ok(())
        }
    }
}

/// Writes `bytes` to the output `path` (see [`write_with`]).
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |p| {
        // No `create` and no `truncate` on the node: a FIFO or device is written as it is;
        // the temporary file exists and is empty.
        let mut f = OpenOptions::new().write(true).open(p)?;
        f.write_all(bytes)?;
        f.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_new_file_and_an_existing_one_are_written_whole_and_keep_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_bytes(&p, b"first").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes(&p, b"second, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(names(dir.path()), vec!["out.bin"]);
    }

    /// The failure-injection seam: a writer that fails half-way (as on a full disk) leaves
    /// neither a temporary file nor a changed output behind.
    #[test]
    fn a_failing_writer_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.png");
        fs::write(&p, b"old").unwrap();
        let err = write_with(&p, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "png", "{}", tmp.display());
            assert_eq!(tmp.parent(), p.parent());
            fs::write(tmp, b"half of the")?;
            Err(std::io::Error::from_raw_os_error(28).into()) // ENOSPC
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("No space left"), "{err:#}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names(dir.path()), vec!["out.png"]);

        // A panic inside the writer cleans up as well.
        let r = std::panic::catch_unwind(|| {
            let _ = write_with(&p, |tmp| {
                fs::write(tmp, b"x").unwrap();
                panic!("writer panics");
            });
        });
        assert!(r.is_err());
        assert_eq!(names(dir.path()), vec!["out.png"]);
    }

    #[test]
    fn directories_are_refused_without_a_trace() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let err = write_bytes(&sub, b"x").unwrap_err();
        assert!(format!("{err:#}").contains("is a directory"), "{err:#}");
        assert_eq!(names(dir.path()), vec!["sub"]);
        assert!(names(&sub).is_empty());
        // A missing folder is an error naming the temporary it could not create.
        let err = write_bytes(&dir.path().join("no/such.bin"), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("creating"), "{err:#}");
    }

    #[test]
    fn a_symlink_stays_a_link_and_its_target_is_replaced_in_its_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("data");
        fs::create_dir(&real_dir).unwrap();
        fs::write(real_dir.join("real.bin"), b"old").unwrap();
        let link = dir.path().join("link.bin");
        symlink("data/real.bin", &link).unwrap(); // relative, from the link's folder
        let chain = dir.path().join("chain.bin");
        symlink(&link, &chain).unwrap();
        assert_eq!(
            plan(&chain).unwrap(),
            Plan::Replace {
                target: real_dir.join("real.bin")
            }
        );
        write_bytes(&chain, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(&chain)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(real_dir.join("real.bin")).unwrap(), b"new");
        assert_eq!(names(&real_dir), vec!["real.bin"]);
        // Dangling: the target is created.
        let dangling = dir.path().join("dangling.bin");
        symlink("data/made.bin", &dangling).unwrap();
        write_bytes(&dangling, b"made").unwrap();
        assert_eq!(fs::read(real_dir.join("made.bin")).unwrap(), b"made");
        // A loop is refused.
        let a = dir.path().join("a");
        symlink("b", &a).unwrap();
        symlink("a", dir.path().join("b")).unwrap();
        assert!(format!("{:#}", write_bytes(&a, b"x").unwrap_err()).contains("symbolic links"));
    }

    #[test]
    fn character_devices_are_written_through_and_report_their_errors() {
        write_bytes(Path::new("/dev/null"), b"nothing").unwrap();
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        // /dev/full: every write fails with ENOSPC, a real full-disk error.
        let err = write_bytes(Path::new("/dev/full"), &[0u8; 8192]).unwrap_err();
        assert!(format!("{err:#}").contains("No space left"), "{err:#}");
    }
}
