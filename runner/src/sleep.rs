//! WASI sleeps that end at the run's deadline and when the run must stop.
//!
//! A script that sleeps (`std::thread::sleep`, a retry back-off) blocks in
//! a host call, `wasi:io/poll` on a `wasi:clocks/monotonic-clock` timer,
//! and wasmtime's epochs do not interrupt host calls: a script sleeping for
//! a day would sit out its deadline and any SIGTERM. So the monotonic
//! clock's `subscribe-*` functions are replaced here by timers that also
//! wake at the deadline and, within [`STOP_POLL`], on a stop request
//! (crate::abort). The script then runs on, and the next epoch tick traps
//! it. A sleep that neither reaches the deadline nor meets a stop is as long
//! as asked. `now` is replaced too, so `subscribe-instant` and `now` share
//! one clock: nanoseconds since the store was made.

use std::time::{Duration, Instant};

use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use crate::engine::RunState;

/// The `wasi:clocks` version whose functions are replaced (the one
/// wasmtime-wasi defines; guests importing any 0.2.x are matched to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";
/// How soon a sleeping script notices a stop request.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// Replaces the monotonic clock's `now`, `subscribe-duration` and
/// `subscribe-instant` in `linker` (which must already hold WASI's).
pub fn add_to_linker(linker: &mut Linker<RunState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("now", |store, (): ()| Ok((store.data().clock_base.elapsed().as_nanos() as u64,)))?;
    clock.func_wrap("subscribe-duration", |mut store, (nanos,): (u64,)| {
        let until = Instant::now().checked_add(Duration::from_nanos(nanos));
        Ok((nap(store.data_mut(), until)?,))
    })?;
    clock.func_wrap("subscribe-instant", |mut store, (when,): (u64,)| {
        let until = store.data().clock_base.checked_add(Duration::from_nanos(when));
        Ok((nap(store.data_mut(), until)?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A timer until `until` (`None`: beyond any representable time).
fn nap(state: &mut RunState, until: Option<Instant>) -> wasmtime::Result<Resource<DynPollable>> {
    let nap = Nap { until, deadline: state.deadline, yielded: false };
    let resource = state.table.push(nap)?;
    subscribe(&mut state.table, resource)
}

struct Nap {
    until: Option<Instant>,
    deadline: Instant,
    yielded: bool,
}

#[async_trait::async_trait]
impl Pollable for Nap {
    async fn ready(&mut self) {
        loop {
            let now = Instant::now();
            let end = self.until.map_or(self.deadline, |u| u.min(self.deadline));
            if now >= end || crate::abort::requested() {
                // A timer that is already due still yields once, as WASI's
                // own does, so a guest polling in a loop cannot starve the
                // executor.
                if !self.yielded {
                    self.yielded = true;
                    tokio::task::yield_now().await;
                }
                return;
            }
            let wake = end.min(now + STOP_POLL);
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        }
    }
}
