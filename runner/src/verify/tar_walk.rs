//! Walks a tar stream header by header, holding nothing a server chose the
//! size of: entry data and the extension records (GNU long names, PAX
//! headers) are read through and dropped, never collected, and extension
//! records longer than any archiver makes are reported.

use std::io::{self, Read};

/// Longest GNU long name or long link record (`L`, `K`): names stop at
/// `PATH_MAX` (4,096 bytes) on every system we restore to.
pub const LONG_NAME_MAX: u64 = 64 << 10;
/// Longest PAX header record (`x`, `g`): paths, times, ACLs and xattrs.
pub const PAX_MAX: u64 = 1 << 20;

/// One entry of an archive, as `offsite ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// As the archive names it (GNU long name or PAX `path` included):
    /// the archive's text, to be escaped wherever shown.
    pub name: String,
    /// The tar type flag (`0` a file, `5` a directory, `2` a symlink ...).
    pub kind: u8,
    pub size: u64,
    pub mode: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Where a link points.
    pub link: Option<String>,
    /// Numeric owner and group.
    pub uid: u32,
    pub gid: u32,
    /// A device node's major and minor numbers.
    pub device: (u32, u32),
}

/// Reads every entry of a tar stream up to its end-of-archive block;
/// returns how many entries it has (extension records belong to the entry
/// they precede and are not counted).
pub fn count_entries(reader: &mut impl Read) -> Result<u64, String> {
    walk(reader, |_, _| Ok(()))
}

/// Reads every entry of a tar stream up to its end-of-archive block,
/// handing each to `seen` with its long name and PAX records applied, and
/// a reader of its data (what `seen` leaves unread is read through);
/// returns how many there were. Extension records are bounded (see
/// [`LONG_NAME_MAX`], [`PAX_MAX`]). An error from `seen` ends the walk.
pub fn walk(
    reader: &mut impl Read,
    mut seen: impl FnMut(&Entry, &mut dyn Read) -> Result<(), String>,
) -> Result<u64, String> {
    let mut entries = 0u64;
    let mut header = [0u8; 512];
    let (mut long_name, mut long_link, mut pax): (Option<String>, Option<String>, Vec<(String, String)>) =
        (None, None, Vec::new());
    loop {
        let n = entry_no(entries);
        if !read_block(reader, &mut header).map_err(|e| format!("tar: {n}: {e}"))? {
            // A stream that ends without its end-of-archive block: GNU tar
            // reads it with a warning; so do we, as the tar crate did.
            return Ok(entries);
        }
        if header.iter().all(|b| *b == 0) {
            return Ok(entries);
        }
        check_sum(&header).map_err(|e| format!("tar: {n}: {e}"))?;
        let mut size = size_of(&header).map_err(|e| format!("tar: {n}: {e}"))?;
        let kind = header[156];
        let bound = match kind {
            b'L' | b'K' => Some(("a GNU long name", LONG_NAME_MAX)),
            b'x' | b'g' => Some(("a PAX header", PAX_MAX)),
            _ => None,
        };
        if let Some((what, max)) = bound
            && size > max
        {
            return Err(format!("tar: {n}: {what} of {size} bytes, more than any archiver writes ({max})"));
        }
        // An old-GNU sparse entry whose map did not fit its header goes on
        // in extension blocks, each saying whether another follows.
        if kind == b'S' && header[482] != 0 {
            let mut block = [0u8; 512];
            loop {
                if !read_block(reader, &mut block).map_err(|e| format!("tar: {n}: {e}"))? {
                    return Err(format!("tar: {n} is cut short in its sparse map"));
                }
                if block[504] == 0 {
                    break;
                }
            }
        }
        let padded = size.div_ceil(512) * 512;
        if bound.is_some() {
            // Bounded above: held, to name the entry it precedes.
            let mut data = Vec::with_capacity(padded as usize);
            let read = reader.take(padded).read_to_end(&mut data).map_err(|e| format!("tar: {n}: {e}"))?;
            if read as u64 != padded {
                return Err(format!("tar: {n} is cut short ({} of {size} bytes)", (read as u64).min(size)));
            }
            data.truncate(size as usize);
            let text = |d: &[u8]| String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
            match kind {
                b'L' => long_name = Some(text(&data)),
                b'K' => long_link = Some(text(&data)),
                b'x' => pax = pax_records(&data),
                _ => {}
            }
            continue;
        }
        let value = |key: &str| pax.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        if let Some(pax_size) = value("size").and_then(|v| v.parse::<u64>().ok()) {
            size = pax_size;
        }
        let field = |range: std::ops::Range<usize>| {
            let bytes = &header[range];
            String::from_utf8_lossy(bytes.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        };
        let name = value("path").or(long_name.take()).unwrap_or_else(|| {
            // POSIX ustar (not GNU's "ustar  ") keeps a prefix of long names.
            let (prefix, name) = (field(345..500), field(0..100));
            if &header[257..263] == b"ustar\0" && !prefix.is_empty() { format!("{prefix}/{name}") } else { name }
        });
        let link = value("linkpath").or(long_link.take()).or_else(|| Some(field(157..257)).filter(|l| !l.is_empty()));
        let mtime = value("mtime")
            .and_then(|v| v.split('.').next().and_then(|s| s.parse::<i64>().ok()))
            .or_else(|| octal(&header[136..148]).and_then(|t| i64::try_from(t).ok()))
            .unwrap_or(0);
        let mode = octal(&header[100..108]).and_then(|m| u32::try_from(m).ok()).unwrap_or(0);
        let number = |range: std::ops::Range<usize>| octal(&header[range]).and_then(|v| u32::try_from(v).ok());
        let id = |key: &str, range: std::ops::Range<usize>| {
            value(key).and_then(|v| v.parse::<u32>().ok()).or_else(|| number(range)).unwrap_or(0)
        };
        let (uid, gid) = (id("uid", 108..116), id("gid", 116..124));
        let device = (number(329..337).unwrap_or(0), number(337..345).unwrap_or(0));
        let entry = Entry { name, kind, size, mode, mtime, link, uid, gid, device };
        let mut data = reader.take(size);
        seen(&entry, &mut data)?;
        io::copy(&mut data, &mut io::sink()).map_err(|e| format!("tar: {n}: {e}"))?;
        let read = size - data.limit();
        if read != size {
            return Err(format!("tar: {n} is cut short ({read} of {size} bytes)"));
        }
        let padding = size.div_ceil(512) * 512 - size;
        let padded = io::copy(&mut reader.take(padding), &mut io::sink()).map_err(|e| format!("tar: {n}: {e}"))?;
        if padded != padding {
            return Err(format!("tar: {n} is cut short ({read} of {size} bytes)"));
        }
        pax.clear();
        entries += 1;
    }
}

/// The records of a PAX header: `LENGTH key=value\n` each.
fn pax_records(data: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(space) = rest.iter().position(|b| *b == b' ') else { break };
        let Some(len) = std::str::from_utf8(&rest[..space]).ok().and_then(|l| l.parse::<usize>().ok()) else { break };
        if len <= space || len > rest.len() {
            break;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|b| *b == b'=') {
            out.push((
                String::from_utf8_lossy(&record[..eq]).into_owned(),
                String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
            ));
        }
        rest = &rest[len..];
    }
    out
}

fn entry_no(counted: u64) -> String {
    format!("entry {}", counted + 1)
}

/// Fills `block`; `false` when the stream ended before its first byte.
fn read_block(reader: &mut impl Read, block: &mut [u8; 512]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < block.len() {
        match reader.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the header is cut short")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The header's checksum field against the sum of its bytes (with the
/// field itself as spaces), unsigned or, as old archivers wrote, signed.
fn check_sum(header: &[u8; 512]) -> Result<(), String> {
    let want = octal(&header[148..156]).ok_or("the header's checksum field is not a number")?;
    let mut unsigned = 0u64;
    let mut signed = 0i64;
    for (i, b) in header.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { *b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if want == unsigned || i64::try_from(want).is_ok_and(|w| w == signed) {
        Ok(())
    } else {
        Err("the header's checksum does not match (not a tar archive, or damaged)".into())
    }
}

/// The entry's size: octal digits, or GNU's base-256 for large sizes.
fn size_of(header: &[u8; 512]) -> Result<u64, String> {
    let field = &header[124..136];
    if field[0] & 0x80 != 0 {
        if field[0] & 0x40 != 0 {
            return Err("a negative size".into());
        }
        let mut size = u64::from(field[0] & 0x3f);
        for b in &field[1..] {
            size = size.checked_mul(256).and_then(|s| s.checked_add(u64::from(*b))).ok_or("a size past 2^64")?;
        }
        return Ok(size);
    }
    octal(field).ok_or_else(|| "the size field is not a number".to_string())
}

/// An octal field: leading spaces, digits, then NUL or space.
fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_start_matches(' ').trim_end_matches(['\0', ' ']);
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut ::tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut ::tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = ::tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(::tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    #[test]
    fn entries_are_counted_with_long_names_and_pax_records_as_part_of_theirs() {
        let long = format!("{}/f", "d".repeat(300));
        let bytes = archive(|b| {
            file(b, "a", b"hello");
            file(b, &long, b"x");
            b.append_pax_extensions([("comment", b"hi".as_slice())]).unwrap();
            file(b, "c", &[7; 1000]);
        });
        assert_eq!(count_entries(&mut bytes.as_slice()).unwrap(), 3);
        let mut names = Vec::new();
        walk(&mut bytes.as_slice(), |e, _| {
            names.push((e.name.clone(), e.size, e.mode));
            Ok(())
        })
        .unwrap();
        assert_eq!(names, vec![("a".into(), 5, 0o644), (long.clone(), 1, 0o644), ("c".into(), 1000, 0o644)]);
        // GNU tar agrees the archive is whole; a cut one is not.
        assert!(count_entries(&mut &bytes[..1024 + 512 + 100]).unwrap_err().contains("cut short"));
    }

    /// A server chooses the size of a long name or a PAX record: one past
    /// the bound is a problem, and none is ever held.
    #[test]
    fn oversized_extension_records_are_problems() {
        for (kind, max) in [(::tar::EntryType::GNULongName, LONG_NAME_MAX), (::tar::EntryType::XHeader, PAX_MAX)] {
            let bytes = archive(|b| {
                let mut h = ::tar::Header::new_gnu();
                h.set_size(max + 1);
                h.set_entry_type(kind);
                h.set_path("././@LongLink").unwrap();
                h.set_cksum();
                b.append(&h, std::io::repeat(b'a').take(max + 1)).unwrap();
                file(b, "x", b"x");
            });
            let err = count_entries(&mut bytes.as_slice()).unwrap_err();
            assert!(err.contains("more than any archiver writes"), "{err}");
        }
    }

    /// GNU tar's old format puts a long sparse map in extension blocks
    /// after the header: they belong to the entry.
    #[test]
    fn an_old_gnu_sparse_entry_with_extension_blocks_is_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let img = std::fs::File::create(dir.path().join("sparse.img")).unwrap();
        img.set_len(10 << 20).unwrap();
        for i in 1..=8u64 {
            std::os::unix::fs::FileExt::write_at(&img, b"x", i * 1_000_000).unwrap();
        }
        std::fs::write(dir.path().join("b.txt"), "small").unwrap();
        let tar = |args: &[&str]| {
            let ok = std::process::Command::new("tar").args(args).current_dir(dir.path()).status().unwrap();
            assert!(ok.success(), "tar {args:?}");
        };
        tar(&["--format=oldgnu", "-S", "-cf", "a.tar", "sparse.img", "b.txt"]);
        let bytes = std::fs::read(dir.path().join("a.tar")).unwrap();
        assert_eq!(bytes[156], b'S');
        assert_eq!(bytes[482], 1, "the map goes on in an extension block");
        assert_eq!(count_entries(&mut bytes.as_slice()).unwrap(), 2);
    }

    #[test]
    fn a_damaged_header_is_named() {
        let mut bytes = archive(|b| file(b, "a", b"hello"));
        bytes[0] ^= 1;
        assert!(count_entries(&mut bytes.as_slice()).unwrap_err().contains("checksum"));
    }
}
