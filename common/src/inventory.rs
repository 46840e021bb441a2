//! The inventory file: one device per row, CSV with a header.
//!
//! ```csv
//! id,kind,address,credentials,cpe_id,group,gateways
//! cpe-0001,dms,https://dms.example.net:7557,dms-east,00D09E-0001,,
//! npm-lab-1,npm,https://10.1.2.3,npm-lab,,lab,
//! np-1,netprofiler,https://10.2.0.1,riverbed,,,https://10.2.1.1 https://10.2.1.2
//! ```
//!
//! - `id`: unique in the file; names the device in events and reports;
//! - `kind`: one of [`DeviceKind::ALL`] (`dms`, `netprofiler`, ...);
//! - `address`: the device's API base URL (for `dms`, the DMS), `http` or
//!   `https`, possibly with a path prefix;
//! - `credentials`: a reference the workers resolve (letters, digits,
//!   `-`, `_`, `.`); never a password;
//! - `cpe_id`: the CPE's identifier at its DMS (`dms` rows only, required);
//! - `group`: optional; campaign settings (TLS) can differ per group;
//! - `gateways`: optional, `netprofiler` rows only: the API base URLs of the
//!   Flow Gateways (space-separated) to back up before the update, when the
//!   campaign asks for backups.
//!
//! Which kinds take `cpe_id` and `gateways` is the kind list's word
//! ([`DeviceKind::columns`]), not this file's.
//!
//! Rows are read one at a time, so an inventory of any size is read in
//! constant memory. Every problem is reported with its line and column.

use crate::{Device, DeviceKind, kind::Column};
use std::{fmt, io};
use url::Url;

pub const COLUMNS: [&str; 7] = [
    "id",
    "kind",
    "address",
    "credentials",
    "cpe_id",
    "group",
    "gateways",
];
const REQUIRED: [&str; 4] = ["id", "kind", "address", "credentials"];

/// One problem in an inventory, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line in the file (the header is line 1).
    pub line: u64,
    /// The column at fault, when there is one.
    pub field: Option<&'static str>,
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "line {}, field {field}: {}", self.line, self.message),
            None => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

/// Where each column sits in this file's header.
struct Columns {
    index: [Option<usize>; COLUMNS.len()],
}

impl Columns {
    fn get<'r>(&self, record: &'r csv::StringRecord, column: &str) -> &'r str {
        let slot = COLUMNS
            .iter()
            .position(|c| *c == column)
            .expect("columns are looked up by their constant names");
        self.index[slot]
            .and_then(|i| record.get(i))
            .map(str::trim)
            .unwrap_or("")
    }
}

/// Streams devices out of an inventory.
pub struct InventoryReader<R: io::Read> {
    csv: csv::Reader<R>,
    columns: Columns,
    record: csv::StringRecord,
}

impl<R: io::Read> InventoryReader<R> {
    /// Reads the header. A header without the required columns, or with
    /// unknown ones, is an error on line 1.
    pub fn new(input: R) -> Result<Self, RowError> {
        let mut csv = csv::ReaderBuilder::new()
            .flexible(true)
            .trim(csv::Trim::All)
            .comment(Some(b'#'))
            .from_reader(input);
        let header_error = |message: String| RowError {
            line: 1,
            field: None,
            message,
        };
        let header = csv
            .headers()
            .map_err(|e| header_error(format!("unreadable header: {e}")))?
            .clone();
        let mut index = [None; COLUMNS.len()];
        for (position, name) in header.iter().enumerate() {
            let name = name.trim();
            match COLUMNS.iter().position(|c| c.eq_ignore_ascii_case(name)) {
                Some(slot) if index[slot].is_none() => index[slot] = Some(position),
                Some(_) => return Err(header_error(format!("column {name:?} appears twice"))),
                None => {
                    return Err(header_error(format!(
                        "unknown column {name:?} (columns are: {})",
                        COLUMNS.join(", ")
                    )));
                }
            }
        }
        let missing: Vec<_> = REQUIRED
            .iter()
            .filter(|c| {
                let slot = COLUMNS
                    .iter()
                    .position(|x| x == *c)
                    .expect("required columns are columns");
                index[slot].is_none()
            })
            .copied()
            .collect();
        if !missing.is_empty() {
            return Err(header_error(format!(
                "missing column(s): {}",
                missing.join(", ")
            )));
        }
        Ok(InventoryReader {
            csv,
            columns: Columns { index },
            record: csv::StringRecord::new(),
        })
    }

    /// The line the last row read started on.
    pub fn line(&self) -> Option<u64> {
        self.record.position().map(|p| p.line())
    }

    /// The next device, or every problem of the next bad row. `None` at the
    /// end of the file.
    pub fn next_device(&mut self) -> Option<Result<Device, Vec<RowError>>> {
        match self.csv.read_record(&mut self.record) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                return Some(Err(vec![RowError {
                    line,
                    field: None,
                    message: format!("unreadable row: {e}"),
                }]));
            }
        }
        let line = self.record.position().map(|p| p.line()).unwrap_or(0);
        Some(parse_row(&self.columns, &self.record, line))
    }
}

fn parse_row(
    columns: &Columns,
    record: &csv::StringRecord,
    line: u64,
) -> Result<Device, Vec<RowError>> {
    let mut errors = Vec::new();
    let mut problem = |field: &'static str, message: String| {
        errors.push(RowError {
            line,
            field: Some(field),
            message,
        })
    };
    let id = columns.get(record, "id");
    if id.is_empty() {
        problem("id", "is empty".into());
    } else if id.chars().any(|c| c.is_control() || c == '/') {
        problem("id", format!("{id:?} has a control character or '/'"));
    }
    let kind = match columns.get(record, "kind") {
        "" => {
            problem("kind", "is empty".into());
            None
        }
        text => match text.parse::<DeviceKind>() {
            Ok(kind) => Some(kind),
            Err(e) => {
                problem("kind", e.to_string());
                None
            }
        },
    };
    let address = match columns.get(record, "address") {
        "" => {
            problem("address", "is empty".into());
            None
        }
        text => match base_url(text) {
            Ok(url) => Some(url),
            Err(message) => {
                problem("address", message);
                None
            }
        },
    };
    let credentials = columns.get(record, "credentials");
    if credentials.is_empty() {
        problem("credentials", "is empty".into());
    } else if !crate::job::is_valid_credentials_reference(credentials) {
        problem(
            "credentials",
            "must be a reference name (letters, digits, '-', '_', '.'), not a secret".into(),
        );
    }
    let cpe_id = Some(columns.get(record, "cpe_id")).filter(|s| !s.is_empty());
    let group = Some(columns.get(record, "group")).filter(|s| !s.is_empty());
    let mut gateways = Vec::new();
    for text in columns.get(record, "gateways").split_whitespace() {
        match base_url(text) {
            Ok(url) => gateways.push(url),
            Err(message) => problem("gateways", message),
        }
    }
    if let Some(kind) = kind {
        let uses = kind.columns();
        for (field, column, filled, what) in [
            ("cpe_id", uses.cpe_id, cpe_id.is_some(), "one"),
            (
                "gateways",
                uses.gateways,
                !gateways.is_empty(),
                "Flow Gateways",
            ),
        ] {
            match (column, filled) {
                (Column::Required, false) => {
                    problem(field, format!("is required for a {kind} device"))
                }
                (Column::Absent, true) => {
                    let owners = DeviceKind::names_using(|c| match field {
                        "cpe_id" => c.cpe_id,
                        _ => c.gateways,
                    });
                    problem(
                        field,
                        format!("only {owners} devices have {what}, this is a {kind}"),
                    )
                }
                _ => {}
            }
        }
    }
    match (kind, address) {
        (Some(kind), Some(address)) if errors.is_empty() => Ok(Device {
            id: id.to_owned(),
            kind,
            address,
            credentials: credentials.to_owned(),
            cpe_id: cpe_id.map(str::to_owned),
            group: group.map(str::to_owned),
            gateways,
        }),
        _ => Err(errors),
    }
}

/// A device API base URL: http or https, a host, no user information, no
/// query or fragment.
fn base_url(text: &str) -> Result<Url, String> {
    match Url::parse(text) {
        Ok(url) if !matches!(url.scheme(), "http" | "https") => {
            Err(format!("{text:?} is not an http or https URL"))
        }
        Ok(url) if url.host().is_none() => Err(format!("{text:?} has no host")),
        Ok(url) if !url.username().is_empty() || url.password().is_some() => {
            Err("carries user information; put secrets behind the credentials reference".into())
        }
        Ok(url) if url.query().is_some() || url.fragment().is_some() => {
            Err(format!("{text:?} has a query or fragment; give a base URL"))
        }
        Ok(url) => Ok(url),
        Err(e) => Err(format!("{text:?} is not a URL: {e}")),
    }
}

/// Writes devices as an inventory file.
pub struct InventoryWriter<W: io::Write> {
    csv: csv::Writer<W>,
}

impl<W: io::Write> InventoryWriter<W> {
    pub fn new(output: W) -> csv::Result<Self> {
        let mut csv = csv::Writer::from_writer(output);
        csv.write_record(COLUMNS)?;
        Ok(InventoryWriter { csv })
    }

    pub fn write(&mut self, device: &Device) -> csv::Result<()> {
        let gateways: Vec<&str> = device.gateways.iter().map(Url::as_str).collect();
        self.csv.write_record([
            device.id.as_str(),
            device.kind.as_str(),
            device.address.as_str(),
            device.credentials.as_str(),
            device.cpe_id.as_deref().unwrap_or(""),
            device.group.as_deref().unwrap_or(""),
            gateways.join(" ").as_str(),
        ])
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.csv.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(text: &str) -> Vec<Result<Device, Vec<RowError>>> {
        let mut reader = InventoryReader::new(text.as_bytes()).unwrap();
        std::iter::from_fn(|| reader.next_device()).collect()
    }

    #[test]
    fn good_rows_become_devices() {
        let rows = read_all(
            "id,kind,address,credentials,cpe_id,group\n\
             cpe-1,dms,http://127.0.0.1:9000/d/dms-1,dms-east,00D09E-1,\n\
             npm-1, NPM ,https://10.1.2.3,npm-lab,,lab\n",
        );
        let devices: Vec<Device> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(devices[0].cpe_id.as_deref(), Some("00D09E-1"));
        assert_eq!(devices[0].address.path(), "/d/dms-1");
        assert_eq!(devices[1].kind, DeviceKind::Npm);
        assert_eq!(devices[1].group.as_deref(), Some("lab"));
    }

    #[test]
    fn every_problem_of_a_row_is_named_with_line_and_field() {
        let rows = read_all(
            "id,kind,address,credentials,cpe_id\n\
             ok-1,dms,http://127.0.0.1:9000,dms,CPE1\n\
             ,toaster,ftp://x,pass word,\n\
             cpe-3,dms,http://admin:pw@10.0.0.1,dms,\n",
        );
        assert!(rows[0].is_ok());
        let line3 = rows[1].as_ref().unwrap_err();
        let fields: Vec<_> = line3.iter().map(|e| (e.line, e.field.unwrap())).collect();
        assert_eq!(
            fields,
            [(3, "id"), (3, "kind"), (3, "address"), (3, "credentials")]
        );
        let line4 = rows[2].as_ref().unwrap_err();
        let text: Vec<String> = line4.iter().map(ToString::to_string).collect();
        assert!(
            text[0].starts_with("line 4, field address: carries user information"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("line 4, field cpe_id: is required"),
            "{text:?}"
        );
    }

    #[test]
    fn header_problems_are_line_one() {
        let error = InventoryReader::new("id,kind,adress\n".as_bytes())
            .err()
            .unwrap();
        assert_eq!(error.line, 1);
        assert!(
            error.message.contains("unknown column \"adress\""),
            "{}",
            error.message
        );
    }

    #[test]
    fn written_inventories_read_back() {
        let device = Device {
            id: "cpe,1".into(),
            kind: DeviceKind::Dms,
            address: "http://127.0.0.1:9000/".parse().unwrap(),
            credentials: "sim".into(),
            cpe_id: Some("C1".into()),
            group: None,
            gateways: Vec::new(),
        };
        let profiler = Device {
            id: "np-1".into(),
            kind: DeviceKind::Netprofiler,
            address: "https://127.0.0.2:8443/".parse().unwrap(),
            credentials: "riverbed".into(),
            cpe_id: None,
            group: Some("lab".into()),
            gateways: vec![
                "https://127.0.1.1:8443/".parse().unwrap(),
                "https://127.0.1.2:8443/".parse().unwrap(),
            ],
        };
        let mut buffer = Vec::new();
        let mut writer = InventoryWriter::new(&mut buffer).unwrap();
        writer.write(&device).unwrap();
        writer.write(&profiler).unwrap();
        writer.finish().unwrap();
        let text = String::from_utf8(buffer).unwrap();
        let back: Vec<Device> = read_all(&text).into_iter().map(Result::unwrap).collect();
        assert_eq!(back, [device, profiler]);
    }

    #[test]
    fn gateways_belong_to_netprofilers_and_are_base_urls() {
        let rows = read_all(
            "id,kind,address,credentials,gateways\n\
             np-1,netprofiler,https://10.2.0.1,rb,https://10.2.1.1  https://10.2.1.2:8443\n\
             np-2,netprofiler,https://10.2.0.2,rb,ftp://10.2.1.3\n\
             npm-1,npm,https://10.3.0.1,rb,https://10.2.1.4\n",
        );
        let np1 = rows[0].as_ref().unwrap();
        assert_eq!(np1.gateways.len(), 2);
        assert_eq!(np1.gateways[1].port(), Some(8443));
        let np2 = rows[1].as_ref().unwrap_err();
        assert_eq!(np2[0].field, Some("gateways"));
        assert!(np2[0].message.contains("not an http or https"), "{np2:?}");
        let npm = rows[2].as_ref().unwrap_err();
        assert!(npm[0].message.contains("only netprofiler"), "{npm:?}");
    }
}
