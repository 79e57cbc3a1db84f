//! One training run per run directory: an OS file lock on `RUN/.lock`, held for the whole run
//! and released by the kernel when the process ends, even by a crash or `kill -9`. Two runs
//! writing the same directory would interleave metrics, configs and checkpoints and leave a
//! run that resumes into NaN.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A held lock on a run directory; dropping it releases the lock.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
}

impl RunLock {
    /// Takes the lock on `dir` (created if missing), or fails naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if let Err(e) = file.try_lock() {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or(String::new(), |pid| format!(" (pid {pid})"));
            return match e {
                std::fs::TryLockError::WouldBlock => Err(Error::Training(format!(
                    "{} is in use by another afinar run{holder}; wait for it to finish or give \
                     another --out",
                    dir.display()
                ))),
                std::fs::TryLockError::Error(e) => Err(Error::io(&path, e)),
            };
        }
        // The holder's pid, for the message a second run prints.
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::RunLock;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another afinar run"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
