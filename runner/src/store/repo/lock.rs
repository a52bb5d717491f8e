//! restic's lock files, so a `restic prune` by hand and an Offsite run
//! never work on one repository at once.
//!
//! restic writes `locks/ID`: a small JSON file (time, exclusive, host,
//! user, pid), encrypted with the repository's master key and named by
//! the SHA-256 of what is stored. A backup takes a shared lock; `prune`,
//! `check` and `forget` an exclusive one, which nobody else may hold at
//! the same time. A lock is stale after 30 minutes without renewal, or at
//! once if it names a process on this host that is gone; restic renews
//! its locks every 5 minutes. Offsite does the same, and adds `run` and
//! `site` to its locks (restic ignores fields it does not know), so that
//! two Offsite runs of one site still take turns, as with every store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes256ctr_poly1305aes::Aes256CtrPoly1305Aes;
use aes256ctr_poly1305aes::aead::Aead;
use rustic_core::Id;
use rustic_core::repofile::MasterKey;
use sha2::{Digest, Sha256};

use super::Storage;

/// A lock not renewed for this long is stale (restic's `staleTimeout`).
pub const STALE: Duration = Duration::from_secs(30 * 60);
/// How often a held lock is renewed (restic's refresh interval).
const RENEW: Duration = Duration::from_secs(5 * 60);

/// The lock file's JSON: restic's fields, then Offsite's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LockFile {
    pub time: String,
    pub exclusive: bool,
    pub hostname: String,
    pub username: String,
    pub pid: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
    /// The Offsite run (or command) holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsite_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsite_site: Option<String>,
    /// Set for a lock file that could not be read: its name.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl LockFile {
    fn age(&self) -> Option<Duration> {
        let at = chrono::DateTime::parse_from_rfc3339(&self.time).ok()?;
        (chrono::Utc::now() - at.with_timezone(&chrono::Utc)).to_std().ok().or(Some(Duration::ZERO))
    }

    /// Stale as restic judges it: old, or its process on this host gone.
    pub fn is_stale(&self) -> bool {
        if self.age().is_none_or(|age| age > STALE) {
            return true;
        }
        let pid = i32::try_from(self.pid).ok().and_then(rustix::process::Pid::from_raw);
        match pid {
            Some(pid) if self.hostname == crate::store::run::hostname() => {
                rustix::process::test_kill_process(pid).is_err_and(|e| e == rustix::io::Errno::SRCH)
            }
            _ => false,
        }
    }

    /// For messages: who holds it.
    pub fn describe(&self) -> String {
        if let Some(name) = &self.unreadable {
            return format!(
                "{name} is a lock file that cannot be read (damaged?), written {}; it is taken as an exclusive \
                 lock until it is 30 minutes old, then ignored (restic unlock --remove-all removes it)",
                self.time
            );
        }
        let who = match (&self.offsite_run, &self.offsite_site) {
            (Some(run), Some(site)) => format!("offsite run {run} of site {site}"),
            (Some(run), None) => format!("offsite {run}"),
            _ => "restic".to_string(),
        };
        let kind = if self.exclusive { "an exclusive lock" } else { "a lock" };
        crate::text::escape(&format!(
            "{who} (pid {} on {} as {}) holds {kind} since {}",
            self.pid, self.hostname, self.username, self.time
        ))
        .to_string()
    }
}

/// The master key as restic's AEAD takes it: AES key, then Poly1305's k and r.
fn key_bytes(key: &MasterKey) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(&key.encrypt);
    bytes.extend_from_slice(&key.mac.k);
    bytes.extend_from_slice(&key.mac.r);
    bytes
}

fn cipher(key: &[u8]) -> Option<Aes256CtrPoly1305Aes> {
    (key.len() == 64).then(|| Aes256CtrPoly1305Aes::new(aes256ctr_poly1305aes::Key::from_slice(key)))
}

/// Encrypts `plain` as restic stores an unpacked file: nonce, ciphertext, MAC.
pub fn encrypt(key: &MasterKey, plain: &[u8]) -> std::io::Result<Vec<u8>> {
    seal(&key_bytes(key), plain)
}

/// [`encrypt`] with the key's 64 bytes (AES key, k, r).
pub fn seal(key: &[u8], plain: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(format!("no random nonce: {e}")))?;
    let sealed = cipher(key)
        .ok_or_else(|| std::io::Error::other("the repository's key has the wrong length"))?
        .encrypt((&nonce).into(), plain)
        .map_err(|_| std::io::Error::other("cannot encrypt"))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Decrypts an unpacked file; `None` if its MAC does not hold.
pub fn decrypt(key: &MasterKey, data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 32 {
        return None;
    }
    cipher(&key_bytes(key))?.decrypt(data[..16].into(), &data[16..]).ok()
}

/// Every lock file, with its id.
pub fn locks(repo: &dyn Storage, key: &MasterKey) -> std::io::Result<Vec<(Id, LockFile)>> {
    let mut found = Vec::new();
    for name in repo.names(LOCKS)? {
        let Some(id) = name.parse::<Id>().ok().filter(|_| name.len() == 64) else { continue };
        // Bounded: a lock is a few hundred bytes.
        let Some((data, modified)) = repo.read_small(LOCKS, &name, 64 << 10)? else { continue };
        match read_lock(key, &data) {
            Some(lock) => found.push((id, lock)),
            // Damaged, or not a lock: taken as an exclusive lock, stale
            // by its age as any other, so that nothing is run beside
            // what cannot be read.
            None => {
                let time =
                    modified.map(|t| chrono::DateTime::<chrono::Local>::from(t).to_rfc3339()).unwrap_or_default();
                let lock = LockFile {
                    time,
                    exclusive: true,
                    hostname: String::new(),
                    username: String::new(),
                    pid: 0,
                    uid: 0,
                    gid: 0,
                    offsite_run: None,
                    offsite_site: None,
                    unreadable: Some(format!("{LOCKS}/{name}")),
                };
                found.push((id, lock));
            }
        }
    }
    Ok(found)
}

/// A lock file's JSON, if it decrypts and parses (bounded: a lock is a
/// few hundred bytes).
fn read_lock(key: &MasterKey, data: &[u8]) -> Option<LockFile> {
    let plain = decrypt(key, data)?;
    let json = match plain.first() {
        Some(b'{') => plain,
        // Repository version 2: a version byte, then zstd (restic writes
        // its locks so).
        Some(2) => zstd::bulk::decompress(&plain[1..], 64 << 10).ok()?,
        _ => return None,
    };
    serde_json::from_slice(&json).ok()
}

/// The directory of lock files.
const LOCKS: &str = "locks";

/// Writes `lock`, returning its id.
fn write(repo: &dyn Storage, key: &MasterKey, lock: &LockFile) -> std::io::Result<Id> {
    let data = encrypt(key, &serde_json::to_vec(lock).expect("a lock serialises"))?;
    let id = hex::encode(Sha256::digest(&data)).parse::<Id>().map_err(|e| std::io::Error::other(e.to_string()))?;
    repo.write_whole(LOCKS, id.to_hex().as_str(), &data)?;
    Ok(id)
}

fn remove(repo: &dyn Storage, id: &Id) -> std::io::Result<()> {
    match repo.remove_file(LOCKS, id.to_hex().as_str()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum Refused {
    Busy(String),
    Failed(std::io::Error),
}

/// A lock held in a repository: renewed every 5 minutes by a thread,
/// removed when released or dropped.
pub struct RepoLock {
    state: Arc<Shared>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    repo: Arc<dyn Storage>,
    key: MasterKey,
    lock: LockFile,
    id: Mutex<Option<Id>>,
    stop: (Mutex<bool>, std::sync::Condvar),
    /// A renewal failed: the lock may have been judged stale by others.
    lost: AtomicBool,
}

impl RepoLock {
    /// Takes a lock: exclusive (prune, forget) or shared (a run), refused
    /// while another holds an exclusive one, or any one if this is
    /// exclusive; a shared Offsite lock of the same site also refuses a
    /// run. Stale locks are ignored; those an Offsite run left (killed, or
    /// cut off from the storage before it could remove its lock) are
    /// removed, as `restic unlock` would: restic's exclusive commands
    /// refuse to start while any lock file is there, stale or not.
    pub fn take(
        repo: &Arc<dyn Storage>,
        key: &MasterKey,
        exclusive: bool,
        run: &str,
        site: Option<&str>,
    ) -> Result<RepoLock, Refused> {
        let conflicts = |mine: Option<&Id>| -> Result<(), Refused> {
            for (id, other) in locks(&**repo, key).map_err(Refused::Failed)? {
                // Before taking: a stale lock an Offsite run left goes.
                if mine.is_none() && other.is_stale() && other.offsite_run.is_some() && remove(&**repo, &id).is_ok() {
                    log::warn!(target: "offsite::store", "removed a stale repository lock: {}", other.describe());
                }
                if Some(&id) == mine || other.is_stale() {
                    continue;
                }
                // This process's own lock (the run whose retention takes
                // an exclusive one) is no conflict.
                let ours = other.hostname == crate::store::run::hostname()
                    && other.pid == i64::from(std::process::id())
                    && other.offsite_run.is_some();
                if ours {
                    continue;
                }
                let same_site = other.offsite_site.is_some() && other.offsite_site.as_deref() == site;
                if exclusive || other.exclusive || same_site {
                    return Err(Refused::Busy(other.describe()));
                }
            }
            Ok(())
        };
        conflicts(None)?;
        let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
        let lock = LockFile {
            time: chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, false),
            exclusive,
            hostname: crate::store::run::hostname(),
            username: std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
            pid: i64::from(std::process::id()),
            uid,
            gid,
            offsite_run: Some(run.to_string()),
            offsite_site: site.map(str::to_string),
            unreadable: None,
        };
        let id = write(&**repo, key, &lock).map_err(Refused::Failed)?;
        // Two takers at once both see the other now, and both give way.
        if let Err(e) = conflicts(Some(&id)) {
            let _ = remove(&**repo, &id);
            return Err(e);
        }
        let state = Arc::new(Shared {
            repo: Arc::clone(repo),
            key: key.clone(),
            lock,
            id: Mutex::new(Some(id)),
            stop: (Mutex::new(false), std::sync::Condvar::new()),
            lost: AtomicBool::new(false),
        });
        let renewer = {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("offsite-repo-lock".into())
                .spawn(move || renew(&state))
                .map_err(Refused::Failed)?
        };
        Ok(RepoLock { state, renewer: Some(renewer) })
    }

    /// Whether the lock is still ours: its file is there and every
    /// renewal worked.
    pub fn confirm(&self) -> Result<(), String> {
        if self.state.lost.load(Ordering::SeqCst) {
            return Err("the repository lock could not be renewed, so others may have taken it as stale".into());
        }
        let id = self.state.id.lock().unwrap_or_else(|e| e.into_inner());
        match id.as_ref() {
            Some(id) if self.state.repo.names(LOCKS).is_ok_and(|n| n.iter().any(|n| n == id.to_hex().as_str())) => {
                Ok(())
            }
            _ => Err("the repository lock was removed (restic unlock?)".into()),
        }
    }

    /// Removes the lock file.
    pub fn release(mut self) -> Result<(), String> {
        self.stop_renewing();
        let id = self.state.id.lock().unwrap_or_else(|e| e.into_inner()).take();
        match id {
            Some(id) => remove(&*self.state.repo, &id).map_err(|e| format!("cannot remove the repository lock: {e}")),
            None => Ok(()),
        }
    }

    fn stop_renewing(&mut self) {
        *self.state.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.state.stop.1.notify_all();
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        self.stop_renewing();
        if let Some(id) = self.state.id.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = remove(&*self.state.repo, &id);
        }
    }
}

/// Every [`RENEW`], writes the lock again with the time now, then removes
/// the old file (restic's refresh).
fn renew(state: &Shared) {
    while !stopped_within(&state.stop, RENEW) {
        let mut lock = state.lock.clone();
        lock.time = chrono::Local::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, false);
        match write(&*state.repo, &state.key, &lock) {
            Ok(new) => {
                let old = state.id.lock().unwrap_or_else(|e| e.into_inner()).replace(new);
                if let Some(old) = old {
                    let _ = remove(&*state.repo, &old);
                }
            }
            Err(e) => {
                log::warn!(target: "offsite::store", "cannot renew the repository lock: {e}");
                state.lost.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Waits up to `period` for `stop` to be set, and says whether it is. A
/// stop set before the wait begins (the lock released right after it was
/// taken, before its renewer ran) ends it at once.
fn stopped_within(stop: &(Mutex<bool>, std::sync::Condvar), period: Duration) -> bool {
    let (flag, wake) = stop;
    let stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
    let (stopped, _) = wake.wait_timeout_while(stopped, period, |s| !*s).unwrap_or_else(|e| e.into_inner());
    *stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_before_the_renewer_waits_ends_its_wait_at_once() {
        let stop = (Mutex::new(true), std::sync::Condvar::new());
        let started = std::time::Instant::now();
        assert!(stopped_within(&stop, Duration::from_secs(60)));
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());

        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        assert!(!stopped_within(&stop, Duration::from_millis(10)), "nothing stopped it");
        let waiter = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || stopped_within(&stop, Duration::from_secs(60))
        });
        *stop.0.lock().unwrap() = true;
        stop.1.notify_all();
        assert!(waiter.join().unwrap());
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
    }
}
