//! A restic repository in a bucket (`restic:s3://BUCKET/PREFIX`): restic's
//! layout as keys beneath the prefix, as restic's own S3 backend writes it
//! (`config`, `keys/ID`, `locks/ID`, `snapshots/ID`, `index/ID`,
//! `data/XX/ID`). A put is whole or absent, so nothing is staged. Every
//! request is bounded by the site's call timeout (see `s3::Bucket`).

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use rustic_core::{ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend};

use super::Storage;
use crate::s3::{Bucket, LIST_MAX, Meta, Put, S3Error};

/// The largest whole file read at once (an index or a pack).
const READ_MAX: u64 = 256 << 20;

#[derive(Clone)]
pub struct BucketRepo {
    bucket: Arc<Bucket>,
}

impl std::fmt::Debug for BucketRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BucketRepo({})", self.bucket.location())
    }
}

impl BucketRepo {
    pub fn new(bucket: Arc<Bucket>) -> BucketRepo {
        BucketRepo { bucket }
    }

    fn rel(tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => "config".to_string(),
            FileType::Pack => format!("data/{}/{}", &hex.as_str()[..2], hex.as_str()),
            _ => format!("{}/{}", tpe.dirname(), hex.as_str()),
        }
    }
}

fn error(what: &'static str, rel: &str, e: S3Error) -> Box<RusticError> {
    RusticError::with_source(ErrorKind::Backend, what, e).attach_context("path", rel.to_string())
}

fn io_of(e: S3Error) -> io::Error {
    match e {
        S3Error::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        e => io::Error::other(e.to_string()),
    }
}

impl ReadBackend for BucketRepo {
    fn location(&self) -> String {
        self.bucket.location().to_string()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        let dir = match tpe {
            FileType::Config => {
                return Ok(self.exists().ok().filter(|e| *e).map(|_| (Id::default(), 0)).into_iter().collect());
            }
            _ => tpe.dirname(),
        };
        let listed = listed_in_parts(dir, &|d: &str| self.bucket.list_at_most(d))
            .map_err(|e| error("Cannot list `{path}`", dir, e))?;
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                let name = m.rel.rsplit('/').next()?;
                let id = name.parse::<Id>().ok().filter(|_| name.len() == 64)?;
                Some((id, u32::try_from(m.size).unwrap_or(u32::MAX)))
            })
            .collect())
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let rel = Self::rel(tpe, id);
        let mut reader = match self.bucket.reader(&rel) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(RusticError::new(ErrorKind::Backend, "No such file `{path}`").attach_context("path", rel));
            }
            Err(e) => return Err(error("Cannot read `{path}`", &rel, e)),
        };
        if reader.size() > READ_MAX {
            return Err(RusticError::new(ErrorKind::Backend, "`{path}` is larger than a repository file may be")
                .attach_context("path", rel));
        }
        let size = reader.size();
        let mut out = Vec::with_capacity(size as usize);
        // Never more than the server said it would send.
        io::Read::read_to_end(&mut io::Read::take(&mut reader, size + 1), &mut out).map_err(|e| {
            RusticError::with_source(ErrorKind::Backend, "Cannot read `{path}`", e).attach_context("path", rel.clone())
        })?;
        if out.len() as u64 != size {
            return Err(RusticError::new(ErrorKind::Backend, "`{path}` is not the size the server said it is")
                .attach_context("path", rel));
        }
        Ok(out.into())
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        let rel = Self::rel(tpe, id);
        self.bucket
            .get_range(&rel, offset.into(), length.into())
            .map_err(|e| error("Cannot read part of `{path}`", &rel, e))
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        Self::rel(tpe, id)
    }
}

impl WriteBackend for BucketRepo {
    fn create(&self) -> RusticResult<()> {
        Ok(())
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, buf: Bytes) -> RusticResult<()> {
        let rel = Self::rel(tpe, id);
        self.bucket
            .put(&rel, buf.to_vec(), Put::Overwrite)
            .map(drop)
            .map_err(|e| error("Cannot write `{path}`", &rel, e))
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let rel = Self::rel(tpe, id);
        self.bucket.delete(&rel).map_err(|e| error("Cannot remove `{path}`", &rel, e))
    }
}

impl Storage for BucketRepo {
    fn exists(&self) -> io::Result<bool> {
        self.bucket.head("config").map(|m| m.is_some()).map_err(io_of)
    }

    fn is_empty(&self) -> io::Result<bool> {
        self.bucket.list("").map(|l| l.is_empty()).map_err(io_of)
    }

    fn names(&self, dir: &str) -> io::Result<Vec<String>> {
        let listed = self.bucket.list(dir).map_err(io_of)?;
        Ok(listed.into_iter().filter_map(|m| m.rel.rsplit('/').next().map(str::to_string)).collect())
    }

    fn read_small(
        &self,
        dir: &str,
        name: &str,
        max: u64,
    ) -> io::Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>> {
        let rel = format!("{dir}/{name}");
        let Some(meta) = self.bucket.head(&rel).map_err(io_of)? else { return Ok(None) };
        if meta.size > max {
            return Ok(Some((Vec::new(), Some(meta.modified.into()))));
        }
        match self.bucket.get(&rel).map_err(io_of)? {
            Some((bytes, _)) => Ok(Some((bytes, Some(meta.modified.into())))),
            None => Ok(None),
        }
    }

    fn write_whole(&self, dir: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.bucket.put(&format!("{dir}/{name}"), bytes.to_vec(), Put::Overwrite).map(drop).map_err(io_of)
    }

    fn remove_file(&self, dir: &str, name: &str) -> io::Result<()> {
        self.bucket.delete(&format!("{dir}/{name}")).map_err(io_of)
    }

    fn shown(&self) -> String {
        format!("restic:{}", self.bucket.location())
    }
}

/// Lists what is beneath a directory: `None` above the listing's limit.
type Lister<'a> = dyn Fn(&str) -> Result<Option<Vec<Meta>>, S3Error> + 'a;

/// Everything beneath `dir`, listed whole if `list` can (it says `None`
/// above its limit), else one of restic's 256 subdirectories (`data/00`
/// to `data/ff`) at a time: each listing under its own limit and its own
/// call timeout, so a repository of many packs (over a hundred thousand,
/// 400 GiB in 4 MiB packs) is still checked and pruned.
fn listed_in_parts(dir: &str, list: &Lister<'_>) -> Result<Vec<Meta>, S3Error> {
    if let Some(all) = list(dir)? {
        return Ok(all);
    }
    let mut all = Vec::new();
    for sub in 0..=255u8 {
        let part = format!("{dir}/{sub:02x}");
        let listed = list(&part)?.ok_or_else(|| S3Error::Other(format!("{part}: more than {LIST_MAX} objects")))?;
        all.extend(listed);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing over its limit is taken again a subdirectory at a time;
    /// a subdirectory over the limit, or an error, fails the whole.
    #[test]
    fn a_listing_too_long_for_one_call_is_taken_a_subdirectory_at_a_time() {
        let meta = |rel: &str| Meta { rel: rel.into(), size: 1, etag: None, modified: chrono::Utc::now() };
        let calls = std::cell::RefCell::new(Vec::new());
        let list = |d: &str| -> Result<Option<Vec<Meta>>, S3Error> {
            calls.borrow_mut().push(d.to_string());
            Ok(match d {
                "data" => None,
                "data/00" | "data/ff" => Some(vec![meta(&format!("{d}/x"))]),
                _ => Some(Vec::new()),
            })
        };
        let all = listed_in_parts("data", &list).unwrap();
        assert_eq!(all.iter().map(|m| m.rel.as_str()).collect::<Vec<_>>(), ["data/00/x", "data/ff/x"]);
        assert_eq!(calls.borrow().len(), 257);
        assert_eq!(calls.borrow()[1], "data/00");

        let whole = |_: &str| -> Result<Option<Vec<Meta>>, S3Error> { Ok(Some(vec![meta("data/ab/y")])) };
        assert_eq!(listed_in_parts("data", &whole).unwrap().len(), 1);

        let too_many = |d: &str| -> Result<Option<Vec<Meta>>, S3Error> {
            Ok(match d {
                "data" | "data/00" => None,
                _ => Some(Vec::new()),
            })
        };
        let err = listed_in_parts("data", &too_many).unwrap_err();
        assert!(matches!(&err, S3Error::Other(m) if m.contains("data/00: more than")), "{err:?}");
    }
}
