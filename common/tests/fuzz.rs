//! Property tests standing in for fuzz targets (the toolchain is stable, so
//! no cargo-fuzz): every decoder of what travels between processes — the job
//! envelope, events, control messages — and the inventory reader get
//! arbitrary bytes, mutations of valid values and well-formed but hostile
//! values. None may panic; what they refuse they refuse with a located
//! error; what they accept survives a round trip unchanged.
//!
//! Case counts are small by default so the suite stays quick; set
//! `PROPTEST_CASES` for a long run (README, Fuzzing).

use chrono::{DateTime, TimeZone, Utc};
use flotilla_common::{
    CallFailure, CallSample, CappedTarget, ClaimEvent, Decision, DecisionCounts, DecisionEvent,
    Device, DeviceKind, Ending, ErrorClass, Event, EventBody, FinishedEvent, Job, JobPolicy,
    Outcome, PauseCause, PublishedEvent, RetryPolicy, StepEvent, Target, Thresholds, TlsProfile,
    control::{Command, ControlBook, ControlMessage, Mode},
    inventory::{COLUMNS, InventoryReader, InventoryWriter},
};
use proptest::prelude::*;
use serde_json::Value;
use std::time::Duration;
use url::Url;

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

// ---- Strategies: valid values -------------------------------------------

fn text() -> impl Strategy<Value = String> {
    // Mostly plain, sometimes quotes, control characters and non-ASCII.
    prop_oneof![
        "[a-z0-9._-]{1,16}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        Just("\"},\u{0}\n\\".to_owned()),
    ]
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970 to 2200, to the nanosecond.
    (0i64..7_258_118_400, 0u32..1_000_000_000)
        .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).single().expect("in range"))
}

fn duration() -> impl Strategy<Value = Duration> {
    (0u64..10_000_000, 0u32..1_000_000_000).prop_map(|(s, ns)| Duration::new(s, ns))
}

fn url() -> impl Strategy<Value = Url> {
    (
        prop_oneof![Just("http"), Just("https"), Just("file")],
        "[a-z][a-z0-9]{0,11}(\\.[a-z]{2,5})?",
        proptest::option::of(1u16..),
        "(/[A-Za-z0-9._~%-]{0,12}){0,3}",
    )
        .prop_map(|(scheme, host, port, path)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let authority = if scheme == "file" {
                String::new()
            } else {
                format!("{host}{port}")
            };
            Url::parse(&format!("{scheme}://{authority}{path}")).expect("a well-formed URL")
        })
}

fn kind() -> impl Strategy<Value = DeviceKind> {
    proptest::sample::select(DeviceKind::ALL.to_vec())
}

/// Any JSON value.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        finite().prop_map(|f| Value::from(serde_json::Number::from_f64(f).expect("finite"))),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn ending() -> impl Strategy<Value = Ending> {
    (
        proptest::sample::select(Outcome::ALL.to_vec()),
        proptest::option::of(proptest::sample::select(ErrorClass::ALL.to_vec())),
        proptest::option::of(text()),
        proptest::option::of(json()),
        any::<bool>(),
    )
        .prop_map(
            |(outcome, error_class, error, detail, needs_attention)| Ending {
                outcome,
                error_class,
                error,
                // `null` reads back as "no detail": the field is an Option.
                detail: detail.filter(|d| !d.is_null()),
                needs_attention,
            },
        )
}

fn device() -> impl Strategy<Value = Device> {
    (
        text(),
        kind(),
        url(),
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}",
        proptest::option::of(text()),
        proptest::option::of(text()),
        prop::collection::vec(url(), 0..3),
    )
        .prop_map(
            |(id, kind, address, credentials, cpe_id, group, gateways)| Device {
                id,
                kind,
                address,
                credentials,
                cpe_id,
                group,
                gateways,
            },
        )
}

fn job() -> impl Strategy<Value = Job> {
    let policy = (
        duration(),
        duration(),
        duration(),
        any::<u32>(),
        duration(),
        duration(),
    )
        .prop_map(
            |(deadline, step_timeout, poll_interval, max_attempts, initial, max)| JobPolicy {
                deadline,
                step_timeout,
                poll_interval,
                retry: RetryPolicy {
                    max_attempts,
                    initial_backoff: initial,
                    max_backoff: max,
                },
            },
        );
    let target = (text(), url(), "[0-9a-f]{64}").prop_map(|(version, image_url, sha256)| Target {
        version,
        image_url,
        sha256,
    });
    (
        (text(), device(), target, policy, json()),
        (proptest::option::of(text()), any::<bool>(), json()),
        (any::<u32>(), any::<u32>()),
        proptest::option::of(time()),
        proptest::option::of(time()),
        (proptest::option::of(time()), proptest::option::of(time())),
        proptest::option::of(ending()),
    )
        .prop_map(
            |(
                (campaign, device, target, policy, settings),
                (ca_pem, verify, step),
                (attempt, seq),
                published_at,
                started_at,
                (deadline, parked_at),
                ending,
            )| Job {
                v: flotilla_common::JOB_VERSION,
                campaign,
                device,
                target,
                policy,
                settings,
                tls: TlsProfile { ca_pem, verify },
                step,
                attempt,
                seq,
                published_at,
                started_at,
                deadline,
                parked_at,
                ending,
            },
        )
}

/// Any finite float (NaN and infinities are not JSON).
fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

fn decision() -> impl Strategy<Value = Decision> {
    prop_oneof![
        (
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 0..5),
            text(),
            text()
        )
            .prop_map(
                |(devices, waves, fingerprint, target_version)| Decision::Started {
                    devices,
                    waves,
                    fingerprint,
                    target_version,
                }
            ),
        any::<u32>().prop_map(|wave| Decision::WaveStarted { wave }),
        any::<u32>().prop_map(|wave| Decision::GatePassed { wave }),
        proptest::sample::select(vec![
            PauseCause::WaveBudget,
            PauseCause::CampaignBudget,
            PauseCause::GateNotMet,
            PauseCause::Approval,
            PauseCause::Operator,
        ])
        .prop_map(|cause| Decision::Paused { cause }),
        Just(Decision::Resumed),
        time().prop_map(|opens_at| Decision::WindowClosed { opens_at }),
        (
            text(),
            0.0..1e6f64,
            proptest::option::of(0.0..1e6f64),
            0.0..1e6f64,
            any::<u64>(),
            any::<u64>(),
            0.0..=1.0f64,
        )
            .prop_map(
                |(
                    host,
                    from_per_minute,
                    to_per_minute,
                    full_per_minute,
                    calls,
                    p95_ms,
                    error_ratio,
                )| {
                    Decision::RateChanged {
                        host,
                        from_per_minute,
                        to_per_minute,
                        full_per_minute,
                        calls,
                        p95_ms,
                        error_ratio,
                    }
                }
            ),
        Just(Decision::Cancelled),
        Just(Decision::Completed),
    ]
}

fn event_body() -> impl Strategy<Value = EventBody> {
    let counts = (
        proptest::option::of(any::<u32>()),
        prop::array::uniform10(any::<u64>()),
    )
        .prop_map(|(wave, n)| DecisionCounts {
            wave,
            wave_size: n[0],
            wave_published: n[1],
            wave_finished: n[2],
            wave_succeeded: n[3],
            wave_failed: n[4],
            devices: n[5],
            published: n[6],
            finished: n[7],
            succeeded: n[8],
            failed: n[9],
        });
    let thresholds = (
        proptest::option::of(finite()),
        proptest::option::of(finite()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(|(success_gate, failure_ratio, min_finished)| Thresholds {
            success_gate,
            failure_ratio,
            min_finished,
        });
    prop_oneof![
        (text(), kind(), proptest::option::of(any::<u32>())).prop_map(|(device, kind, wave)| {
            EventBody::Published(PublishedEvent { device, kind, wave })
        }),
        (
            (
                text(),
                kind(),
                any::<u32>(),
                text(),
                any::<u32>(),
                any::<u64>()
            ),
            (
                proptest::option::of(text()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
                any::<bool>(),
            ),
            proptest::option::of(
                (
                    text(),
                    any::<u32>(),
                    any::<u64>(),
                    proptest::option::of(prop_oneof![
                        Just(CallFailure::ServerError),
                        Just(CallFailure::Timeout),
                        Just(CallFailure::Connection),
                    ]),
                )
                    .prop_map(|(host, count, slowest_ms, failure)| CallSample {
                        host,
                        count,
                        slowest_ms,
                        failure,
                    }),
            ),
        )
            .prop_map(
                |(
                    (device, kind, seq, step, attempt, duration_ms),
                    (next, delay_ms, error, note, worker, tls_unverified),
                    calls,
                )| EventBody::Step(StepEvent {
                    device,
                    kind,
                    seq,
                    step,
                    attempt,
                    duration_ms,
                    next,
                    delay_ms,
                    error,
                    note,
                    worker,
                    tls_unverified,
                    calls,
                })
            ),
        (
            text(),
            kind(),
            any::<u32>(),
            text(),
            ending(),
            proptest::option::of(time())
        )
            .prop_map(|(device, kind, seq, last_step, ending, started_at)| {
                EventBody::Finished(FinishedEvent {
                    device,
                    kind,
                    seq,
                    last_step,
                    ending,
                    started_at,
                })
            }),
        (
            any::<u32>(),
            decision(),
            text(),
            counts,
            thresholds,
            proptest::option::of(any::<u64>())
        )
            .prop_map(
                |(seq, decision, reason, counts, thresholds, control_offset)| {
                    EventBody::Decision(DecisionEvent {
                        seq,
                        decision,
                        reason,
                        counts,
                        thresholds,
                        control_offset,
                    })
                }
            ),
        (
            text(),
            prop::collection::vec(
                (text(), any::<u32>()).prop_map(|(key, cap)| CappedTarget { key, cap }),
                0..4
            )
        )
            .prop_map(|(device, targets)| EventBody::Claim(ClaimEvent { device, targets })),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (time(), text(), event_body()).prop_map(|(at, campaign, body)| Event {
        v: flotilla_common::event::EVENT_VERSION,
        at,
        campaign,
        body,
    })
}

fn command() -> impl Strategy<Value = Command> {
    proptest::sample::select(vec![Command::Pause, Command::Resume, Command::Cancel])
}

fn control() -> impl Strategy<Value = ControlMessage> {
    (
        time(),
        text(),
        command(),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(|(at, campaign, command, by, reason)| ControlMessage {
            v: flotilla_common::control::CONTROL_VERSION,
            at,
            campaign,
            command,
            by,
            reason,
        })
}

// ---- Strategies: hostile input ------------------------------------------

/// A JSON value with one hostile change somewhere: a field dropped, or its
/// value swapped for another JSON value (wrong type, huge number, deep
/// nesting).
fn mutate(value: Value, path: Vec<usize>, replacement: Option<Value>) -> Value {
    fn walk(value: &mut Value, path: &[usize], replacement: Option<Value>) {
        let Some((&choice, rest)) = path.split_first() else {
            return;
        };
        match value {
            Value::Object(map) if !map.is_empty() => {
                let key = map
                    .keys()
                    .nth(choice % map.len())
                    .cloned()
                    .expect("in range");
                if rest.is_empty() || !matches!(map[&key], Value::Object(_) | Value::Array(_)) {
                    match replacement {
                        Some(new) => map[&key] = new,
                        None => {
                            map.remove(&key);
                        }
                    }
                } else if let Some(child) = map.get_mut(&key) {
                    walk(child, rest, replacement);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let len = items.len();
                let child = &mut items[choice % len];
                match (rest.is_empty(), replacement) {
                    (true, Some(new)) => *child = new,
                    (true, None) => {
                        items.remove(choice % len);
                    }
                    (false, replacement) => walk(child, rest, replacement),
                }
            }
            _ => {
                if let Some(new) = replacement {
                    *value = new;
                }
            }
        }
    }
    let mut value = value;
    walk(&mut value, &path, replacement);
    value
}

fn hostile_value() -> impl Strategy<Value = Option<Value>> {
    proptest::option::of(prop_oneof![
        json(),
        Just(Value::from(u64::MAX)),
        Just(Value::from(-1)),
        Just(serde_json::json!(1e300)),
        Just(Value::String("9999999999999999999999h".into())),
        Just(Value::String("not a url".into())),
        Just(Value::String("toaster".into())),
        // Deep nesting: the decoder's recursion limit must hold.
        Just(
            serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100)))
                .expect("nested arrays")
        ),
    ])
}

/// Bytes a valid document could turn into on the way: cut short, bytes
/// flipped, or garbage spliced in.
fn corrupt(bytes: Vec<u8>, at: usize, how: u8, garbage: Vec<u8>) -> Vec<u8> {
    let mut bytes = bytes;
    let at = if bytes.is_empty() {
        0
    } else {
        at % bytes.len()
    };
    match how % 3 {
        0 => bytes.truncate(at),
        1 => {
            if let Some(b) = bytes.get_mut(at) {
                *b ^= 0x20 | garbage.first().copied().unwrap_or(1);
            }
        }
        _ => {
            bytes.splice(at..at, garbage);
        }
    }
    bytes
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
