use crate::{ParamSpec, ScriptInfo};

impl ScriptInfo {
    /// Starts the metadata of script `name` at `version` (use
    /// `env!("CARGO_PKG_VERSION")`).
    ///
    /// ```
    /// let info = offsite_sdk::ScriptInfo::new("arc", "0.1.0");
    /// assert_eq!(info.name, "arc");
    /// assert!(info.params.is_empty());
    /// ```
    pub fn new(name: &str, version: &str) -> ScriptInfo {
        ScriptInfo {
            name: name.to_string(),
            version: version.to_string(),
            description: String::new(),
            params: Vec::new(),
            capabilities: Vec::new(),
        }
    }

    /// Sets the one-line description shown by `offsite inspect`.
    ///
    /// ```
    /// let info = offsite_sdk::ScriptInfo::new("arc", "0.1.0").description("archives a directory");
    /// assert_eq!(info.description, "archives a directory");
    /// ```
    pub fn description(mut self, text: &str) -> ScriptInfo {
        self.description = text.to_string();
        self
    }

    /// Declares a parameter. Only declared parameters can be read, and the
    /// runner refuses to start when a required one has no value.
    ///
    /// ```
    /// use offsite_sdk::{Param, ScriptInfo};
    /// let info = ScriptInfo::new("arc", "0.1.0").param(Param::required("path", "what to archive"));
    /// assert!(info.params[0].required);
    /// ```
    pub fn param(mut self, param: impl Into<ParamSpec>) -> ScriptInfo {
        self.params.push(param.into());
        self
    }

    /// Declares the interfaces the script uses (`archive`, `clock`, `log`,
    /// `params`), so `offsite check` can compare them with a site's grants.
    ///
    /// ```
    /// let info = offsite_sdk::ScriptInfo::new("arc", "0.1.0").capabilities(["archive", "clock"]);
    /// assert_eq!(info.capabilities, ["archive", "clock"]);
    /// ```
    pub fn capabilities<I, S>(mut self, names: I) -> ScriptInfo
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.capabilities.extend(names.into_iter().map(Into::into));
        self
    }
}

/// Builder for a [`ParamSpec`].
///
/// ```
/// use offsite_sdk::Param;
/// let p: offsite_sdk::ParamSpec = Param::optional("format", "timestamp pattern")
///     .default("%Y%m%d-%H%M%S")
///     .into();
/// assert_eq!(p.default.as_deref(), Some("%Y%m%d-%H%M%S"));
/// ```
#[derive(Debug, Clone)]
pub struct Param(ParamSpec);

impl Param {
    /// A parameter the run cannot start without.
    ///
    /// ```
    /// let p = offsite_sdk::Param::required("path", "directory to archive");
    /// ```
    pub fn required(name: &str, description: &str) -> Param {
        Param(ParamSpec {
            name: name.to_string(),
            description: description.to_string(),
            required: true,
            default: None,
            secret: false,
        })
    }

    /// A parameter that may be left unset.
    ///
    /// ```
    /// let p = offsite_sdk::Param::optional("prefix", "name prefix; defaults to the directory name");
    /// ```
    pub fn optional(name: &str, description: &str) -> Param {
        let mut p = Param::required(name, description);
        p.0.required = false;
        p
    }

    /// The value used when neither the site nor `--param` sets one.
    ///
    /// ```
    /// let p = offsite_sdk::Param::optional("level", "gzip level").default("6");
    /// ```
    pub fn default(mut self, value: &str) -> Param {
        self.0.default = Some(value.to_string());
        self
    }

    /// Marks the value as secret: the runner never logs or reports it.
    ///
    /// ```
    /// let p = offsite_sdk::Param::required("token", "API token").secret();
    /// ```
    pub fn secret(mut self) -> Param {
        self.0.secret = true;
        self
    }
}

impl From<Param> for ParamSpec {
    fn from(p: Param) -> ParamSpec {
        p.0
    }
}
