//! Unpacking an archive beneath a directory, where no entry can land
//! outside it: names that are absolute or climb with `..` refuse the
//! archive, every path is opened through `cap_std` (which never follows a
//! link out of the directory, so a symlink planted by an earlier entry
//! cannot carry a later one out), and hard links must point inside.
//! Device nodes and FIFOs are left out, setuid, setgid and sticky bits
//! dropped and ownership left to the user who restores, unless root asks
//! for them ([`Special`]). Entries go into a staging directory first; see
//! `merge`.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use cap_std::fs::PermissionsExt;
use cap_std::fs::{Dir, OpenOptions, Permissions};

use crate::verify::tar_walk::Entry;

/// What root may ask to keep: `same_owner` gives each entry the archive's
/// numeric owner and group (`tar --same-owner`); `preserve_special` keeps
/// setuid, setgid and sticky bits and makes device nodes and FIFOs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Special {
    pub same_owner: bool,
    pub preserve_special: bool,
}

/// Names for a report: the first few, and how many more (an archive or
/// a manifest chooses how many there are).
#[derive(Debug, Default)]
pub struct Names {
    shown: Vec<String>,
    more: u64,
}

impl Names {
    const SHOWN: usize = 20;

    /// Adds an already escaped name.
    pub fn push(&mut self, name: String) {
        if self.shown.len() < Self::SHOWN {
            self.shown.push(name);
        } else {
            self.more += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.shown.is_empty()
    }

    pub fn len(&self) -> u64 {
        self.shown.len() as u64 + self.more
    }
}

impl std::fmt::Display for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown.join(", "))?;
        if self.more > 0 {
            write!(f, " and {} more", self.more)?;
        }
        Ok(())
    }
}

/// What an extraction did, for its report.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    /// Devices, FIFOs and sparse entries left out.
    pub left_out: Names,
    /// Entries whose setuid, setgid or sticky bit was dropped.
    pub stripped: u64,
    /// Entries not among the paths asked for.
    pub not_asked: u64,
}

/// `name` as a path beneath the target, or why the archive is refused.
fn inside(name: &str) -> Result<Option<PathBuf>, String> {
    let trimmed = name.trim_start_matches("./");
    if trimmed.is_empty() || trimmed == "." {
        return Ok(None);
    }
    let path = Path::new(trimmed);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{}: an absolute name; the archive is refused", crate::text::escape(name)));
            }
            Component::ParentDir => {
                return Err(format!(
                    "{}: a name that climbs out with ..; the archive is refused",
                    crate::text::escape(name)
                ));
            }
        }
    }
    Ok(Some(out))
}

/// Unpacks one entry into `dir` (the staging directory), data from `data`.
pub fn entry(
    dir: &Dir,
    e: &Entry,
    data: &mut dyn Read,
    paths: &[String],
    special: Special,
    done: &mut Extracted,
    dirs: &mut Vec<(PathBuf, u32, i64)>,
) -> Result<(), String> {
    let Some(rel) = inside(&e.name)? else { return Ok(()) };
    let shown = crate::text::escape(&e.name).into_owned();
    let asked = paths.is_empty()
        || paths.iter().any(|p| {
            let p = p.trim_start_matches("./").trim_end_matches('/');
            rel == Path::new(p) || rel.starts_with(p)
        });
    if !asked {
        done.not_asked += 1;
        return Ok(());
    }
    let failed = |what: &str, err: io::Error| format!("{shown}: {what}: {err}");
    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A directory of it that an earlier entry made a link: refused,
        // wherever the link points.
        for ancestor in parent.ancestors().filter(|a| !a.as_os_str().is_empty()) {
            if dir.symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(format!(
                    "{shown}: goes through {}, a link an earlier entry made; the archive is refused",
                    crate::text::escape(&ancestor.to_string_lossy())
                ));
            }
        }
        dir.create_dir_all(parent).map_err(|err| failed("cannot create its directory", err))?;
    }
    if e.mode & 0o7000 != 0 && !special.preserve_special {
        done.stripped += 1;
    }
    let mode = e.mode & if special.preserve_special { 0o7777 } else { 0o777 };
    // The owner goes first: chown clears setuid and setgid bits.
    let own = |rel: &Path| -> Result<(), String> {
        if !special.same_owner {
            return Ok(());
        }
        let ids = (rustix::fs::Uid::from_raw(e.uid), rustix::fs::Gid::from_raw(e.gid));
        rustix::fs::chownat(dir, rel, Some(ids.0), Some(ids.1), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| failed("cannot set its owner", err.into()))
    };
    // Whatever an earlier entry put at this name goes first: nothing is
    // ever written through it.
    let clear = |rel: &Path| match dir.symlink_metadata(rel) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => dir.remove_file(rel),
        Err(_) => Ok(()),
    };
    match e.kind {
        b'5' => {
            match dir.symlink_metadata(&rel) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    dir.remove_file(&rel).map_err(|err| failed("cannot replace", err))?;
                    dir.create_dir(&rel).map_err(|err| failed("cannot create", err))?;
                }
                Err(_) => dir.create_dir(&rel).map_err(|err| failed("cannot create", err))?,
            }
            own(&rel)?;
            dirs.push((rel, mode, e.mtime));
            done.dirs += 1;
        }
        b'0' | b'\0' | b'7' => {
            clear(&rel).map_err(|err| failed("cannot replace", err))?;
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            let file = dir.open_with(&rel, &options).map_err(|err| failed("cannot create", err))?;
            let mut file = file.into_std();
            io::copy(data, &mut file).map_err(|err| failed("cannot write", err))?;
            own(&rel)?;
            if let Some(t) = chrono::DateTime::from_timestamp(e.mtime, 0) {
                let _ = file.set_modified(t.into());
            }
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(|err| failed("cannot set its mode", err))?;
            done.files += 1;
        }
        b'2' => {
            let target = e.link.clone().unwrap_or_default();
            clear(&rel).map_err(|err| failed("cannot replace", err))?;
            dir.symlink_contents(&target, &rel).map_err(|err| failed("cannot create the link", err))?;
            set_mtime(dir, &rel, e.mtime);
            own(&rel)?;
            done.links += 1;
        }
        b'1' => {
            let target = e.link.clone().unwrap_or_default();
            let Some(target) = inside(&target)? else {
                return Err(format!("{shown}: a hard link to nothing"));
            };
            clear(&rel).map_err(|err| failed("cannot replace", err))?;
            dir.hard_link(&target, dir, &rel)
                .map_err(|err| failed("cannot link (to a file of the archive only)", err))?;
            done.links += 1;
        }
        b'3' | b'4' | b'6' if special.preserve_special => {
            use rustix::fs::FileType;
            let kind = match e.kind {
                b'3' => FileType::CharacterDevice,
                b'4' => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            clear(&rel).map_err(|err| failed("cannot replace", err))?;
            let device = rustix::fs::makedev(e.device.0, e.device.1);
            rustix::fs::mknodat(dir, &rel, kind, rustix::fs::Mode::from_raw_mode(mode), device)
                .map_err(|err| failed("cannot make the node", err.into()))?;
            own(&rel)?;
            dir.set_permissions(&rel, Permissions::from_mode(mode))
                .map_err(|err| failed("cannot set its mode", err))?;
            set_mtime(dir, &rel, e.mtime);
            done.files += 1;
        }
        _ => done.left_out.push(shown),
    }
    Ok(())
}

/// Gives `rel` (not following a link) the modification time `mtime`, as
/// GNU tar does; a time that cannot be set is no reason to fail.
fn set_mtime(dir: &Dir, rel: &Path, mtime: i64) {
    use cap_fs_ext::{DirExt, SystemTimeSpec};
    if let Some(t) = chrono::DateTime::from_timestamp(mtime, 0) {
        let t = cap_std::time::SystemTime::from_std(t.into());
        let _ = dir.set_symlink_times(rel, None, Some(SystemTimeSpec::Absolute(t)));
    }
}

/// Gives directories their modes and modification times once nothing
/// more goes into them (deepest first, as a directory may not allow
/// writing). A user other than root keeps write access to them, so that
/// they can be moved into place; root gets the archive's modes exactly.
pub fn finish_dirs(dir: &Dir, dirs: &[(PathBuf, u32, i64)]) -> Result<(), String> {
    let keep_access = if rustix::process::geteuid().is_root() { 0 } else { 0o700 };
    for (rel, mode, mtime) in dirs.iter().rev() {
        set_mtime(dir, rel, *mtime);
        dir.set_permissions(rel, Permissions::from_mode(*mode | keep_access))
            .map_err(|e| format!("{}: cannot set its mode: {e}", rel.display()))?;
    }
    Ok(())
}

/// Moves what the staging directory holds into the target: each name the
/// target lacks by one rename; into a directory both have, entry by
/// entry; over an existing file only with `overwrite`. Returns what was
/// left where it was.
pub fn merge(staging: &Dir, target: &Dir, rel: &Path, overwrite: bool, kept: &mut Names) -> io::Result<()> {
    let here = if rel.as_os_str().is_empty() { staging.try_clone()? } else { staging.open_dir(rel)? };
    for item in here.entries()? {
        let item = item?;
        let path = rel.join(item.file_name());
        let staged = staging.symlink_metadata(&path)?;
        match target.symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => staging.rename(&path, target, &path)?,
            Err(e) => return Err(e),
            Ok(there) if there.is_dir() && staged.is_dir() => merge(staging, target, &path, overwrite, kept)?,
            Ok(there) if overwrite && !there.is_dir() && !staged.is_dir() => staging.rename(&path, target, &path)?,
            Ok(_) => kept.push(crate::text::escape(&path.to_string_lossy()).into_owned()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_directory_refuse_the_archive() {
        assert_eq!(inside("./www/index.html").unwrap(), Some(PathBuf::from("www/index.html")));
        assert_eq!(inside("./").unwrap(), None);
        assert!(inside("/etc/passwd").unwrap_err().contains("absolute"));
        assert!(inside("www/../../etc/passwd").unwrap_err().contains(".."));
    }
}
