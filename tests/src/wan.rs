//! A simulated wide-area link, for the WAN tests and `bench/run wan`.
//!
//! This kernel has `tbf` (a rate) but not `netem` (a delay), so the delay
//! is made here, at the packet level, where TCP sees it: two TUN devices,
//! and every IP packet one side sends comes out of the other side's device
//! half a round-trip time later. [`WanLink`] puts one device in a network
//! namespace of its own, where the test's servers run, gives both their
//! addresses and a `tbf` for the rate. [`Link::cut`] drops every packet
//! for a while, as a broken line does: both ends see their connections
//! stall, and time out.
//!
//! Needs root and `/dev/net/tun`, as CI has.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates the TUN device `name` in this thread's network namespace.
pub fn open_tun(name: &str) -> std::io::Result<File> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("{name}: a device name has at most 15 bytes")));
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Two TUN devices joined with a delay each way, by threads of this
/// process; they stop when the link is dropped.
pub struct Link {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    /// Milliseconds since `epoch` until which every packet is dropped.
    cut_until: AtomicU64,
    epoch: Instant,
    /// Bytes of IP packets delivered, `a` to `b` and `b` to `a`.
    carried: [AtomicU64; 2],
}

impl Shared {
    fn is_cut(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.cut_until.load(Ordering::Relaxed)
    }
}

/// Packets in flight in one direction, each with the instant it is due.
struct Line {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
    queued_bytes: AtomicUsize,
}

impl Link {
    /// Joins `a` and `b`: what one side sends comes out of the other
    /// `delay` later. At most `max_queue` bytes are in flight each way;
    /// beyond that packets are dropped, as by a router's full buffer.
    pub fn join(a: File, b: File, delay: Duration, max_queue: usize) -> std::io::Result<Link> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            cut_until: 0.into(),
            epoch: Instant::now(),
            carried: [0.into(), 0.into()],
        });
        let mut threads = Vec::new();
        for (way, (from, to)) in [(a.try_clone()?, b.try_clone()?), (b, a)].into_iter().enumerate() {
            let line =
                Arc::new(Line { queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), queued_bytes: 0.into() });
            let (sending, s1, s2) = (Arc::clone(&line), Arc::clone(&shared), Arc::clone(&shared));
            threads.push(std::thread::spawn(move || send(from, &sending, &s1, delay, max_queue)));
            threads.push(std::thread::spawn(move || deliver(to, &line, &s2, way)));
        }
        Ok(Link { shared, threads })
    }

    /// Drops every packet, both ways, for `how_long` from now.
    pub fn cut(&self, how_long: Duration) {
        let until = self.shared.epoch.elapsed() + how_long;
        self.shared.cut_until.store(until.as_millis() as u64, Ordering::Relaxed);
    }

    /// Ends a cut at once.
    pub fn mend(&self) {
        self.shared.cut_until.store(0, Ordering::Relaxed);
    }

    /// Bytes of IP packets delivered so far from `b` to `a`.
    pub fn carried_to_a(&self) -> u64 {
        self.shared.carried[1].load(Ordering::Relaxed)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

/// Reads packets from `from` and queues each, due `delay` later. Polls, so
/// that it sees the link stop.
fn send(mut from: File, line: &Line, shared: &Shared, delay: Duration, max_queue: usize) {
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 100) } <= 0 {
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if shared.is_cut() || line.queued_bytes.load(Ordering::Relaxed) + n > max_queue {
            continue;
        }
        line.queued_bytes.fetch_add(n, Ordering::Relaxed);
        line.queue.lock().unwrap().push_back((Instant::now() + delay, buf[..n].to_vec()));
        line.ready.notify_one();
    }
    line.ready.notify_all();
}

/// Writes each queued packet into `to` when it is due.
fn deliver(mut to: File, line: &Line, shared: &Shared, way: usize) {
    loop {
        let (due, packet) = {
            let mut queue = line.queue.lock().unwrap();
            loop {
                if let Some(first) = queue.pop_front() {
                    break first;
                }
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                queue = line.ready.wait_timeout(queue, Duration::from_millis(100)).unwrap().0;
            }
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        line.queued_bytes.fetch_sub(packet.len(), Ordering::Relaxed);
        if shared.is_cut() {
            continue;
        }
        // A device that is down refuses packets: they are lost, as on a line.
        if to.write(&packet).is_ok() {
            shared.carried[way].fetch_add(packet.len() as u64, Ordering::Relaxed);
        }
    }
}

/// A server side behind a simulated WAN: a network namespace reached from
/// this one through a [`Link`], with a `tbf` rate on both devices. Each
/// one takes a slot of its own (its devices, namespace and addresses),
/// held by a lock file, so tests in parallel and in several processes do
/// not meet.
pub struct WanLink {
    link: Option<Link>,
    ns: String,
    /// This side's address and the server side's.
    pub here: Ipv4Addr,
    pub there: Ipv4Addr,
    _slot: crate::shared::Turn,
}

impl WanLink {
    /// A link of round-trip time `rtt` and `mbit` Mbit/s each way.
    pub fn start(rtt: Duration, mbit: u32) -> WanLink {
        let (slot, turn) = (1..=200u32)
            .find_map(|n| crate::shared::try_turn(&format!("wan-slot-{n}")).map(|t| (n, t)))
            .expect("a free WAN slot (200 in use?)");
        let ns = format!("offsite-wan-{slot}");
        let (dev_a, dev_b) = (format!("ow{slot}a"), format!("ow{slot}b"));
        let (here, there) = (Ipv4Addr::new(10, 78, slot as u8, 1), Ipv4Addr::new(10, 78, slot as u8, 2));
        // Whatever a killed test process left in this slot goes first.
        remove_namespace(&ns);
        let _ = Command::new("ip").args(["link", "del", &dev_a]).stderr(std::process::Stdio::null()).status();
        run(&["ip", "netns", "add", &ns]);
        let a = open_tun(&dev_a).unwrap_or_else(|e| panic!("create TUN device {dev_a}: {e}"));
        let b = open_tun(&dev_b).unwrap_or_else(|e| panic!("create TUN device {dev_b}: {e}"));
        let link = Link::join(a, b, rtt / 2, 64 << 20).expect("join the TUN devices");
        let rate = u64::from(mbit) * 1_000_000 / 8;
        let burst = (rate / 100).max(64 << 10).to_string();
        let limit = (rate * rtt.as_millis() as u64 / 1000).max(1 << 20).to_string();
        let rate = format!("{mbit}mbit");
        let (h, t) = (here.to_string(), there.to_string());
        run(&["ip", "link", "set", &dev_b, "netns", &ns]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run(&["ip", "addr", "add", &h, "peer", &t, "dev", &dev_a]);
        run(&["ip", "link", "set", &dev_a, "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &t, "peer", &h, "dev", &dev_b]);
        run(&["ip", "-n", &ns, "link", "set", &dev_b, "up"]);
        let tbf = ["root", "tbf", "rate", &rate, "burst", &burst, "limit", &limit];
        run(&[&["tc", "qdisc", "replace", "dev", &dev_a][..], &tbf].concat());
        run(&[&["tc", "-n", &ns, "qdisc", "replace", "dev", &dev_b][..], &tbf].concat());
        WanLink { link: Some(link), ns, here, there, _slot: turn }
    }

    /// The server side's network namespace (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// Drops every packet, both ways, for `how_long` from now.
    pub fn cut(&self, how_long: Duration) {
        self.link.as_ref().expect("running").cut(how_long);
    }

    /// Ends a cut at once.
    pub fn mend(&self) {
        self.link.as_ref().expect("running").mend();
    }

    /// Bytes of IP packets (headers included) the link has carried from
    /// the server side to this one.
    pub fn carried_here(&self) -> u64 {
        self.link.as_ref().expect("running").carried_to_a()
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        remove_namespace(&self.ns);
        // The devices go with the link's descriptors.
        drop(self.link.take());
    }
}

/// Kills what runs in the namespace `ns` (servers, their sessions) and
/// removes it.
fn remove_namespace(ns: &str) {
    let pids = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| o.stdout).unwrap_or_default();
    for pid in String::from_utf8_lossy(&pids).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: a signal to a process of the namespace this test made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(std::process::Stdio::null()).status();
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(out.status.success(), "{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
