//! `noop`: does nothing, successfully. Used to measure the runner's own
//! start-up cost.

use offsite_sdk::{Result, Script, ScriptInfo};

struct Noop;

impl Script for Noop {
    fn describe() -> ScriptInfo {
        ScriptInfo::new("noop", env!("CARGO_PKG_VERSION")).description("Does nothing")
    }

    fn run() -> Result<()> {
        Ok(())
    }
}

offsite_sdk::script!(Noop);
