//! Content-defined chunking, with restic's cut points.
//!
//! A chunk ends where the Rabin fingerprint of the last 64 bytes, taken
//! modulo the repository's polynomial, has its low 20 bits zero (1 MiB on
//! average), but never before 512 KiB and always at 8 MiB. The cut
//! points are restic's and rustic's for the same repository, so a dump
//! stored by Offsite and one stored by `restic backup --stdin` share
//! their chunks.
//!
//! The fingerprint rolls with two tables, as restic's does: one takes
//! out the byte that leaves the window, one reduces the fingerprint
//! after the next byte is shifted in. The first 512 KiB - 64 bytes of a
//! chunk are only counted: the fingerprint at any place depends on the
//! last 64 bytes alone, and no cut can come before 512 KiB.

/// The bytes the fingerprint is taken over.
const WINDOW: usize = 64;

/// Where a repository's chunks end.
pub struct Chunker {
    out_table: [u64; 256],
    mod_table: [u64; 256],
    shift: u32,
    mask: u64,
    min: usize,
    max: usize,
    window: [u8; WINDOW],
    at: usize,
    digest: u64,
    /// Bytes of the chunk so far.
    count: usize,
}

/// The degree of polynomial `p` over GF(2) (`p` is not 0).
fn degree(p: u64) -> u32 {
    63 - p.leading_zeros()
}

/// `x` modulo `p`, polynomials over GF(2).
fn modulo(mut x: u64, p: u64) -> u64 {
    let d = degree(p);
    while x != 0 && degree(x) >= d {
        x ^= p << (degree(x) - d);
    }
    x
}

impl Chunker {
    /// A chunker for polynomial `poly` (degree 53 in repositories restic
    /// or rustic made), chunks of `avg` bytes on average (a power of two).
    pub fn new(poly: u64, avg: usize, min: usize, max: usize) -> Result<Chunker, String> {
        if !(9..=62).contains(&degree(poly.max(1))) || !avg.is_power_of_two() || min < WINDOW || min > avg || avg > max
        {
            return Err(format!(
                "the repository's chunker parameters are not ones restic uses (polynomial {poly:x}, sizes {min}, \
                 {avg}, {max})"
            ));
        }
        let k = degree(poly);
        let append = |h: u64, b: u8| modulo((h << 8) | u64::from(b), poly);
        let mut out_table = [0u64; 256];
        let mut mod_table = [0u64; 256];
        for b in 0..256u64 {
            let mut h = append(0, b as u8);
            for _ in 0..WINDOW - 1 {
                h = append(h, 0);
            }
            out_table[b as usize] = h;
            mod_table[b as usize] = modulo(b << k, poly) | (b << k);
        }
        let mut chunker = Chunker {
            out_table,
            mod_table,
            shift: k - 8,
            mask: avg as u64 - 1,
            min,
            max,
            window: [0; WINDOW],
            at: 0,
            digest: 0,
            count: 0,
        };
        chunker.reset();
        Ok(chunker)
    }

    /// Forgets the bytes taken so far: the next begins a new chunk (and,
    /// for a packing session, a new file).
    pub fn reset(&mut self) {
        self.window = [0; WINDOW];
        self.at = 0;
        self.digest = 0;
        self.count = 0;
    }

    /// Takes the next bytes of the stream. `Some(n)`: the chunk ends
    /// after `data[..n]`, and the next one begins there (pass the rest
    /// again). `None`: all of `data` belongs to the chunk.
    pub fn cut(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        let counted = self.min - WINDOW;
        if self.count < counted {
            let skip = (counted - self.count).min(data.len());
            self.count += skip;
            i = skip;
        }
        let (mut digest, mut at, mut count) = (self.digest, self.at, self.count);
        let end = data.len();
        let mut found = None;
        while i < end {
            let b = data[i];
            let out = std::mem::replace(&mut self.window[at], b);
            at = (at + 1) % WINDOW;
            digest ^= self.out_table[usize::from(out)];
            let top = ((digest >> self.shift) & 0xff) as usize;
            digest = ((digest << 8) | u64::from(b)) ^ self.mod_table[top];
            count += 1;
            i += 1;
            if count >= self.min && (digest & self.mask == 0 || count >= self.max) {
                found = Some(i);
                break;
            }
        }
        if found.is_some() {
            self.reset();
        } else {
            (self.digest, self.at, self.count) = (digest, at, count);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial of restic's own chunker tests.
    const POLY: u64 = 0x3DA3358B4DC173;

    /// The fingerprint of `window`, straight from the definition.
    fn fingerprint(window: &[u8]) -> u64 {
        let mut h = 0u64;
        for &b in window {
            h = modulo((h << 8) | u64::from(b), POLY);
        }
        h
    }

    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    /// Cut points of `data`, fed to the chunker in pieces of `piece` bytes.
    fn cuts(chunker: &mut Chunker, data: &[u8], piece: usize) -> Vec<usize> {
        let mut cuts = Vec::new();
        let mut start = 0;
        for block in data.chunks(piece) {
            let mut rest = block;
            let mut base = block.as_ptr() as usize - data.as_ptr() as usize;
            while let Some(n) = chunker.cut(rest) {
                base += n;
                cuts.push(base - start);
                start = base;
                rest = &rest[n..];
            }
        }
        cuts
    }

    #[test]
    fn cut_points_match_the_definition() {
        let (avg, min, max) = (1 << 10, 256, 4096);
        let data = noise(300_000, 7);
        // The definition: a cut after byte p when the chunk has min bytes
        // or more and the last 64 bytes' fingerprint has its low bits
        // zero, or when it has max bytes.
        let mut want = Vec::new();
        let mut start = 0;
        for p in 1..=data.len() {
            let len = p - start;
            if len >= min && (fingerprint(&data[p - WINDOW..p]) & (avg as u64 - 1) == 0 || len >= max) {
                want.push(len);
                start = p;
            }
        }
        assert!(want.len() > 100, "too few cuts to mean anything: {}", want.len());
        for piece in [1, 63, 4096, data.len()] {
            let mut chunker = Chunker::new(POLY, avg, min, max).unwrap();
            assert_eq!(cuts(&mut chunker, &data, piece), want, "pieces of {piece}");
        }
    }

    #[test]
    fn max_size_cuts_a_stream_without_boundaries() {
        let data = vec![0u8; 20_000];
        let mut chunker = Chunker::new(POLY, 1 << 10, 256, 4096).unwrap();
        // The fingerprint of zeros is zero: every place past min is a cut.
        assert_eq!(cuts(&mut chunker, &data, 1000)[..3], [256, 256, 256]);
        let ones = vec![1u8; 20_000];
        let mut chunker = Chunker::new(POLY, 4096, 256, 4096).unwrap();
        assert!(cuts(&mut chunker, &ones, 777).iter().all(|&n| n == 4096));
    }

    #[test]
    fn odd_parameters_are_refused() {
        assert!(Chunker::new(POLY, 1000, 256, 4096).is_err());
        assert!(Chunker::new(0, 1 << 10, 256, 4096).is_err());
        assert!(Chunker::new(POLY, 1 << 10, 8, 4096).is_err());
        assert!(Chunker::new(POLY, 1 << 20, 512 << 10, 8 << 20).is_ok());
    }
}
