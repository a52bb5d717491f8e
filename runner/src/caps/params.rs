use super::Caps;
use crate::bindings::params::Host;
use crate::bindings::types::Error;
use crate::policy::Call;

impl Host for Caps {
    fn get(&mut self, name: String) -> Result<Option<String>, Error> {
        self.decide(Call::ParamGet { name: &name })?;
        Ok(self.policy.param(&name).and_then(|p| p.value.clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::caps::Clock;
    use crate::policy::{ParamGrant, Policy};
    use crate::site::Site;

    #[test]
    fn declared_params_are_readable_and_others_are_denied() {
        let site = Site::current_dir(&std::env::temp_dir()).unwrap();
        let params = BTreeMap::from([
            ("path".to_string(), ParamGrant { value: Some("beoserver".into()), secret: false }),
            ("unset".to_string(), ParamGrant { value: None, secret: false }),
        ]);
        let mut caps = Caps::new("t", "s", Policy::for_site(&site, params), Clock::System);
        assert_eq!(caps.get("path".into()).unwrap(), Some("beoserver".into()));
        assert_eq!(caps.get("unset".into()).unwrap(), None);
        assert!(matches!(caps.get("undeclared".into()), Err(Error::Denied(_))));
        assert_eq!(caps.denials, 1);
    }
}
