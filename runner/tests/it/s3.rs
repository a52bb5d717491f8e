//! S3 stores against a real S3-compatible server (SeaweedFS on loopback):
//! the client's errors, the server's conditional writes the lock relies
//! on, and the lock itself with runners racing for it.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use offsite::s3::credentials::Credentials;
use offsite::s3::lock::{Holder, LockError, S3Lock};
use offsite::s3::{Bucket, Put, S3Error, S3Location, S3Settings};
use offsite_testkit::seaweed::{ACCESS_KEY, S3Space, SECRET_KEY};

fn credentials(secret: &str) -> Credentials {
    Credentials {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: secret.into(),
        session_token: None,
        source: "test".into(),
    }
}

/// A client of its own, as a separate machine would have.
fn bucket_with(server: &S3Space, url: &str, secret: &str) -> Bucket {
    let settings = S3Settings { endpoint: Some(server.endpoint()), path_style: true, ..Default::default() };
    let location = S3Location::parse(&server.url(url)).unwrap();
    Bucket::open(&location, &settings, &credentials(secret), None, Duration::from_secs(20)).unwrap()
}

fn bucket(server: &S3Space, url: &str) -> Arc<Bucket> {
    Arc::new(bucket_with(server, url, SECRET_KEY))
}

fn holder(site: &str) -> Holder {
    Holder {
        site: site.into(),
        host: "machine".into(),
        pid: 1,
        started: "2026-12-01T00:00:00Z".into(),
        run_id: "r".into(),
    }
}

#[test]
fn objects_round_trip_and_wrong_credentials_or_a_missing_bucket_are_named() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let b = bucket(&server, "s3://backups/web1");
    b.probe().unwrap();
    assert_eq!(b.get("a/b.txt").unwrap(), None);
    let etag = b.put("a/b.txt", b"hello".to_vec(), Put::Create).unwrap();
    let (bytes, got_etag) = b.get("a/b.txt").unwrap().unwrap();
    assert_eq!((bytes.as_slice(), got_etag.as_str()), (&b"hello"[..], etag.as_str()));
    let listed = b.list("a").unwrap();
    assert_eq!(listed.iter().map(|m| (m.rel.as_str(), m.size)).collect::<Vec<_>>(), [("a/b.txt", 5)]);
    assert!(matches!(b.put("a/b.txt", b"x".to_vec(), Put::Create), Err(S3Error::Conflict(_))));
    assert!(matches!(b.put("a/b.txt", b"x".to_vec(), Put::Replace("\"nope\"".into())), Err(S3Error::Conflict(_))));
    b.put("a/b.txt", b"again".to_vec(), Put::Replace(etag)).unwrap();
    b.delete("a/b.txt").unwrap();
    assert_eq!(b.head("a/b.txt").unwrap(), None);

    let wrong = bucket_with(&server, "s3://backups/web1", "not-the-secret");
    let e = wrong.probe().unwrap_err();
    assert!(matches!(e, S3Error::Denied(_)) && e.to_string().contains("refused our credentials"), "{e:?}");

    let missing = bucket(&server, "s3://no-such-bucket/web1");
    let e = missing.probe().unwrap_err();
    assert!(matches!(e, S3Error::NoBucket(_)) && e.to_string().contains("does not exist"), "{e:?}");
}

/// What the lock stands on: of many clients creating one key at once with
/// `If-None-Match: *`, exactly one succeeds; of many replacing it with
/// `If-Match` on the same ETag, exactly one. (SeaweedFS before 4.17 let
/// them all through: seaweedfs#8800.) Every body differs: an ETag is a
/// hash of the content, so rewriting the same bytes keeps it, and the
/// lock never writes the same body twice for that reason.
#[test]
fn the_servers_conditional_writes_admit_exactly_one_writer() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    for round in 0..3 {
        let key = format!("race/{round}");
        let clients: Vec<Arc<Bucket>> = (0..6).map(|_| bucket(&server, "s3://backups")).collect();
        let start = Arc::new(Barrier::new(clients.len()));
        let won = |mode: Put, what: &str| {
            let threads: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (c, start, key, mode) = (Arc::clone(c), Arc::clone(&start), key.clone(), mode.clone());
                    let body = format!("{what} by writer {i}").into_bytes();
                    std::thread::spawn(move || {
                        start.wait();
                        c.put(&key, body, mode).is_ok()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count()
        };
        assert_eq!(won(Put::Create, "create"), 1, "round {round}: creates");
        let etag = clients[0].head(&key).unwrap().unwrap().etag.unwrap();
        assert_eq!(won(Put::Replace(etag), "replace"), 1, "round {round}: replaces");
    }
}

/// Runners on separate clients (as on separate machines) start at once,
/// again and again: at no moment do two hold the lock, and the ones that
/// lose are told who holds it.
#[test]
fn runners_racing_for_the_lock_never_both_hold_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = S3Space::shared();
    server.create_bucket("backups");
    let holding = Arc::new(AtomicUsize::new(0));
    let (mut won, mut refused) = (0, 0);
    for round in 0..4 {
        let start = Arc::new(Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (b, start, holding) =
                    (bucket(&server, "s3://backups/web1"), Arc::clone(&start), Arc::clone(&holding));
                std::thread::spawn(move || {
                    start.wait();
                    let lock = S3Lock::acquire(b, holder(&format!("runner{i}")), Duration::from_secs(60))?;
                    let others = holding.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(300));
                    holding.fetch_sub(1, Ordering::SeqCst);
                    lock.confirm().unwrap();
                    lock.release().unwrap();
                    Ok::<usize, LockError>(others)
                })
            })
            .collect();
        for result in threads.into_iter().map(|t| t.join().unwrap()) {
            match result {
                Ok(others) => {
                    assert_eq!(others, 0, "round {round}: two runners held the lock at once");
                    won += 1;
                }
                Err(e) => {
                    assert!(matches!(e, LockError::Busy { .. }), "round {round}: {e}");
                    assert!(e.to_string().contains("another run holds the store: site \"runner"), "{e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(won >= 4 && refused >= 4, "every round had a winner and runners turned away: {won} won, {refused} refused");
}

#[test]
fn a_stale_lock_is_taken_over_and_its_holder_finds_out_before_publishing() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let stale = Duration::from_secs(3);

    // A runner that died holding the lock: its object stops changing.
    let raw = bucket(&server, "s3://backups/web1");
    let dead =
        br#"{"format":1,"state":"held","token":"00","site":"web1","host":"gone","pid":7,"started":"x","beat":0}"#;
    raw.put(".offsite/lock", dead.to_vec(), Put::Overwrite).unwrap();
    match S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("next"), stale) {
        Err(LockError::Busy { holder, .. }) => assert_eq!(holder.host, "gone"),
        other => panic!("a fresh lock is respected: {:?}", other.map(|_| ())),
    }
    std::thread::sleep(stale + Duration::from_secs(1));
    let lock = S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("next"), stale).unwrap();

    // While held, its heartbeat keeps it fresh: nobody can take it.
    std::thread::sleep(stale + Duration::from_secs(1));
    assert!(matches!(
        S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("third"), stale),
        Err(LockError::Busy { .. })
    ));
    lock.confirm().unwrap();

    // Taken from under it (as after a long stall): it says so and must
    // not publish.
    // The taker's host name is the taker's text: it reaches the log
    // escaped.
    let taker = br#"{"format":1,"state":"held","token":"01","site":"web1","host":"gone\u001b[2J","pid":8,"started":"x","beat":0}"#;
    raw.put(".offsite/lock", taker.to_vec(), Put::Overwrite).unwrap();
    let e = lock.confirm().unwrap_err();
    assert!(e.contains("taken over by site \"web1\" on gone\\e[2J") && !e.contains('\x1b'), "{e}");
    assert!(lock.is_lost());
    drop(lock);
    // Dropping a lost lock leaves the new holder's object alone.
    assert_eq!(raw.get(".offsite/lock").unwrap().unwrap().0, taker.to_vec());
}

#[test]
fn a_released_or_dropped_lock_is_free_at_once() {
    let server = S3Space::shared();
    server.create_bucket("backups");
    let long = Duration::from_secs(600);
    let first = S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("a"), long).unwrap();
    first.release().unwrap();
    let second = S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("b"), long).unwrap();
    drop(second);
    let third = S3Lock::acquire(bucket(&server, "s3://backups/web1"), holder("c"), long).unwrap();
    // Another prefix is another store with a lock of its own.
    let other = S3Lock::acquire(bucket(&server, "s3://backups/db1"), holder("d"), long).unwrap();
    third.release().unwrap();
    other.release().unwrap();
}

/// Pseudo-random bytes, `len` of them, the same for the same seed.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

#[test]
fn objects_stream_up_in_parts_and_read_back_identically() {
    use offsite::s3::upload::{MIN_PART, ObjectWriter};
    use std::io::Write;
    let server = S3Space::shared();
    server.create_bucket("backups");
    let b = bucket(&server, "s3://backups/web1");
    use std::io::Read;
    // Sizes around the part edges: empty, one byte, exactly one part, and
    // 23 parts and a bit written in uneven pieces, some copied in and some
    // read straight into the part (spare, filled).
    for (i, len) in [0, 1, MIN_PART, 23 * MIN_PART + 12345].into_iter().enumerate() {
        let data = noise(len, 7 + i as u64);
        let rel = format!("runs/r1/obj{i}.bin");
        let mut w = ObjectWriter::create(Arc::clone(&b), &rel, MIN_PART).unwrap();
        for (j, mut piece) in data.chunks(65_537).enumerate() {
            if j % 2 == 0 {
                w.write_all(piece).unwrap();
                continue;
            }
            while !piece.is_empty() {
                let spare = w.spare();
                let n = spare.len().min(piece.len()).min(40_000);
                spare[..n].copy_from_slice(&piece[..n]);
                w.filled(n).unwrap();
                piece = &piece[n..];
            }
        }
        assert_eq!(w.written(), len as u64);
        w.finish().unwrap();
        assert_eq!(b.head(&rel).unwrap().unwrap().size, len as u64, "{rel}");
        let mut back = Vec::new();
        assert_eq!(b.download(&rel, &mut back).unwrap(), len as u64);
        assert!(back.len() == data.len() && sha256(&back) == sha256(&data), "{rel} reads back identically");
        // And read as it downloads, in small reads.
        let mut reader = b.reader(&rel).unwrap().unwrap();
        assert_eq!(reader.size(), len as u64);
        let (mut back, mut buf) = (Vec::new(), [0u8; 4099]);
        loop {
            match reader.read(&mut buf).unwrap() {
                0 => break,
                n => back.extend_from_slice(&buf[..n]),
            }
        }
        assert!(back.len() == data.len() && sha256(&back) == sha256(&data), "{rel} reads back identically");
    }
    assert!(b.reader("runs/r1/none.bin").unwrap().is_none(), "no such object");
    assert_eq!(server.pending_uploads("backups"), 0);
}

#[test]
fn an_unfinished_upload_is_never_visible_and_is_aborted_when_dropped() {
    use offsite::s3::upload::{MIN_PART, ObjectWriter};
    let server = S3Space::shared();
    server.create_bucket("backups");
    let b = bucket(&server, "s3://backups/web1");
    let mut w = ObjectWriter::create(Arc::clone(&b), "partial.bin", MIN_PART).unwrap();
    w.write_all_bytes(&noise(3 * MIN_PART + 10, 1)).unwrap();
    assert_eq!(server.pending_uploads("backups"), 1);
    assert_eq!(b.head("partial.bin").unwrap(), None, "nothing is visible before finish");
    drop(w);
    assert_eq!(server.pending_uploads("backups"), 0, "dropping the writer aborted the upload");
    assert_eq!(b.head("partial.bin").unwrap(), None);
}

/// What a killed run leaves: an upload nobody completes. The next run
/// finds it beneath its store's prefix (and only there) and aborts it.
#[test]
fn incomplete_uploads_a_killed_run_left_are_found_and_aborted() {
    use offsite::s3::upload::{MIN_PART, ObjectWriter};
    let server = S3Space::shared();
    server.create_bucket("backups");
    let web = bucket(&server, "s3://backups/web1");
    let db = bucket(&server, "s3://backups/db1");
    for (b, name) in [(&web, ".offsite/runs/r1/site&co dump.sql"), (&db, "other.bin")] {
        let mut w = ObjectWriter::create(Arc::clone(b), name, MIN_PART).unwrap();
        w.write_all_bytes(&noise(MIN_PART + 1, 3)).unwrap();
        // As if the process died here: no abort, no completion.
        std::mem::forget(w);
    }
    assert_eq!(server.pending_uploads("backups"), 2);
    let found = web.pending_uploads(".offsite/runs").unwrap();
    assert_eq!(found.iter().map(|u| u.rel.as_str()).collect::<Vec<_>>(), [".offsite/runs/r1/site&co dump.sql"]);
    assert!(found[0].initiated.is_some());
    for upload in &found {
        web.abort_upload(&upload.rel, &upload.upload_id).unwrap();
    }
    assert!(web.pending_uploads(".offsite/runs").unwrap().is_empty());
    assert_eq!(server.pending_uploads("backups"), 1, "the other store's upload is not ours to abort");
    let wrong = bucket_with(&server, "s3://backups/web1", "not-the-secret");
    assert!(matches!(wrong.pending_uploads(".offsite/runs"), Err(S3Error::Denied(_))));
}

/// A run seals each output as it ends and completes them only when the
/// whole run has succeeded: until then the old objects stay as they were,
/// and a run that fails drops its sealed uploads, which aborts them.
#[test]
fn sealed_outputs_replace_nothing_until_completed_and_are_aborted_if_the_run_fails() {
    use offsite::s3::upload::{MIN_PART, ObjectWriter};
    use std::io::Write;
    let server = S3Space::shared();
    server.create_bucket("backups");
    let b = bucket(&server, "s3://backups/web1");
    b.put("db.sql", b"yesterday".to_vec(), Put::Overwrite).unwrap();
    let seal = |name: &str, data: &[u8]| {
        let mut w = ObjectWriter::create(Arc::clone(&b), name, MIN_PART).unwrap();
        w.write_all(data).unwrap();
        w.seal().unwrap()
    };
    let today = noise(MIN_PART * 2 + 3, 9);
    let (db, web) = (seal("db.sql", &today), seal("web.tgz", b"site"));
    assert_eq!((db.rel(), db.bytes()), ("db.sql", today.len() as u64));
    // Compared as text: a completed upload would show 10 MiB of bytes.
    let before = String::from_utf8_lossy(&b.get("db.sql").unwrap().unwrap().0).chars().take(40).collect::<String>();
    assert_eq!(before, "yesterday", "the old object until completion");
    assert_eq!(b.head("web.tgz").unwrap(), None);
    db.complete().unwrap();
    web.complete().unwrap();
    let mut back = Vec::new();
    b.download("db.sql", &mut back).unwrap();
    assert_eq!(sha256(&back), sha256(&today));
    assert_eq!(b.get("web.tgz").unwrap().unwrap().0, b"site");

    // A failed run: sealed, never completed.
    let failed = seal("db.sql", b"partial garbage");
    assert_eq!(server.pending_uploads("backups"), 1);
    drop(failed);
    assert_eq!(server.pending_uploads("backups"), 0);
    let mut back = Vec::new();
    b.download("db.sql", &mut back).unwrap();
    assert_eq!(sha256(&back), sha256(&today), "the good object stays");
}

/// A hostile or broken endpoint: answers every request with a 200 and a
/// listing page of `body_len` bytes (one key `key_len` long, then
/// padding), and counts the bytes the client took before it stopped.
fn hostile_endpoint(body_len: usize, key_len: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    std::thread::spawn(move || {
        for conn in listener.incoming().take(8) {
            let Ok(mut conn) = conn else { return };
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let mut request = [0u8; 8192];
                let _ = conn.read(&mut request);
                let head = format!(
                    "<?xml version=\"1.0\"?><ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated>\
                     <Contents><Key>{}</Key><Size>1</Size><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
                     <ETag>\"e\"</ETag></Contents><!--",
                    "k".repeat(key_len)
                );
                let tail = "--></ListBucketResult>";
                let total = body_len.max(head.len() + tail.len());
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {total}\r\n\r\n{head}"
                );
                let mut left = total - head.len() - tail.len();
                let pad = vec![b' '; 64 << 10];
                while left > 0 {
                    let n = left.min(pad.len());
                    if conn.write_all(&pad[..n]).is_err() {
                        return;
                    }
                    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    left -= n;
                }
                let _ = conn.write_all(tail.as_bytes());
            });
        }
    });
    (endpoint, sent)
}

/// A listing page is read only up to a bound in bytes, whatever length the
/// server claims, and a key longer than S3 allows is refused.
#[test]
fn a_listing_from_a_hostile_endpoint_is_bounded_in_bytes_and_key_length() {
    let open = |endpoint: String| {
        let settings = S3Settings { endpoint: Some(endpoint), path_style: true, ..Default::default() };
        let location = S3Location::parse("s3://backups/p").unwrap();
        Bucket::open(&location, &settings, &credentials(SECRET_KEY), None, Duration::from_secs(20)).unwrap()
    };
    let (endpoint, sent) = hostile_endpoint(512 << 20, 10);
    let err = open(endpoint).list("runs").unwrap_err().to_string();
    assert!(err.contains("longer than 8 MiB"), "{err}");
    let took = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(took < 64 << 20, "the client read {took} bytes of a 512 MiB page");

    let (endpoint, _) = hostile_endpoint(0, 2000);
    let err = open(endpoint).list("runs").unwrap_err().to_string();
    assert!(err.contains("longer than 1024 bytes"), "{err}");
}
