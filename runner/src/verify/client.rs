//! Running a database client for `--restore-test`, with every byte that a
//! dump (a server's text) or the client's answer to it can size bounded:
//! a dump is fed line by line, each line at most [`LINE_MAX`], and at most
//! [`CAPTURED_MAX`] of a client's stdout or stderr is kept (the rest is
//! read and dropped, so the client never blocks on a full pipe).

use std::io::{self, BufRead, Read, Write};
use std::process::{Command, Stdio};

/// Longest dump line fed to a client: mysqldump's extended INSERTs stop
/// at `net_buffer_length` (1 MiB by default, 16 MiB at most), and pg_dump
/// writes a COPY row a line. A longer line is a problem, not a load.
pub const LINE_MAX: usize = 16 << 20;
/// Most bytes of a client's errors kept.
pub const CAPTURED_MAX: usize = 64 << 10;
/// Most bytes of a query's answer (a row count per table: enough for
/// hundreds of thousands of tables).
pub const ANSWER_MAX: usize = 16 << 20;

/// Runs a database client once (`what` in errors) with no input: its
/// output, or its stderr as the error.
pub fn output(mut client: Command, what: &str) -> Result<String, String> {
    let mut child = client
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let errors = capture(child.stderr.take().expect("piped"), CAPTURED_MAX);
    let out = capture(child.stdout.take().expect("piped"), ANSWER_MAX);
    let status = child.wait().map_err(|e| format!("{what}: {e}"))?;
    let (out, errors) = (out.join().unwrap_or_default(), errors.join().unwrap_or_default());
    if !status.success() {
        let program = client.get_program().to_string_lossy().into_owned();
        return Err(format!("{program}: {}", errors.trim()));
    }
    if out.len() >= ANSWER_MAX {
        return Err(format!("{what} answered with more than {} MiB", ANSWER_MAX >> 20));
    }
    Ok(out)
}

/// Reads `pipe` to its end on a thread of its own, keeping the first
/// `max` bytes (and saying how many more came).
fn capture(mut pipe: impl Read + Send + 'static, max: usize) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut pipe).take(max as u64).read_to_end(&mut kept);
        let dropped = io::copy(&mut pipe, &mut io::sink()).unwrap_or(0);
        let mut text = String::from_utf8_lossy(&kept).into_owned();
        if dropped > 0 {
            text.push_str(&format!(" … ({dropped} more bytes)"));
        }
        text
    })
}

/// Streams a dump line by line into a database client's stdin (`client`,
/// spawned here, named `what` in errors). Every line goes through `feed`
/// first, which leaves it out by returning false. Fails with the client's
/// stderr when the client fails, or when the dump cannot be read or has a
/// line longer than [`LINE_MAX`].
pub fn load_lines(
    mut client: Command,
    what: &str,
    first: &[u8],
    mut reader: Box<dyn BufRead + '_>,
    mut feed: impl FnMut(&[u8]) -> bool,
) -> Result<(), String> {
    let mut child = client
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let errors = capture(child.stderr.take().expect("piped"), CAPTURED_MAX);
    let mut stdin = child.stdin.take().expect("piped");
    let mut number = 0u64;
    let fed = (|| -> Result<(), Fed> {
        stdin.write_all(first).map_err(Fed::Write)?;
        let mut line = Vec::new();
        loop {
            number += 1;
            if !read_line(&mut reader, &mut line, LINE_MAX).map_err(Fed::Read)? {
                return Ok(());
            }
            if feed(&line) {
                stdin.write_all(&line).map_err(Fed::Write)?;
            }
        }
    })();
    if let Err(Fed::Read(_)) = &fed {
        // The dump could not be read to its end (cut short, a line too
        // long, a stored file that failed its check at the end): the client
        // is stopped while its input is still open, so it never sees an end
        // of input it could commit (psql --single-transaction commits at
        // the end of its input).
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(stdin);
    let status = child.wait().map_err(|e| e.to_string())?;
    let errors = errors.join().unwrap_or_default();
    if let Err(Fed::Read(e)) = &fed {
        return Err(format!("line {number} of the dump: {e}"));
    }
    if !status.success() {
        return Err(format!("the load failed ({status}): {}", errors.trim()));
    }
    match fed {
        Err(Fed::Write(e)) => Err(format!("writing to {what}: {e}")),
        _ => Ok(()),
    }
}

/// Where feeding a client failed: reading the dump, or writing to it.
enum Fed {
    Read(io::Error),
    Write(io::Error),
}

/// Reads one line (with its newline) into `line`, at most `max` bytes;
/// `false` at the end of the stream. A longer line is `InvalidData`.
fn read_line(reader: &mut dyn BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    line.clear();
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(!line.is_empty());
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("longer than {} MiB, more than a dump line may be here", max >> 20),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_whole_up_to_the_bound_and_no_further() {
        let text = b"a\nbb\n\nlast";
        let mut reader: &[u8] = text;
        let mut line = Vec::new();
        let mut got = Vec::new();
        while read_line(&mut reader, &mut line, 10).unwrap() {
            got.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(got, ["a\n", "bb\n", "\n", "last"]);
        // A line as long as the bound is whole; one byte more is refused
        // without holding more than the bound.
        let mut reader = io::BufReader::with_capacity(3, &b"0123456789\n"[..]);
        assert!(read_line(&mut reader, &mut line, 11).unwrap());
        let mut endless = io::BufReader::new(io::repeat(b'x'));
        let err = read_line(&mut endless, &mut line, 1 << 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(line.len() <= 1 << 20);
    }

    #[test]
    fn a_clients_output_and_errors_are_kept_only_up_to_the_bound() {
        let mut loud = Command::new("sh");
        loud.args(["-c", "head -c 50000000 /dev/zero | tr '\\0' e >&2; exit 1"]);
        let err = output(loud, "a loud client").unwrap_err();
        assert!(err.len() < CAPTURED_MAX + 200, "{} bytes", err.len());
        assert!(err.contains("more bytes)"), "{}", &err[err.len() - 100..]);
        let mut chatty = Command::new("sh");
        chatty.args(["-c", "head -c 50000000 /dev/zero"]);
        assert!(output(chatty, "a chatty client").unwrap_err().contains("more than 16 MiB"));
        // A long but reasonable answer (row counts of many tables) is whole.
        let mut counts = Command::new("sh");
        counts.args(["-c", "seq 1 100000 | sed 's/$/\tt/'"]);
        assert_eq!(output(counts, "the counts").unwrap().lines().count(), 100_000);
    }
}
