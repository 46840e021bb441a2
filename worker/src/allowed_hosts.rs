//! Where a credentials reference may be sent: its `allowed_hosts`.
//!
//! A job names its device's address and a credentials reference, and a
//! worker sends that reference's secrets to that address. So that no job
//! (a forged one, or an inventory row pointing a production reference at a
//! lab box) can send them elsewhere, each reference lists the hosts it may
//! go to, as one more of its fields: `FLOTILLA_CREDENTIALS_<REF>_ALLOWED_HOSTS`
//! or the file `$FLOTILLA_CREDENTIALS_DIR/<ref>/allowed_hosts`, a
//! comma-separated list of
//!
//! - host names (`dms.example.net`), matched as the inventory writes them,
//!   in any case, without a DNS lookup;
//! - `*.example.net`: any name under `example.net` (not itself);
//! - IP addresses (`10.0.0.5`, `::1` or `[::1]`) and networks in CIDR
//!   notation (`10.20.0.0/16`, `fd00::/8`), matched against addresses the
//!   inventory writes as IPs (an IPv4-mapped IPv6 address as its IPv4).
//!
//! Every host a job names (the device's address and, for a NetProfiler,
//! its gateways) must be allowed before its step runs, so no connection is
//! made to any other. A reference without the field is allowed nowhere.

use crate::{credentials::Credentials, driver::StepError};
use flotilla_common::Device;
use ipnet::IpNet;
use std::net::IpAddr;
use url::{Host, Url};

/// The credentials field that lists the allowed hosts.
pub(crate) const FIELD: &str = "allowed_hosts";

/// One entry of an `allowed_hosts` list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    Name(String),
    /// `*.suffix`: names ending in `.suffix`.
    Under(String),
    Net(IpNet),
}

/// Checks that every host `device` names may receive `credentials`. A host
/// outside the list fails the job (`auth`); a worker without the list, or
/// with one it cannot read, lacks a setting (`config`, retried: another
/// worker may have it).
pub(crate) fn check(credentials: &Credentials, device: &Device) -> Result<(), StepError> {
    let reference = credentials.reference();
    let setting = || {
        format!(
            "FLOTILLA_CREDENTIALS_{}_ALLOWED_HOSTS",
            crate::credentials::env_name(reference)
        )
    };
    let Some(list) = credentials.get(FIELD) else {
        return Err(StepError::worker_lacks(format!(
            "credentials {reference:?} name no hosts they may be sent to on this worker \
             (set {} or the file {reference}/{FIELD}); no connection was made",
            setting()
        )));
    };
    let allowed = parse(list.expose()).map_err(|entry| {
        StepError::worker_lacks(format!(
            "credentials {reference:?}: {entry:?} in {FIELD} is neither a host name, \
             *.domain, an IP address nor a network like 10.0.0.0/8"
        ))
    })?;
    for url in std::iter::once(&device.address).chain(&device.gateways) {
        if !allows(&allowed, url) {
            let host = url.host_str().unwrap_or("(no host)");
            return Err(StepError::auth(format!(
                "credentials {reference:?} may not be sent to {host}: it is not among their \
                 allowed hosts ({}); no connection was made",
                setting()
            )));
        }
    }
    Ok(())
}

/// Reads a list; the entry that cannot be read is the error.
fn parse(list: &str) -> Result<Vec<Allowed>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| parse_entry(entry).ok_or_else(|| entry.to_owned()))
        .collect()
}

fn parse_entry(entry: &str) -> Option<Allowed> {
    let bare = entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(entry);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(Allowed::Net(IpNet::from(canonical_ip(ip))));
    }
    if entry.contains('/') {
        let net: IpNet = entry.parse().ok()?;
        return Some(Allowed::Net(net.trunc()));
    }
    let name = normal_name(entry);
    if let Some(suffix) = name.strip_prefix("*.") {
        return is_name(suffix).then(|| Allowed::Under(suffix.to_owned()));
    }
    is_name(&name).then_some(Allowed::Name(name))
}

fn allows(allowed: &[Allowed], url: &Url) -> bool {
    let host = match url.host() {
        None => return false,
        Some(Host::Domain(name)) => Host::Domain(normal_name(name)),
        Some(Host::Ipv4(ip)) => Host::Ipv4(ip),
        Some(Host::Ipv6(ip)) => Host::Ipv6(ip),
    };
    allowed.iter().any(|entry| match (entry, &host) {
        (Allowed::Name(allowed), Host::Domain(name)) => allowed == name,
        (Allowed::Under(suffix), Host::Domain(name)) => name
            .strip_suffix(suffix.as_str())
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        (Allowed::Net(net), Host::Ipv4(ip)) => net.contains(&IpAddr::V4(*ip)),
        (Allowed::Net(net), Host::Ipv6(ip)) => net.contains(&canonical_ip(IpAddr::V6(*ip))),
        _ => false,
    })
}

/// An IPv4-mapped IPv6 address is the IPv4 address it maps.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Lower case, without the root's trailing dot.
fn normal_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::{DeviceKind, ErrorClass};

    fn device(address: &str, gateways: &[&str]) -> Device {
        Device {
            id: "np-1".into(),
            kind: DeviceKind::Netprofiler,
            address: address.parse().unwrap(),
            credentials: "lab".into(),
            cpe_id: None,
            group: None,
            gateways: gateways.iter().map(|g| g.parse().unwrap()).collect(),
        }
    }

    fn allowed(list: &str, address: &str) -> bool {
        let credentials = Credentials::new("lab").with(FIELD, list);
        check(&credentials, &device(address, &[])).is_ok()
    }

    #[test]
    fn names_addresses_and_networks_match_as_documented() {
        let list =
            "dms.example.net, *.lab.example.net, 10.20.0.0/16, 192.0.2.7, [2001:db8::1], fd00::/8";
        for yes in [
            "https://dms.example.net/api",
            "https://DMS.Example.NET./api",
            "http://npm-3.lab.example.net:8080/",
            "http://a.b.lab.example.net/",
            "http://10.20.255.1/",
            "http://192.0.2.7:9000/d/cpe-1",
            "http://[2001:db8::1]/",
            "http://[fd12::5]/",
            "http://[::ffff:10.20.0.9]/",
        ] {
            assert!(allowed(list, yes), "{yes} should be allowed by {list}");
        }
        for no in [
            "https://dms.example.net.evil.org/",
            "https://evil-dms.example.net/",
            "http://lab.example.net/",
            "http://xlab.example.net/",
            "http://10.21.0.1/",
            "http://192.0.2.8/",
            "http://[2001:db8::2]/",
            // Names are not resolved: an allowed network says nothing of them.
            "http://localhost/",
        ] {
            assert!(!allowed(list, no), "{no} should not be allowed by {list}");
        }
        assert!(allowed("127.0.0.0/8", "http://127.0.0.44:1234/"));
        assert!(allowed("127.1.2.3/8", "http://127.0.0.44:1234/"));
    }

    #[test]
    fn a_host_outside_the_list_fails_auth_naming_the_reference_and_host() {
        let credentials = Credentials::new("lab")
            .with(FIELD, "10.0.0.1")
            .with("password", "hunter2");
        let error = check(
            &credentials,
            &device(
                "http://10.0.0.1/",
                &["https://10.0.0.1/", "https://10.9.9.9/"],
            ),
        )
        .unwrap_err();
        assert!(
            matches!(&error, StepError::Fail(f) if f.class == ErrorClass::Auth),
            "{error:?}"
        );
        let message = error.message();
        assert!(message.contains("\"lab\""), "{message}");
        assert!(message.contains("10.9.9.9"), "{message}");
        assert!(
            message.contains("FLOTILLA_CREDENTIALS_LAB_ALLOWED_HOSTS"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn no_list_or_an_unreadable_one_allows_nothing() {
        let unset = check(&Credentials::new("lab"), &device("http://10.0.0.1/", &[])).unwrap_err();
        assert!(
            matches!(
                &unset,
                StepError::Retry {
                    class: ErrorClass::Config,
                    ..
                }
            ),
            "{unset:?}"
        );
        assert!(unset.message().contains("ALLOWED_HOSTS"), "{unset}");
        for bad in [
            "10.0.0.0/33",
            "exa mple.net",
            "*.",
            "*",
            "a..b",
            "http://x/",
        ] {
            let credentials = Credentials::new("lab").with(FIELD, bad);
            let error = check(&credentials, &device("http://10.0.0.1/", &[])).unwrap_err();
            assert!(
                matches!(
                    &error,
                    StepError::Retry {
                        class: ErrorClass::Config,
                        ..
                    }
                ),
                "{bad}: {error:?}"
            );
            assert!(error.message().contains(bad), "{error}");
        }
        assert!(!allowed("", "http://10.0.0.1/"));
        assert!(!allowed(" , ", "http://10.0.0.1/"));
    }
}
