//! Signed jobs: a message on the jobs queue is not proof that a Flotilla
//! process wrote it (any broker user with write access can publish one), so
//! every job message carries an HMAC-SHA256 signature by a job key, and
//! workers act on none that does not verify.
//!
//! The producer signs the jobs it publishes; workers sign the follow-ups
//! they publish (the next step, a delay, a parking) with the same keyring.
//! The signature and the id of the key that made it travel in the headers
//! [`SIGNATURE`] and [`KEY_ID`]. A keyring holds several keys, so keys
//! rotate without a stop: every process verifies with any key it holds and
//! signs with one, [`Keyring::signing_key_id`].
//!
//! # What is signed
//!
//! The canonical bytes, exactly:
//!
//! ```text
//! flotilla-job-signature-v1\n
//! key-id: <the key id>\n
//! x-flotilla-due-ms: <the header as a decimal integer, or "none">\n
//! \n
//! <the message body, byte for byte>
//! ```
//!
//! The body is all a step acts on: the device, its address, its
//! credentials reference, the image, TLS checks, the driver's settings and
//! step. The due-at header decides when it acts (a job back from a delay
//! queue early waits again), read as workers read it ([`headers::get_int`]),
//! so what is signed is what a worker will do. Left out on purpose:
//! `x-flotilla-returns` and the dead-letter headers are bookkeeping that
//! workers and `flotilla-producer dead redrive` rewrite without a key;
//! `x-delivery-count` is the broker's own; the fence's hop headers
//! (`x-flotilla-hop`, new at every publish, and `x-flotilla-after-hop`)
//! can only make a worker drop a redelivery, never act; trace context only
//! labels traces. The key id is signed too, so a signature cannot be passed off
//! as another key's.
//!
//! A signature says who wrote a message, not that it is new: anyone who can
//! publish can put a copy of a signed job back on the queue as it was.
//!
//! # Where keys come from
//!
//! `FLOTILLA_JOB_KEYS` lists the keys as `id=path` pairs, comma-separated
//! (`2026a=/run/secrets/job-key-2026a,2026b=/run/secrets/job-key-2026b`),
//! each file holding one key of at least [`MIN_KEY_BYTES`] bytes (trailing
//! newlines are not part of it), as a mounted Secret does.
//! `FLOTILLA_JOB_SIGNING_KEY_ID` names the key to sign with; it may be left
//! out when there is only one. Keys are never in environment variables
//! (which `/proc`, `docker inspect` and crash reports show) and never
//! printed: a [`Keyring`] shows its key ids only.

use crate::headers;
use hmac::{Hmac, Mac};
use lapin::types::FieldTable;
use sha2::Sha256;
use std::{collections::BTreeMap, fmt, path::PathBuf, sync::Arc};

/// The header holding a job message's signature, lowercase hex.
pub const SIGNATURE: &str = "x-flotilla-signature";
/// The header naming the key that signed a job message.
pub const KEY_ID: &str = "x-flotilla-key-id";

pub const ENV_JOB_KEYS: &str = "FLOTILLA_JOB_KEYS";
pub const ENV_SIGNING_KEY_ID: &str = "FLOTILLA_JOB_SIGNING_KEY_ID";
/// 256 bits, the strength of HMAC-SHA256 itself.
pub const MIN_KEY_BYTES: usize = 32;

/// The first line of the canonical bytes: names this scheme, so that bytes
/// signed for anything else never verify as a job.
const DOMAIN: &[u8] = b"flotilla-job-signature-v1\n";

type HmacSha256 = Hmac<Sha256>;

/// Where a process's job keys are, from its flags or environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Job signing keys, as `id=path` pairs separated by commas; each file
    /// holds one key (at least 32 bytes, e.g. `openssl rand -hex 32`).
    /// Every job message is signed and verified with these.
    #[arg(long = "job-keys", env = ENV_JOB_KEYS)]
    pub job_keys: Option<String>,

    /// The key id to sign with; needed when there are several keys.
    #[arg(long = "job-signing-key-id", env = ENV_SIGNING_KEY_ID)]
    pub signing_key_id: Option<String>,
}

impl KeyArgs {
    /// Reads every key file. No key is an error: nothing may run unsigned.
    pub fn keyring(&self) -> Result<Keyring, KeyringError> {
        let list = self.job_keys.as_deref().unwrap_or("").trim();
        if list.is_empty() {
            return Err(KeyringError::NoKeys);
        }
        let mut keys = Vec::new();
        for (id, path) in parse_key_list(list)? {
            let bytes = std::fs::read(&path).map_err(|source| KeyringError::Unreadable {
                id: id.clone(),
                path: path.clone(),
                source,
            })?;
            let key = trim_key(bytes);
            if key.len() < MIN_KEY_BYTES {
                return Err(KeyringError::TooShort {
                    id,
                    path,
                    len: key.len(),
                });
            }
            keys.push((id, key));
        }
        Keyring::new(keys, self.signing_key_id.as_deref())
    }
}

/// Reads `id=path[,id=path...]`.
fn parse_key_list(list: &str) -> Result<Vec<(String, PathBuf)>, KeyringError> {
    let mut pairs: Vec<(String, PathBuf)> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((id, path)) = item.split_once('=') else {
            return Err(KeyringError::BadEntry(item.to_owned()));
        };
        let (id, path) = (id.trim(), path.trim());
        check_key_id(id)?;
        if path.is_empty() {
            return Err(KeyringError::BadEntry(item.to_owned()));
        }
        if pairs.iter().any(|(known, _)| known == id) {
            return Err(KeyringError::DuplicateId(id.to_owned()));
        }
        pairs.push((id.to_owned(), PathBuf::from(path)));
    }
    Ok(pairs)
}

/// A key file's content without the line end an editor or `echo` adds.
fn trim_key(mut bytes: Vec<u8>) -> Vec<u8> {
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    bytes
}

/// Key ids travel in a header and name files in docs: letters, digits,
/// `.`, `_` and `-`, at most 64.
fn check_key_id(id: &str) -> Result<(), KeyringError> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(KeyringError::BadId(id.to_owned()))
    }
}

/// Why a process cannot have its keyring. Names ids and paths, never a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(
        "no job signing key: set {ENV_JOB_KEYS}=<id>=<file> (a file of at least \
         {MIN_KEY_BYTES} random bytes, e.g. `openssl rand -hex 32`), the same keys on the \
         producer and every worker; Flotilla does not run unsigned jobs"
    )]
    NoKeys,
    #[error("{ENV_JOB_KEYS}: {0:?} is not <id>=<file>")]
    BadEntry(String),
    #[error("{ENV_JOB_KEYS}: key id {0:?} must be 1 to 64 letters, digits, '.', '_' or '-'")]
    BadId(String),
    #[error("{ENV_JOB_KEYS}: key id {0:?} is listed twice")]
    DuplicateId(String),
    #[error("cannot read job key {id:?} from {}: {source}", path.display())]
    Unreadable {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "job key {id:?} in {} is {len} bytes; a key needs at least {MIN_KEY_BYTES} \
         (`openssl rand -hex 32` writes 64)", path.display()
    )]
    TooShort {
        id: String,
        path: PathBuf,
        len: usize,
    },
    #[error("{ENV_SIGNING_KEY_ID} names key {id:?}, which is not among the job keys ({known})")]
    UnknownSigningKey { id: String, known: String },
    #[error("several job keys ({known}): set {ENV_SIGNING_KEY_ID} to the one to sign with")]
    SigningKeyRequired { known: String },
}

/// The job keys a process holds: it verifies with any of them and signs
/// with one. Cheap to clone. `Debug` shows the key ids only.
#[derive(Clone)]
pub struct Keyring {
    keys: Arc<BTreeMap<String, Vec<u8>>>,
    signing: String,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("signing", &self.signing)
            .finish()
    }
}

impl Keyring {
    /// A keyring of `keys` (id, key bytes), signing with `signing` (which
    /// may be left out when there is one key).
    pub fn new(
        keys: impl IntoIterator<Item = (String, Vec<u8>)>,
        signing: Option<&str>,
    ) -> Result<Keyring, KeyringError> {
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            check_key_id(&id)?;
            if key.len() < MIN_KEY_BYTES {
                return Err(KeyringError::TooShort {
                    id,
                    path: PathBuf::from("(given in code)"),
                    len: key.len(),
                });
            }
            if map.insert(id.clone(), key).is_some() {
                return Err(KeyringError::DuplicateId(id));
            }
        }
        let known = || map.keys().cloned().collect::<Vec<_>>().join(", ");
        let signing = match signing {
            Some(id) if map.contains_key(id) => id.to_owned(),
            Some(id) => {
                return Err(KeyringError::UnknownSigningKey {
                    id: id.to_owned(),
                    known: known(),
                });
            }
            None if map.len() == 1 => map.keys().next().cloned().unwrap_or_default(),
            None if map.is_empty() => return Err(KeyringError::NoKeys),
            None => return Err(KeyringError::SigningKeyRequired { known: known() }),
        };
        Ok(Keyring {
            keys: Arc::new(map),
            signing,
        })
    }

    /// The id of the key this process signs with.
    pub fn signing_key_id(&self) -> &str {
        &self.signing
    }

    /// Every key id this process verifies with.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Signs a job message: sets [`KEY_ID`] and [`SIGNATURE`] in `table`
    /// for `body` and the due-at header `table` holds now. Set that header
    /// first: one set after signing is not covered, and the job will not
    /// verify.
    pub fn sign(&self, body: &[u8], table: &mut FieldTable) {
        let due = headers::get_int(Some(table), headers::DUE_AT_MS);
        let mac = self.mac(&self.signing, due, body);
        headers::set(table, KEY_ID, self.signing.as_str());
        headers::set(table, SIGNATURE, hex::encode(mac.finalize().into_bytes()));
    }

    /// Checks a job message's signature against `body` and `table`, and
    /// returns the id of the key that made it.
    pub fn verify(&self, body: &[u8], table: Option<&FieldTable>) -> Result<&str, Unverified> {
        let signature = headers::get_text(table, SIGNATURE);
        let key_id = headers::get_text(table, KEY_ID);
        let (signature, key_id) = match (signature, key_id) {
            (Some(signature), Some(key_id)) => (signature, key_id),
            (None, _) => return Err(Unverified::Unsigned { missing: SIGNATURE }),
            (Some(_), None) => return Err(Unverified::Unsigned { missing: KEY_ID }),
        };
        let Some((id, _)) = self.keys.get_key_value(&key_id) else {
            return Err(Unverified::UnknownKey {
                id: printable(&key_id),
            });
        };
        let bad = || Unverified::BadSignature { id: id.clone() };
        let claimed = hex::decode(signature.trim()).map_err(|_| bad())?;
        let due = headers::get_int(table, headers::DUE_AT_MS);
        // `verify_slice` compares in constant time.
        self.mac(id, due, body)
            .verify_slice(&claimed)
            .map_err(|_| bad())?;
        Ok(id)
    }

    /// The MAC state over the canonical bytes (see the module's docs).
    fn mac(&self, id: &str, due: Option<i64>, body: &[u8]) -> HmacSha256 {
        let key = &self.keys[id];
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
        for part in canonical_parts(id, due, body) {
            mac.update(&part);
        }
        mac
    }
}

/// The canonical bytes in pieces (the body last, uncopied).
fn canonical_parts<'a>(
    id: &str,
    due: Option<i64>,
    body: &'a [u8],
) -> [std::borrow::Cow<'a, [u8]>; 3] {
    let due = due.map_or_else(|| "none".to_owned(), |due| due.to_string());
    let head = format!("key-id: {id}\n{}: {due}\n\n", headers::DUE_AT_MS);
    [DOMAIN.into(), head.into_bytes().into(), body.into()]
}

/// A key id as a stranger sent it, fit for a log line and a header.
fn printable(id: &str) -> String {
    let mut shown: String = id
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if id.chars().count() > 64 {
        shown.push_str("...");
    }
    shown
}

/// Why a job message does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error("no {missing} header: the message was not signed with a job key")]
    Unsigned { missing: &'static str },
    #[error("signed with key {id:?}, which this worker does not hold")]
    UnknownKey { id: String },
    #[error("its signature by key {id:?} does not match its body and due-at header")]
    BadSignature { id: String },
}

impl Unverified {
    /// The dead-letter reason: `unsigned`, `unknown_key` or `bad_signature`.
    pub fn reason(&self) -> &'static str {
        match self {
            Unverified::Unsigned { .. } => "unsigned",
            Unverified::UnknownKey { .. } => "unknown_key",
            Unverified::BadSignature { .. } => "bad_signature",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Vec<u8> {
        vec![byte; MIN_KEY_BYTES]
    }

    fn ring(ids: &[&str], signing: Option<&str>) -> Keyring {
        let keys = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.to_string(), key(b'a' + i as u8)));
        Keyring::new(keys, signing).unwrap()
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_the_documented_bytes() {
        let keyring = ring(&["k1"], None);
        let body = br#"{"v":1,"campaign":"c"}"#;
        let mut table = FieldTable::default();
        headers::set(&mut table, headers::DUE_AT_MS, 1_700_000_000_123);
        keyring.sign(body, &mut table);

        let mut expected =
            b"flotilla-job-signature-v1\nkey-id: k1\nx-flotilla-due-ms: 1700000000123\n\n".to_vec();
        expected.extend_from_slice(body);
        let mut mac = HmacSha256::new_from_slice(&key(b'a')).unwrap();
        mac.update(&expected);
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            headers::get_text(Some(&table), SIGNATURE).as_deref(),
            Some(expected.as_str())
        );
        assert_eq!(
            headers::get_text(Some(&table), KEY_ID).as_deref(),
            Some("k1")
        );
        assert_eq!(keyring.verify(body, Some(&table)), Ok("k1"));

        // Without a due-at header the line reads "none".
        let mut table = FieldTable::default();
        keyring.sign(body, &mut table);
        let mut expected =
            b"flotilla-job-signature-v1\nkey-id: k1\nx-flotilla-due-ms: none\n\n".to_vec();
        expected.extend_from_slice(body);
        let mut mac = HmacSha256::new_from_slice(&key(b'a')).unwrap();
        mac.update(&expected);
        assert_eq!(
            headers::get_text(Some(&table), SIGNATURE),
            Some(hex::encode(mac.finalize().into_bytes()))
        );
    }

    #[test]
    fn what_does_not_verify_says_why() {
        let keyring = ring(&["k1"], None);
        let body = br#"{"v":1,"device":{"address":"http://10.0.0.1/"}}"#;
        let mut table = FieldTable::default();
        headers::set(&mut table, headers::DUE_AT_MS, 5);
        keyring.sign(body, &mut table);
        let reason = |body: &[u8], table: Option<&FieldTable>| {
            keyring.verify(body, table).map_err(|e| e.reason())
        };
        assert_eq!(reason(body, Some(&table)), Ok("k1"));
        assert_eq!(reason(body, None), Err("unsigned"));
        let mut no_id = table.clone();
        headers::remove(&mut no_id, &[KEY_ID]);
        assert_eq!(reason(body, Some(&no_id)), Err("unsigned"));

        // The body, the due-at header, the key id and the signature are
        // each covered.
        let tampered = br#"{"v":1,"device":{"address":"http://10.0.0.2/"}}"#;
        assert_eq!(reason(tampered, Some(&table)), Err("bad_signature"));
        let mut later = table.clone();
        headers::set(&mut later, headers::DUE_AT_MS, 6);
        assert_eq!(reason(body, Some(&later)), Err("bad_signature"));
        let mut undue = table.clone();
        headers::remove(&mut undue, &[headers::DUE_AT_MS]);
        assert_eq!(reason(body, Some(&undue)), Err("bad_signature"));
        let mut garbled = table.clone();
        headers::set(&mut garbled, SIGNATURE, "not hex");
        assert_eq!(reason(body, Some(&garbled)), Err("bad_signature"));
        let mut short = table.clone();
        headers::set(&mut short, SIGNATURE, "abcd");
        assert_eq!(reason(body, Some(&short)), Err("bad_signature"));
        let mut stranger = table.clone();
        headers::set(&mut stranger, KEY_ID, "k9\u{7}");
        let unknown = keyring.verify(body, Some(&stranger)).unwrap_err();
        assert_eq!(unknown.reason(), "unknown_key");
        assert!(unknown.to_string().contains("\"k9?\""), "{unknown}");

        // Another key's signature under this key's id does not pass.
        let other = Keyring::new([("k1".to_owned(), key(b'z'))], None).unwrap();
        let mut forged = FieldTable::default();
        other.sign(body, &mut forged);
        assert_eq!(reason(body, Some(&forged)), Err("bad_signature"));

        // Unsigned headers may change (workers and redrive rewrite them).
        let mut bookkeeping = table.clone();
        headers::set(&mut bookkeeping, headers::RETURNS, 3);
        headers::set(&mut bookkeeping, headers::DEAD_REASON, "return_limit");
        assert_eq!(reason(body, Some(&bookkeeping)), Ok("k1"));
    }

    #[test]
    fn a_rotating_keyring_accepts_old_and_new_and_signs_with_the_one_named() {
        let old = ring(&["old"], None);
        let both = Keyring::new(
            [("old".to_owned(), key(b'a')), ("new".to_owned(), key(b'b'))],
            Some("new"),
        )
        .unwrap();
        let new = Keyring::new([("new".to_owned(), key(b'b'))], None).unwrap();
        let body = b"{}";
        let mut by_old = FieldTable::default();
        old.sign(body, &mut by_old);
        let mut by_both = FieldTable::default();
        both.sign(body, &mut by_both);
        assert_eq!(both.signing_key_id(), "new");
        assert_eq!(both.verify(body, Some(&by_old)), Ok("old"));
        assert_eq!(both.verify(body, Some(&by_both)), Ok("new"));
        assert_eq!(new.verify(body, Some(&by_both)), Ok("new"));
        assert_eq!(
            new.verify(body, Some(&by_old)).unwrap_err().reason(),
            "unknown_key"
        );
    }

    #[test]
    fn key_lists_parse_and_bad_ones_are_named() {
        let pairs = parse_key_list(" a=/run/a , b.2=/run/b,").unwrap();
        assert_eq!(
            pairs,
            [
                ("a".to_owned(), PathBuf::from("/run/a")),
                ("b.2".to_owned(), PathBuf::from("/run/b"))
            ]
        );
        assert!(matches!(
            parse_key_list("a"),
            Err(KeyringError::BadEntry(_))
        ));
        assert!(matches!(
            parse_key_list("a="),
            Err(KeyringError::BadEntry(_))
        ));
        assert!(matches!(parse_key_list("=/x"), Err(KeyringError::BadId(_))));
        assert!(matches!(
            parse_key_list("a b=/x"),
            Err(KeyringError::BadId(_))
        ));
        assert!(matches!(
            parse_key_list("a=/x,a=/y"),
            Err(KeyringError::DuplicateId(_))
        ));
        assert!(matches!(
            Keyring::new([("a".to_owned(), key(1)), ("b".to_owned(), key(2))], None),
            Err(KeyringError::SigningKeyRequired { .. })
        ));
        assert!(matches!(
            Keyring::new([("a".to_owned(), key(1))], Some("b")),
            Err(KeyringError::UnknownSigningKey { .. })
        ));
        assert!(matches!(
            KeyArgs::default().keyring(),
            Err(KeyringError::NoKeys)
        ));
    }

    #[test]
    fn key_files_are_read_trimmed_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("flotilla-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = "0123456789abcdef0123456789abcdef-very-secret";
        std::fs::write(dir.join("k1"), format!("{secret}\n")).unwrap();
        std::fs::write(dir.join("short"), "hunter2\n").unwrap();
        let args = |list: String, signing: Option<&str>| KeyArgs {
            job_keys: Some(list),
            signing_key_id: signing.map(str::to_owned),
        };
        let keyring = args(format!("k1={}", dir.join("k1").display()), None)
            .keyring()
            .unwrap();
        assert_eq!(keyring.keys["k1"], secret.as_bytes());
        let shown = format!("{keyring:?}");
        assert!(!shown.contains("very-secret"), "{shown}");

        let short = args(format!("s={}", dir.join("short").display()), None)
            .keyring()
            .unwrap_err();
        assert!(
            matches!(short, KeyringError::TooShort { len: 7, .. }),
            "{short}"
        );
        assert!(!short.to_string().contains("hunter2"), "{short}");
        let missing = args(format!("m={}", dir.join("missing").display()), None)
            .keyring()
            .unwrap_err();
        assert!(missing.to_string().contains("\"m\""), "{missing}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
