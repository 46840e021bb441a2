//! Per-kind campaign settings: the `[drivers.<kind>]` tables of a campaign
//! file. The producer validates them before publishing anything; each job
//! carries its kind's table; its driver reads it as a typed struct.
//!
//! A kind's settings are a struct here with `#[serde(deny_unknown_fields)]`,
//! so a misspelt key is an error at validation, not a silent default.
//! Secrets never appear here: passwords for backup hosts and backup
//! encryption come from the device's credentials reference.

use crate::DeviceKind;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Checks a kind's settings table, naming what is wrong.
pub fn validate(kind: DeviceKind, table: &serde_json::Value) -> Result<(), String> {
    kind.validate_settings(table)
}

/// Reads a kind's settings from a job's table (`null` gives the defaults).
pub fn read<T: DeserializeOwned + Default>(table: &serde_json::Value) -> Result<T, String> {
    if table.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(table.clone()).map_err(|e| e.to_string())
}

/// A kind's `[drivers.<kind>]` settings, as [`crate::kind`]'s list names
/// them for each kind.
pub trait KindSettings: DeserializeOwned + Default {
    /// What the types alone cannot say is wrong.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Reads and checks a table.
    fn validate(_kind: DeviceKind, table: &serde_json::Value) -> Result<(), String> {
        read::<Self>(table)?.check()
    }
}

/// The settings of a kind that takes none: an empty table or none at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct NoSettings {}

impl KindSettings for NoSettings {
    fn validate(kind: DeviceKind, table: &serde_json::Value) -> Result<(), String> {
        match table.as_object() {
            Some(map) if map.is_empty() => Ok(()),
            None if table.is_null() => Ok(()),
            _ => Err(format!("[drivers.{kind}] takes no settings")),
        }
    }
}

/// `[drivers.flowgateway]`: what a job does to a standalone Flow Gateway.
///
/// ```toml
/// [drivers.flowgateway]
/// operation = "backup"        # or "restore" (from the latest backup there)
/// no_cert = false             # restore only: the API's `no_cert`
/// [drivers.flowgateway.destination]
/// host = "backup.example.net" # "localhost" (the default) keeps it on the gateway
/// username = "mazu"
/// path = "/srv/backups/flowgateways"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowgatewaySettings {
    pub operation: GatewayOperation,
    pub destination: BackupDestination,
    /// Restore only: whether to leave the cloak key, SNMP and NTP settings in
    /// the vault compressed (the API's `no_cert`).
    pub no_cert: bool,
}

impl KindSettings for FlowgatewaySettings {
    fn check(&self) -> Result<(), String> {
        self.destination.check("destination")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayOperation {
    #[default]
    Backup,
    Restore,
}

/// `[drivers.netprofiler]`: how a NetProfiler's Flow Gateway update runs.
///
/// ```toml
/// [drivers.netprofiler]
/// backup_first = true   # back up every gateway of the row's `gateways` first
/// [drivers.netprofiler.backup]
/// host = "localhost"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetprofilerSettings {
    /// Back up each Flow Gateway listed in the inventory row, and start the
    /// update only once every backup is `COMPLETED`.
    pub backup_first: bool,
    pub backup: BackupDestination,
}

impl KindSettings for NetprofilerSettings {
    fn check(&self) -> Result<(), String> {
        self.backup.check("backup")
    }
}

/// `[drivers.npm]`: NPM system update 2.0.
///
/// ```toml
/// [drivers.npm]
/// delete_image = true
/// auth = "basic"   # appliances without the mgmt.aaa token login
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NpmSettings {
    /// Delete the update image from the appliance once the job is over
    /// (left in place when the update failed critically, for inspection).
    pub delete_image: bool,
    /// How the worker logs in to the appliance.
    pub auth: NpmAuth,
}

/// How NPM appliances take the reference's `username` and `password`. The
/// NPM document says nothing of authentication; real NPM appliances issue
/// tokens through `mgmt.aaa`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NpmAuth {
    /// `POST /api/mgmt.aaa/1.0/token`, then a bearer token.
    #[default]
    Token,
    /// HTTP Basic on every call.
    Basic,
}

impl KindSettings for NpmSettings {}

/// `[drivers.sps]`: One Identity SPS firmware upgrades.
///
/// ```toml
/// [drivers.sps]
/// commit_message = "Firmware 7.2.1, change CHG-1234"
/// restart_wait = "10m"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpsSettings {
    /// The commit log message of the upgrade. Appliances with
    /// `require_commit_log` refuse an upgrade without one; others record
    /// it when given.
    pub commit_message: Option<String>,
    /// How long after an accepted upgrade the appliance may take to restart
    /// into it by itself; past it the device ends "upgrade staged, restart
    /// pending", for a person to restart ([`SpsSettings::DEFAULT_RESTART_WAIT`]
    /// when unset).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub restart_wait: Option<std::time::Duration>,
}

impl SpsSettings {
    pub const DEFAULT_RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

    /// The wait for the restart after an accepted upgrade.
    pub fn restart_wait(&self) -> std::time::Duration {
        self.restart_wait.unwrap_or(Self::DEFAULT_RESTART_WAIT)
    }
}

impl KindSettings for SpsSettings {
    fn check(&self) -> Result<(), String> {
        match &self.commit_message {
            Some(message) if message.trim().is_empty() => {
                return Err("commit_message is empty (leave it out to send none)".to_owned());
            }
            _ => {}
        }
        if self.restart_wait.is_some_and(|wait| wait.is_zero()) {
            return Err("restart_wait must be longer than 0s".to_owned());
        }
        Ok(())
    }
}

/// Where a Flow Gateway writes a backup (or finds one to restore). The SSH
/// password (`backup_password`) and the backup's encryption password
/// (`security_password`) come from the credentials reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupDestination {
    /// A remote machine reached over SSH, or `localhost`: the gateway's own
    /// `/mnt/data/flowgateway-backup`.
    pub host: String,
    /// The SSH user on a remote host (the gateway uses `mazu` on localhost).
    pub username: Option<String>,
    /// The backup directory on a remote host.
    pub path: Option<String>,
}

impl Default for BackupDestination {
    fn default() -> Self {
        BackupDestination {
            host: LOCALHOST.to_owned(),
            username: None,
            path: None,
        }
    }
}

const LOCALHOST: &str = "localhost";

impl BackupDestination {
    pub fn is_local(&self) -> bool {
        self.host.eq_ignore_ascii_case(LOCALHOST)
    }

    fn check(&self, table: &str) -> Result<(), String> {
        if self.host.trim().is_empty() {
            return Err(format!("{table}.host is empty (use \"localhost\")"));
        }
        if !self.is_local() {
            for (key, value) in [("username", &self.username), ("path", &self.path)] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    return Err(format!(
                        "{table}.{key} is required for a backup on remote host {:?}",
                        self.host
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn riverbed_settings_are_typed_and_checked() {
        let ok = json!({"operation": "restore", "destination": {"host": "bk", "username": "mazu", "path": "/b"}});
        validate(DeviceKind::Flowgateway, &ok).unwrap();
        let settings: FlowgatewaySettings = read(&ok).unwrap();
        assert_eq!(settings.operation, GatewayOperation::Restore);

        let remote_without_path =
            json!({"backup_first": true, "backup": {"host": "bk", "username": "mazu"}});
        let error = validate(DeviceKind::Netprofiler, &remote_without_path).unwrap_err();
        assert!(error.contains("backup.path is required"), "{error}");

        let blank = json!({"commit_message": " "});
        let error = validate(DeviceKind::Sps, &blank).unwrap_err();
        assert!(error.contains("commit_message is empty"), "{error}");
        validate(DeviceKind::Sps, &json!({"commit_message": "CHG-1"})).unwrap();
        let sps: SpsSettings = read(&json!({"restart_wait": "90s"})).unwrap();
        assert_eq!(sps.restart_wait(), std::time::Duration::from_secs(90));
        assert_eq!(
            SpsSettings::default().restart_wait(),
            SpsSettings::DEFAULT_RESTART_WAIT
        );
        let error = validate(DeviceKind::Sps, &json!({"restart_wait": "0s"})).unwrap_err();
        assert!(error.contains("restart_wait"), "{error}");

        let npm: NpmSettings = read(&json!({"auth": "basic"})).unwrap();
        assert_eq!(npm.auth, NpmAuth::Basic);
        assert_eq!(NpmSettings::default().auth, NpmAuth::Token);
        let error = validate(DeviceKind::Npm, &json!({"auth": "kerberos"})).unwrap_err();
        assert!(error.contains("kerberos"), "{error}");

        let misspelt = json!({"delete_imag": true});
        let error = validate(DeviceKind::Npm, &misspelt).unwrap_err();
        assert!(error.contains("delete_imag"), "{error}");

        let defaults: NetprofilerSettings = read(&serde_json::Value::Null).unwrap();
        assert!(!defaults.backup_first);
        assert!(defaults.backup.is_local());
    }

    #[test]
    fn kinds_without_settings_refuse_them() {
        let error = validate(DeviceKind::Dms, &json!({"speed": 3})).unwrap_err();
        assert!(error.contains("takes no settings"), "{error}");
    }
}
