//! One run per store at a time.
//!
//! The lock is `flock` on `.offsite/lock`, so the kernel releases it when
//! its holder exits, however it exits. The file also says who holds it (pid,
//! host, start time, run), so a second run can name the holder, and a run
//! that finds the note of a holder that is gone knows it is taking over
//! from a killed process.

use std::io::{Read, Seek, Write};

use cap_std::fs::{Dir, OpenOptions};
use rustix::fs::{FlockOperation, flock};
use serde::{Deserialize, Serialize};

/// Who holds (or held) a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub hostname: String,
    /// RFC 3339.
    pub started: String,
    pub site: String,
    pub run_id: String,
}

impl From<&super::manifest::RunHeader> for Holder {
    /// The run of `header`, as the holder of a lock.
    fn from(header: &super::manifest::RunHeader) -> Holder {
        Holder {
            pid: header.pid,
            hostname: header.hostname.clone(),
            started: header.started.clone(),
            site: header.site.clone(),
            run_id: header.run_id.clone(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} (site {}, run {}, started {})",
            self.pid, self.hostname, self.site, self.run_id, self.started
        )
    }
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; its note, if it could be read.
    Held(Option<Holder>),
    Io(std::io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held(Some(h)) => write!(f, "another run holds the store's lock: {h}"),
            LockError::Held(None) => write!(f, "another run holds the store's lock (its holder is not recorded yet)"),
            LockError::Io(e) => write!(f, "cannot take the store's lock: {e}"),
        }
    }
}

impl std::error::Error for LockError {}

/// A held lock. Dropping it clears the note and releases the lock.
#[derive(Debug)]
pub struct Lock {
    file: std::fs::File,
}

/// The lock file's name inside the store's `.offsite` directory.
pub const LOCK_FILE: &str = "lock";

/// Takes the lock in `meta` (the store's `.offsite`) without waiting.
/// Returns the lock and, when the previous holder died holding it, that
/// holder's note.
pub fn acquire(meta: &Dir, me: &Holder) -> Result<(Lock, Option<Holder>), LockError> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true);
    {
        use cap_std::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = meta.open_with(LOCK_FILE, &options).map_err(LockError::Io)?.into_std();
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(LockError::Held(read_note(&mut file))),
        Err(e) => return Err(LockError::Io(e.into())),
    }
    // A note left behind means its writer never released the lock cleanly:
    // it was killed or crashed (the kernel dropped the flock).
    let stale = read_note(&mut file);
    let note = serde_json::to_vec(me).expect("a holder serialises");
    (|| {
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(&note)?;
        file.sync_data()
    })()
    .map_err(LockError::Io)?;
    Ok((Lock { file }, stale))
}

/// The current holder's note, for `status` and `verify` (which never take
/// the lock). `None` when nobody holds it.
pub fn holder(meta: &Dir) -> Option<Holder> {
    let mut file = meta.open(LOCK_FILE).ok()?.into_std();
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = flock(&file, FlockOperation::Unlock);
            None
        }
        Err(_) => read_note(&mut file),
    }
}

/// The note of a holder that died holding the lock (killed or crashed: the
/// kernel released its flock, and the note it clears on a clean exit is
/// still there), for `status`. `None` when the lock is held or was left
/// cleanly.
pub fn died(meta: &Dir) -> Option<Holder> {
    let mut file = meta.open(LOCK_FILE).ok()?.into_std();
    flock(&file, FlockOperation::NonBlockingLockShared).ok()?;
    let note = read_note(&mut file);
    let _ = flock(&file, FlockOperation::Unlock);
    note
}

fn read_note(file: &mut std::fs::File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Cleared before release, so a note only survives a holder that died.
        let _ = self.file.set_len(0);
        let _ = self.file.sync_data();
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(pid: u32) -> Holder {
        Holder {
            pid,
            hostname: "h".into(),
            started: "2026-11-26T23:00:00+00:00".into(),
            site: "s".into(),
            run_id: format!("r{pid}"),
        }
    }

    #[test]
    fn a_second_taker_is_refused_and_told_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
        let (lock, stale) = acquire(&meta, &holder(1)).unwrap();
        assert!(stale.is_none());
        // flock locks belong to the open file description: a second open in
        // the same process conflicts just as another process would.
        match acquire(&meta, &holder(2)) {
            Err(LockError::Held(Some(h))) => assert_eq!(h, holder(1)),
            other => panic!("expected Held, got {other:?}"),
        }
        assert_eq!(super::holder(&meta), Some(holder(1)));
        drop(lock);
        assert_eq!(super::holder(&meta), None);
        let (_lock, stale) = acquire(&meta, &holder(3)).unwrap();
        assert!(stale.is_none(), "a clean release leaves no note");
    }

    #[test]
    fn a_note_left_by_a_dead_holder_is_reported_as_stale() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), serde_json::to_vec(&holder(99)).unwrap()).unwrap();
        let meta = Dir::open_ambient_dir(dir.path(), cap_std::ambient_authority()).unwrap();
        let (_lock, stale) = acquire(&meta, &holder(1)).unwrap();
        assert_eq!(stale, Some(holder(99)));
    }
}
