//! Property tests standing in for fuzz targets (the toolchain is stable, so
//! no cargo-fuzz): every decoder of what travels between processes — the job
//! envelope, events, control messages — and the inventory reader get
//! arbitrary bytes, mutations of valid values and well-formed but hostile
//! values. None may panic; what they refuse they refuse with a located
//! error; what they accept survives a round trip unchanged.
//!
//! Case counts are small by default so the suite stays quick; set
//! `PROPTEST_CASES` for a long run (README, Fuzzing).

use flotilla_common::{
    Device, Event, Job,
    control::{Command, ControlBook, ControlMessage, Mode},
    inventory::{COLUMNS, InventoryReader, InventoryWriter},
};
use proptest::prelude::*;
use url::Url;

#[path = "fuzz/strategies.rs"]
mod strategies;

use strategies::*;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        // Failures are reported with their minimal input; no files are
        // written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- Properties ----------------------------------------------------------

/// What a decoding error must say: serde_json names the line and column of
/// a syntax error and, for a value of the wrong shape, the field.
fn assert_located(error: &serde_json::Error) {
    let text = error.to_string();
    assert!(!text.is_empty());
    if !error.is_eof() && !error.is_io() {
        assert!(error.line() >= 1, "no position in {text:?}");
        assert!(text.contains("line "), "no position in {text:?}");
    }
}

fn decodes_or_locates<T>(bytes: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    match serde_json::from_slice::<T>(bytes) {
        Ok(value) => {
            // Whatever is accepted means the same thing once written again.
            let again = serde_json::to_vec(&value).expect("serializes");
            let back: T = serde_json::from_slice(&again).expect("reads what it wrote");
            assert_eq!(back, value);
        }
        Err(error) => assert_located(&error),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decodes_or_locates::<Job>(&bytes);
        decodes_or_locates::<Event>(&bytes);
        decodes_or_locates::<ControlMessage>(&bytes);
    }

    #[test]
    fn jobs_round_trip(job in job()) {
        let bytes = serde_json::to_vec(&job).expect("serializes");
        let back: Job = serde_json::from_slice(&bytes).expect("reads what it wrote");
        prop_assert_eq!(back, job);
    }

    #[test]
    fn mutated_jobs_are_refused_or_mean_what_they_say(
        job in job(),
        path in prop::collection::vec(any::<usize>(), 1..4),
        replacement in hostile_value(),
        at in any::<usize>(),
        how in any::<u8>(),
        garbage in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let value = serde_json::to_value(&job).expect("serializes");
        let mutated = serde_json::to_vec(&mutate(value, path, replacement)).expect("serializes");
        decodes_or_locates::<Job>(&mutated);
        decodes_or_locates::<Job>(&corrupt(mutated, at, how, garbage));
    }

    #[test]
    fn events_round_trip(event in event()) {
        let bytes = serde_json::to_vec(&event).expect("serializes");
        let back: Event = serde_json::from_slice(&bytes).expect("reads what it wrote");
        prop_assert_eq!(back.device(), event.device());
        prop_assert_eq!(back, event);
    }

    #[test]
    fn mutated_events_are_refused_or_mean_what_they_say(
        event in event(),
        path in prop::collection::vec(any::<usize>(), 1..4),
        replacement in hostile_value(),
        at in any::<usize>(),
        how in any::<u8>(),
        garbage in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let value = serde_json::to_value(&event).expect("serializes");
        let mutated = serde_json::to_vec(&mutate(value, path, replacement)).expect("serializes");
        decodes_or_locates::<Event>(&mutated);
        decodes_or_locates::<Event>(&corrupt(mutated, at, how, garbage));
    }

    #[test]
    fn control_messages_round_trip_and_cancel_stays_final(
        messages in prop::collection::vec(control(), 1..20),
        path in prop::collection::vec(any::<usize>(), 1..3),
        replacement in hostile_value(),
    ) {
        let mut book = ControlBook::default();
        for message in &messages {
            let bytes = serde_json::to_vec(message).expect("serializes");
            let back: ControlMessage = serde_json::from_slice(&bytes).expect("reads what it wrote");
            prop_assert_eq!(&back, message);
            book.apply(&back);
        }
        for message in &messages {
            let cancelled = messages
                .iter()
                .any(|m| m.campaign == message.campaign && m.command == Command::Cancel);
            let last = messages
                .iter()
                .rev()
                .find(|m| m.campaign == message.campaign)
                .expect("the message itself");
            let expected = match (cancelled, last.command) {
                (true, _) | (_, Command::Cancel) => Mode::Cancelled,
                (false, Command::Pause) => Mode::Paused,
                (false, Command::Resume) => Mode::Running,
            };
            prop_assert_eq!(book.mode(&message.campaign), expected);
        }
        let value = serde_json::to_value(&messages[0]).expect("serializes");
        let mutated = serde_json::to_vec(&mutate(value, path, replacement)).expect("serializes");
        decodes_or_locates::<ControlMessage>(&mutated);
    }
}

// ---- Inventory rows --------------------------------------------------------

/// Reads every row; checks each problem names a line inside the file and,
/// when it names a field, one of the inventory's columns.
fn read_inventory(text: &[u8]) -> Vec<Device> {
    let lines = text.iter().filter(|b| **b == b'\n').count() as u64 + 1;
    let mut reader = match InventoryReader::new(text) {
        Ok(reader) => reader,
        Err(error) => {
            assert_eq!(error.line, 1, "{error}");
            assert!(!error.message.is_empty());
            return Vec::new();
        }
    };
    let mut devices = Vec::new();
    while let Some(row) = reader.next_device() {
        match row {
            Ok(device) => devices.push(device),
            Err(errors) => {
                assert!(!errors.is_empty());
                for error in errors {
                    assert!(error.line <= lines, "{error} in a file of {lines} lines");
                    assert!(error.field.is_none_or(|f| COLUMNS.contains(&f)), "{error}");
                    assert!(!error.message.is_empty());
                }
            }
        }
    }
    devices
}

/// A device as an inventory can hold it: kind-specific columns filled only
/// for the kinds that take them, plain http(s) base addresses.
fn inventory_device() -> impl Strategy<Value = Device> {
    let address = || {
        (
            prop_oneof![Just("http"), Just("https")],
            "[a-z][a-z0-9]{0,11}",
            "(/[a-z0-9-]{1,8}){0,2}",
        )
            .prop_map(|(s, h, p)| Url::parse(&format!("{s}://{h}{p}")).expect("a URL"))
    };
    (
        "[A-Za-z0-9][A-Za-z0-9 ._:-]{0,20}[A-Za-z0-9]",
        kind(),
        address(),
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}",
        "[A-Za-z0-9-]{1,12}",
        // Commas and quotes, which the writer must quote.
        proptest::option::of("[a-z0-9]([a-z0-9,\" -]{0,10}[a-z0-9])?"),
        prop::collection::vec(address(), 1..3),
    )
        .prop_map(
            |(id, kind, address, credentials, cpe_id, group, gateways)| {
                use flotilla_common::kind::Column;
                let columns = kind.columns();
                Device {
                    id,
                    kind,
                    address,
                    credentials,
                    cpe_id: (columns.cpe_id != Column::Absent).then_some(cpe_id),
                    group,
                    gateways: if columns.gateways == Column::Absent {
                        Vec::new()
                    } else {
                        gateways
                    },
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_inventories_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        read_inventory(&bytes);
    }

    #[test]
    fn inventory_rows_round_trip(devices in prop::collection::vec(inventory_device(), 0..8)) {
        let mut out = Vec::new();
        let mut writer = InventoryWriter::new(&mut out).expect("a header");
        for device in &devices {
            writer.write(device).expect("written");
        }
        writer.finish().expect("flushed");
        prop_assert_eq!(read_inventory(&out), devices);
    }

    #[test]
    fn mangled_inventory_rows_are_refused_with_their_line_and_field(
        devices in prop::collection::vec(inventory_device(), 1..6),
        row in any::<usize>(),
        column in 0..COLUMNS.len(),
        value in prop_oneof![
            Just(String::new()),
            Just("toaster".to_owned()),
            Just("ftp://x".to_owned()),
            Just("http://u:p@h".to_owned()),
            Just("pass word".to_owned()),
            Just("\"unterminated".to_owned()),
            any::<String>(),
        ],
    ) {
        let mut out = Vec::new();
        let mut writer = InventoryWriter::new(&mut out).expect("a header");
        for device in &devices {
            writer.write(device).expect("written");
        }
        writer.finish().expect("flushed");
        let text = String::from_utf8(out).expect("UTF-8");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let row = 1 + row % devices.len();
        let mut record = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(lines[row].as_bytes())
            .records()
            .next()
            .expect("a row")
            .expect("a valid row");
        let mut fields: Vec<String> = record.iter().map(str::to_owned).collect();
        fields[column] = value;
        record = csv::StringRecord::from(fields);
        let mut line = Vec::new();
        {
            let mut w = csv::Writer::from_writer(&mut line);
            w.write_record(&record).expect("written");
        }
        lines[row] = String::from_utf8(line).expect("UTF-8").trim_end().to_owned();
        // Checks every error is located; rows other than the mangled one
        // still read as they were (the mangled one may still be a device).
        let read = read_inventory(lines.join("\n").as_bytes());
        let strangers = read.iter().filter(|d| !devices.contains(d)).count();
        prop_assert!(strangers <= 1, "{read:?} from {devices:?}");
        prop_assert!(read.len() + 1 >= devices.len(), "{read:?} from {devices:?}");
    }
}
