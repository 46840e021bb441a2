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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NpmSettings {
    /// Delete the update image from the appliance once the job is over
    /// (left in place when the update failed critically, for inspection).
    pub delete_image: bool,
}

impl KindSettings for NpmSettings {}

/// `[drivers.sps]`: One Identity SPS firmware upgrades.
///
/// ```toml
/// [drivers.sps]
/// commit_message = "Firmware 7.2.1, change CHG-1234"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpsSettings {
    /// The commit log message of the upgrade. Appliances with
    /// `require_commit_log` refuse an upgrade without one; others record
    /// it when given.
    pub commit_message: Option<String>,
}

impl KindSettings for SpsSettings {
    fn check(&self) -> Result<(), String> {
        match &self.commit_message {
            Some(message) if message.trim().is_empty() => {
                Err("commit_message is empty (leave it out to send none)".to_owned())
            }
            _ => Ok(()),
        }
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
