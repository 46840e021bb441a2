//! TLS to devices: which certificate authorities a device's HTTPS
//! certificate is checked against, and whether it is checked at all.
//!
//! The campaign decides it, per device group; the producer reads the CA
//! files and each job carries its device's [`TlsProfile`], so workers need no
//! campaign files of their own. A CA certificate is public: it may travel in
//! a message.

use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};

/// How a worker checks one device's HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TlsProfile {
    /// PEM certificates of the CAs the device's certificate must chain to.
    /// When given they are the only roots trusted (appliances carry
    /// certificates from the operator's CA, not the public web's);
    /// `None` trusts the platform's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// False only when the operator turned checks off for the device's
    /// group; every step event of such a device says so.
    #[serde(default = "checks_on", skip_serializing_if = "is_on")]
    pub verify: bool,
}

impl Default for TlsProfile {
    fn default() -> Self {
        TlsProfile {
            ca_pem: None,
            verify: true,
        }
    }
}

impl TlsProfile {
    /// Platform roots, checks on: what a job without TLS settings gets.
    pub fn is_default(&self) -> bool {
        *self == TlsProfile::default()
    }
}

fn checks_on() -> bool {
    true
}

fn is_on(verify: &bool) -> bool {
    *verify
}

/// Checks that `pem` holds at least one certificate and nothing unreadable;
/// returns how many certificates it holds.
pub fn count_pem_certificates(pem: &str) -> Result<usize, String> {
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        certificate.map_err(|e| format!("not a readable PEM certificate: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_profile_is_left_out_of_messages() {
        let json = serde_json::to_value(TlsProfile::default()).unwrap();
        assert_eq!(json, serde_json::json!({}));
        let off: TlsProfile = serde_json::from_value(serde_json::json!({"verify": false})).unwrap();
        assert!(!off.verify);
        assert!(!off.is_default());
    }

    #[test]
    fn pem_without_certificates_is_refused() {
        assert!(count_pem_certificates("hello").is_err());
        let bad = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(count_pem_certificates(bad).is_err());
    }
}
