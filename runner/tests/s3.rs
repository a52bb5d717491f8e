//! S3 stores against a real S3-compatible server (SeaweedFS on loopback):
//! the client's errors, the server's conditional writes the lock relies
//! on, and the lock itself with runners racing for it.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use offsite::s3::credentials::Credentials;
use offsite::s3::lock::{Holder, LockError, S3Lock};
use offsite::s3::{Bucket, Put, S3Error, S3Location, S3Settings};
use offsite_testkit::seaweed::{ACCESS_KEY, S3Server, SECRET_KEY};

fn credentials(secret: &str) -> Credentials {
    Credentials {
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: secret.into(),
        session_token: None,
        source: "test".into(),
    }
}

/// A client of its own, as a separate machine would have.
fn bucket_with(server: &S3Server, url: &str, secret: &str) -> Bucket {
    let settings = S3Settings { endpoint: Some(server.endpoint()), path_style: true, ..Default::default() };
    let location = S3Location::parse(url).unwrap();
    Bucket::open(&location, &settings, &credentials(secret), None, Duration::from_secs(20)).unwrap()
}

fn bucket(server: &S3Server, url: &str) -> Arc<Bucket> {
    Arc::new(bucket_with(server, url, SECRET_KEY))
}

fn holder(site: &str) -> Holder {
    Holder { site: site.into(), host: "machine".into(), pid: 1, started: "2026-12-01T00:00:00Z".into() }
}

#[test]
fn objects_round_trip_and_wrong_credentials_or_a_missing_bucket_are_named() {
    let server = S3Server::start("127.0.0.1");
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
/// them all through: seaweedfs#8800.)
#[test]
fn the_servers_conditional_writes_admit_exactly_one_writer() {
    let server = S3Server::start("127.0.0.1");
    server.create_bucket("backups");
    for round in 0..3 {
        let key = format!("race/{round}");
        let clients: Vec<Arc<Bucket>> = (0..6).map(|_| bucket(&server, "s3://backups")).collect();
        let start = Arc::new(Barrier::new(clients.len()));
        let won = |mode: Put| {
            let threads: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (c, start, key, mode) = (Arc::clone(c), Arc::clone(&start), key.clone(), mode.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        c.put(&key, format!("writer {i}").into_bytes(), mode).is_ok()
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).filter(|ok| *ok).count()
        };
        assert_eq!(won(Put::Create), 1, "round {round}: creates");
        let etag = clients[0].head(&key).unwrap().unwrap().etag.unwrap();
        assert_eq!(won(Put::Replace(etag)), 1, "round {round}: replaces");
    }
}

/// Runners on separate clients (as on separate machines) start at once,
/// again and again: at no moment do two hold the lock, and the ones that
/// lose are told who holds it.
#[test]
fn runners_racing_for_the_lock_never_both_hold_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = S3Server::start("127.0.0.1");
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
    let server = S3Server::start("127.0.0.1");
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
    raw.put(".offsite/lock", dead.to_vec(), Put::Overwrite).unwrap();
    let e = lock.confirm().unwrap_err();
    assert!(e.contains("taken over by site \"web1\" on gone"), "{e}");
    assert!(lock.is_lost());
    drop(lock);
    // Dropping a lost lock leaves the new holder's object alone.
    assert_eq!(raw.get(".offsite/lock").unwrap().unwrap().0, dead.to_vec());
}

#[test]
fn a_released_or_dropped_lock_is_free_at_once() {
    let server = S3Server::start("127.0.0.1");
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
