//! The test's job key and the credentials the simulated fleet accepts.

use flotilla_common::signing::{KeyArgs, Keyring};
use flotilla_sim::Fleet;
use flotilla_worker::{CredentialStore, Credentials};
use rand::Rng;
use std::path::Path;

/// The test's job key id.
pub const TEST_KEY_ID: &str = "test";
/// Where the simulated fleet's credentials may go: its devices are all on
/// loopback addresses.
pub const FLEET_ALLOWED_HOSTS: &str = "127.0.0.0/8";

/// Writes a new random job key named `id` into `dir`, and returns the
/// settings that name it and the keyring they read.
pub fn job_key(dir: &Path, id: &str) -> (KeyArgs, Keyring) {
    let key: [u8; 32] = rand::rng().random();
    let path = dir.join(format!("job-key-{id}"));
    std::fs::write(&path, format!("{}\n", hex::encode(key))).expect("the temp dir is writable");
    let keys = KeyArgs {
        job_keys: Some(format!("{id}={}", path.display())),
        signing_key_id: None,
    };
    let keyring = keys.keyring().expect("a fresh key file reads");
    (keys, keyring)
}

/// The credentials the simulated fleet accepts, as workers resolve them:
/// a user and password, the secrets of Flow Gateway backups, and the
/// fleet's addresses as where they may go.
pub fn fleet_credentials(fleet: &Fleet) -> CredentialStore {
    CredentialStore::with_given([fleet_login(fleet)])
}

/// The fleet's credentials reference with every field its devices accept.
pub fn fleet_login(fleet: &Fleet) -> Credentials {
    let (user, password) = fleet.login();
    Credentials::new(flotilla_sim::CREDENTIALS_REFERENCE)
        .with("username", user)
        .with("password", password)
        .with("backup_password", fleet.backup_password())
        .with("security_password", "sim-backup-encryption-key")
        .with("allowed_hosts", FLEET_ALLOWED_HOSTS)
}
