//! The fuzz properties' strategies: valid values of everything that
//! travels between processes, and hostile changes to them.

use chrono::{DateTime, TimeZone, Utc};
use flotilla_common::{
    CallFailure, CallSample, CappedTarget, ClaimEvent, Decision, DecisionCounts, DecisionEvent,
    Device, DeviceKind, Ending, ErrorClass, Event, EventBody, FinishedEvent, Job, JobPolicy,
    Outcome, PauseCause, PublishedEvent, RateChange, RetryPolicy, StepEvent, Target, Thresholds,
    TlsProfile,
    control::{Command, ControlMessage},
};
use proptest::prelude::*;
use serde_json::Value;
use std::time::Duration;
use url::Url;

// ---- Strategies: valid values -------------------------------------------

pub(crate) fn text() -> impl Strategy<Value = String> {
    // Mostly plain, sometimes quotes, control characters and non-ASCII.
    prop_oneof![
        "[a-z0-9._-]{1,16}",
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        Just("\"},\u{0}\n\\".to_owned()),
    ]
}

pub(crate) fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970 to 2200, to the nanosecond.
    (0i64..7_258_118_400, 0u32..1_000_000_000)
        .prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).single().expect("in range"))
}

pub(crate) fn duration() -> impl Strategy<Value = Duration> {
    (0u64..10_000_000, 0u32..1_000_000_000).prop_map(|(s, ns)| Duration::new(s, ns))
}

pub(crate) fn url() -> impl Strategy<Value = Url> {
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

pub(crate) fn kind() -> impl Strategy<Value = DeviceKind> {
    proptest::sample::select(DeviceKind::ALL.to_vec())
}

/// Any JSON value.
pub(crate) fn json() -> impl Strategy<Value = Value> {
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

pub(crate) fn ending() -> impl Strategy<Value = Ending> {
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

pub(crate) fn device() -> impl Strategy<Value = Device> {
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

pub(crate) fn job() -> impl Strategy<Value = Job> {
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
pub(crate) fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

pub(crate) fn decision() -> impl Strategy<Value = Decision> {
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
        rate_change().prop_map(Decision::RateChanged),
        Just(Decision::Cancelled),
        Just(Decision::Completed),
    ]
}

pub(crate) fn event_body() -> impl Strategy<Value = EventBody> {
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

pub(crate) fn event() -> impl Strategy<Value = Event> {
    (time(), text(), event_body()).prop_map(|(at, campaign, body)| Event {
        v: flotilla_common::event::EVENT_VERSION,
        at,
        campaign,
        body,
    })
}

pub(crate) fn command() -> impl Strategy<Value = Command> {
    proptest::sample::select(vec![Command::Pause, Command::Resume, Command::Cancel])
}

pub(crate) fn control() -> impl Strategy<Value = ControlMessage> {
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
pub(crate) fn mutate(value: Value, path: Vec<usize>, replacement: Option<Value>) -> Value {
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

pub(crate) fn hostile_value() -> impl Strategy<Value = Option<Value>> {
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
pub(crate) fn corrupt(bytes: Vec<u8>, at: usize, how: u8, garbage: Vec<u8>) -> Vec<u8> {
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

prop_compose! {
    fn rate_change()(
        host in text(),
        from_per_minute in finite(),
        to_per_minute in proptest::option::of(finite()),
        full_per_minute in finite(),
        calls in any::<u64>(),
        p95_ms in any::<u64>(),
        error_ratio in 0.0..=1.0f64,
    ) -> RateChange {
        RateChange { host, from_per_minute, to_per_minute, full_per_minute, calls, p95_ms, error_ratio }
    }
}
