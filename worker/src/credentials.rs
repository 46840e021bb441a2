//! Secrets, resolved by the worker from a credentials reference.
//!
//! Jobs name a reference (`dms-east`), never a secret. A worker finds the
//! reference's fields (`username`, `password`, and driver-specific ones such
//! as `backup_password`) in, by order:
//!
//! 1. secrets given in code (the demo and tests);
//! 2. files `$FLOTILLA_CREDENTIALS_DIR/<reference>/<field>`, the layout of a
//!    Kubernetes Secret mounted per reference;
//! 3. variables `FLOTILLA_CREDENTIALS_<REFERENCE>_<FIELD>`, upper-cased with
//!    `-` and `.` turned into `_`.
//!
//! Values are read when needed, so a rotated Secret takes effect without a
//! restart. A [`Secret`] never prints its value. One field is no secret:
//! `allowed_hosts`, where the reference may be sent (`crate::allowed_hosts`).

use crate::driver::StepError;
use std::{collections::HashMap, fmt, path::PathBuf, sync::Arc};

pub const ENV_CREDENTIALS_DIR: &str = "FLOTILLA_CREDENTIALS_DIR";
const ENV_CREDENTIALS_PREFIX: &str = "FLOTILLA_CREDENTIALS_";

/// A secret value. `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it to a device.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The fields of one credentials reference.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    reference: String,
    fields: HashMap<String, Secret>,
}

impl Credentials {
    pub fn new(reference: impl Into<String>) -> Self {
        Credentials {
            reference: reference.into(),
            fields: HashMap::new(),
        }
    }

    pub fn with(mut self, field: &str, value: impl Into<String>) -> Self {
        self.fields.insert(field.to_owned(), Secret::new(value));
        self
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    pub fn get(&self, field: &str) -> Option<&Secret> {
        self.fields.get(field)
    }

    /// The field, or a config error naming the reference and field (never a
    /// value).
    pub(crate) fn require(&self, field: &str) -> Result<&Secret, StepError> {
        self.get(field).ok_or_else(|| {
            StepError::worker_lacks(format!(
                "credentials {:?} have no {field:?} on this worker",
                self.reference
            ))
        })
    }
}

/// Where a worker looks credentials up.
#[derive(Clone, Default)]
pub struct CredentialStore {
    given: Arc<HashMap<String, Credentials>>,
    dir: Option<PathBuf>,
    read_env: bool,
}

impl fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialStore")
            .field("given", &self.given.keys().collect::<Vec<_>>())
            .field("dir", &self.dir)
            .field("read_env", &self.read_env)
            .finish()
    }
}

impl CredentialStore {
    /// Files under `FLOTILLA_CREDENTIALS_DIR` (if set) and environment
    /// variables.
    pub fn from_env() -> Self {
        CredentialStore {
            given: Arc::default(),
            dir: std::env::var_os(ENV_CREDENTIALS_DIR).map(PathBuf::from),
            read_env: true,
        }
    }

    /// Only the credentials given here (for tests and the demo).
    pub fn with_given(credentials: impl IntoIterator<Item = Credentials>) -> Self {
        CredentialStore {
            given: Arc::new(
                credentials
                    .into_iter()
                    .map(|c| (c.reference.clone(), c))
                    .collect(),
            ),
            dir: None,
            read_env: false,
        }
    }

    /// Every field found for `reference`. An unknown reference resolves to
    /// no fields; the step that needs one says which is missing.
    pub fn resolve(&self, reference: &str) -> Credentials {
        if let Some(given) = self.given.get(reference) {
            return given.clone();
        }
        let mut credentials = Credentials::new(reference);
        if !flotilla_common::job::is_valid_credentials_reference(reference) {
            return credentials;
        }
        if let Some(dir) = &self.dir
            && let Ok(entries) = std::fs::read_dir(dir.join(reference))
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Kubernetes mounts keep `..data` links beside the real files.
                if name.starts_with('.') {
                    continue;
                }
                if let Ok(value) = std::fs::read_to_string(entry.path()) {
                    let value = value.trim_end_matches(['\n', '\r']).to_owned();
                    credentials.fields.insert(name, Secret(value));
                }
            }
        }
        if self.read_env {
            let prefix = format!("{ENV_CREDENTIALS_PREFIX}{}_", env_name(reference));
            for (field, value) in env_fields(&prefix, std::env::vars_os()) {
                credentials.fields.entry(field).or_insert(value);
            }
        }
        credentials
    }
}

/// The fields under `prefix` among `vars`. `std::env::vars` panics on the
/// first variable that is not UTF-8, whoever set it; one of ours that is
/// not is left out with a warning naming it, so the step reports the field
/// as missing.
fn env_fields(
    prefix: &str,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(String, Secret)> {
    let mut fields = Vec::new();
    for (key, value) in vars {
        let Some(field) = key.to_str().and_then(|key| key.strip_prefix(prefix)) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => fields.push((field.to_ascii_lowercase(), Secret(value))),
            Err(_) => tracing::warn!(
                variable = %key.to_string_lossy(),
                "credentials variable is not UTF-8; ignored"
            ),
        }
    }
    fields
}

pub(crate) fn env_name(reference: &str) -> String {
    reference
        .chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn variables_that_are_not_utf8_are_skipped_not_fatal() {
        use std::{ffi::OsString, os::unix::ffi::OsStringExt};
        let vars = vec![
            (OsString::from("LANG"), OsString::from_vec(vec![0xff, 0xfe])),
            (OsString::from_vec(vec![b'X', 0xff]), OsString::from("x")),
            (
                OsString::from("FLOTILLA_CREDENTIALS_DMS_PASSWORD"),
                OsString::from_vec(vec![b'p', 0xff]),
            ),
            (
                OsString::from("FLOTILLA_CREDENTIALS_DMS_USERNAME"),
                OsString::from("acs"),
            ),
        ];
        let fields = env_fields("FLOTILLA_CREDENTIALS_DMS_", vars.into_iter());
        let names: Vec<&str> = fields.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["username"]);
        assert_eq!(fields[0].1.expose(), "acs");
    }

    #[test]
    fn secrets_never_print() {
        let credentials = Credentials::new("dms-east").with("password", "hunter2");
        let printed = format!("{credentials:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(credentials.require("password").unwrap().expose(), "hunter2");
        let missing = credentials.require("username").unwrap_err();
        assert!(
            matches!(
                missing,
                StepError::Retry {
                    class: flotilla_common::ErrorClass::Config,
                    ..
                }
            ),
            "{missing:?}"
        );
        assert!(
            missing.message().contains("\"dms-east\""),
            "{}",
            missing.message()
        );
        assert!(!missing.message().contains("hunter2"));
    }

    #[test]
    fn files_are_read_per_reference_and_paths_cannot_escape() {
        let dir = std::env::temp_dir().join(format!("flotilla-creds-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("npm-lab")).unwrap();
        std::fs::write(dir.join("npm-lab/username"), "admin\n").unwrap();
        std::fs::write(dir.join("npm-lab/password"), "s3cret").unwrap();
        let store = CredentialStore {
            given: Arc::default(),
            dir: Some(dir.clone()),
            read_env: false,
        };
        let credentials = store.resolve("npm-lab");
        assert_eq!(credentials.get("username").unwrap().expose(), "admin");
        assert_eq!(credentials.get("password").unwrap().expose(), "s3cret");
        assert!(store.resolve("../npm-lab").get("username").is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
