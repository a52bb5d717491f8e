//! `offsite-wan-link`: two TUN devices joined with a delay each way (see
//! `offsite_testkit::wan`), for `bench/run wan`, which sets up the
//! namespace, the addresses and the rate around it.
//!
//! ```text
//! offsite-wan-link DEV_A DEV_B DELAY_MS
//! ```
//!
//! Prints `ready` once both devices exist, then runs until killed.
//! `SIGUSR1` cuts the link for `CUT_MS` (environment, default 20000) and
//! `SIGUSR2` mends it. At most `QUEUE_MIB` (default 64) are in flight
//! each way.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use offsite_testkit::wan::{Link, open_tun};

/// The last of SIGUSR1/SIGUSR2 received, until the main loop takes it.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::Relaxed);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: offsite-wan-link DEV_A DEV_B DELAY_MS");
        std::process::exit(2);
    }
    let delay = Duration::from_millis(args[3].parse().expect("DELAY_MS is a number of milliseconds"));
    let number = |name: &str, default: u64| -> u64 {
        std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number"))).unwrap_or(default)
    };
    let cut = Duration::from_millis(number("CUT_MS", 20_000));
    let queue = (number("QUEUE_MIB", 64) << 20) as usize;
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, handler as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, handler as libc::sighandler_t);
    }
    let a = open_tun(&args[1]).unwrap_or_else(|e| panic!("cannot create TUN device {}: {e}", args[1]));
    let b = open_tun(&args[2]).unwrap_or_else(|e| panic!("cannot create TUN device {}: {e}", args[2]));
    let link = Link::join(a, b, delay, queue).expect("join the devices");
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        match SIGNAL.swap(0, Ordering::Relaxed) {
            libc::SIGUSR1 => link.cut(cut),
            libc::SIGUSR2 => link.mend(),
            _ => {}
        }
    }
}
