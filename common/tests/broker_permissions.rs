//! The broker users of deploy/rabbitmq/definitions.json against the
//! topology's real queue names: each component may do what it needs and
//! nothing else (README, "Least privilege on the broker"). RabbitMQ matches
//! each permission's regular expression against a resource name; the
//! default exchange, which every Flotilla message goes through, is named
//! `amq.default` there.

use flotilla_common::Topology;
use regex::Regex;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
struct Definitions {
    users: Vec<User>,
    permissions: Vec<Permission>,
}

#[derive(Deserialize)]
struct User {
    name: String,
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct Permission {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

/// What one user may do, as RabbitMQ decides it.
struct Grants {
    configure: Regex,
    write: Regex,
    read: Regex,
}

const DEFAULT_EXCHANGE: &str = "amq.default";

fn definitions() -> Definitions {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/rabbitmq/definitions.json"
    );
    let text = std::fs::read_to_string(path).expect("deploy/rabbitmq/definitions.json");
    serde_json::from_str(&text).expect("definitions are JSON of RabbitMQ's shape")
}

fn grants(definitions: &Definitions, user: &str) -> Grants {
    let permission = definitions
        .permissions
        .iter()
        .find(|p| p.user == user)
        .unwrap_or_else(|| panic!("{user} has no permissions"));
    assert_eq!(permission.vhost, "/");
    let regex = |text: &str| Regex::new(text).unwrap_or_else(|e| panic!("{user}: {text}: {e}"));
    Grants {
        configure: regex(&permission.configure),
        write: regex(&permission.write),
        read: regex(&permission.read),
    }
}

/// The topology every process declares, with the default delay tiers and
/// others an operator may choose (milliseconds, seconds, minutes).
fn topologies() -> Vec<Topology> {
    let tiers = |t: &[u64]| t.iter().map(|ms| Duration::from_millis(*ms)).collect();
    vec![
        Topology::new("flotilla"),
        Topology::new("flotilla").with_delay_tiers(tiers(&[100, 500, 2_000, 90_000, 3_600_000])),
    ]
}

/// Names no Flotilla user may touch: another prefix's queues, a
/// look-alike, broker internals.
const OTHERS: [&str; 6] = [
    "other.jobs",
    "flotilla.jobs.evil",
    "xflotilla.jobs",
    "flotilla.delay.",
    "amq.gen-abc",
    "amq.topic",
];

#[test]
fn every_permission_names_a_defined_user_and_no_one_administers() {
    let definitions = definitions();
    for permission in &definitions.permissions {
        assert!(
            definitions.users.iter().any(|u| u.name == permission.user),
            "{} has permissions but is not defined",
            permission.user
        );
    }
    for user in &definitions.users {
        for tag in &user.tags {
            assert_eq!(tag, "monitoring", "{} is tagged {tag}", user.name);
        }
    }
}

#[test]
fn the_producer_declares_publishes_and_reads_what_it_must() {
    let definitions = definitions();
    let producer = grants(&definitions, "flotilla-producer");
    for topology in topologies() {
        for queue in topology.queue_names() {
            assert!(producer.configure.is_match(&queue), "declare {queue}");
            assert!(!producer.write.is_match(&queue), "write {queue}");
        }
        // The lock that keeps two controllers off one campaign.
        let lock = format!("{}.controller.cpe-fw-7.2.1", topology.prefix());
        assert!(producer.configure.is_match(&lock), "{lock}");
        // Campaign state, its catalogue and snapshots, and commands; dead
        // letters to list and redrive; the handoffs stream because
        // declaring waits until a reader can attach to it.
        for queue in [
            topology.events(),
            topology.control(),
            topology.campaigns(),
            topology.snapshots(),
            topology.handoffs(),
            topology.dead(),
        ] {
            assert!(producer.read.is_match(&queue), "read {queue}");
        }
        // Jobs are the workers' to take.
        assert!(!producer.read.is_match(&topology.jobs()));
        for delay in topology.delay_tiers() {
            assert!(!producer.read.is_match(&topology.delay_queue(*delay)));
        }
    }
    assert!(producer.write.is_match(DEFAULT_EXCHANGE));
    for other in OTHERS {
        assert!(!producer.configure.is_match(other), "declare {other}");
        assert!(!producer.read.is_match(other), "read {other}");
        assert!(!producer.write.is_match(other), "write {other}");
    }
}

#[test]
fn workers_take_jobs_and_tail_commands_but_never_read_dead_letters() {
    let definitions = definitions();
    let worker = grants(&definitions, "flotilla-worker");
    for topology in topologies() {
        for queue in topology.queue_names() {
            assert!(worker.configure.is_match(&queue), "declare {queue}");
        }
        // Jobs to consume; the control stream to tail; the handoffs
        // stream to fence redeliveries; every stream because declaring
        // waits until a reader can attach to it.
        for queue in [
            topology.jobs(),
            topology.control(),
            topology.events(),
            topology.campaigns(),
            topology.snapshots(),
            topology.handoffs(),
        ] {
            assert!(worker.read.is_match(&queue), "read {queue}");
        }
        assert!(!worker.read.is_match(&topology.dead()));
        let lock = format!("{}.controller.cpe-fw-7.2.1", topology.prefix());
        assert!(!worker.configure.is_match(&lock), "{lock}");
    }
    assert!(worker.write.is_match(DEFAULT_EXCHANGE));
    for other in OTHERS {
        assert!(!worker.configure.is_match(other), "declare {other}");
        assert!(!worker.read.is_match(other), "read {other}");
        assert!(!worker.write.is_match(other), "write {other}");
    }
}

#[test]
fn the_scaler_and_the_monitor_can_do_nothing_but_look() {
    let definitions = definitions();
    for user in ["flotilla-keda", "flotilla-monitor"] {
        let grants = grants(&definitions, user);
        for topology in topologies() {
            // A passive declare, which is how KEDA counts ready jobs, needs
            // no permission; anything else does.
            for name in topology
                .queue_names()
                .iter()
                .map(String::as_str)
                .chain([DEFAULT_EXCHANGE])
            {
                assert!(!grants.configure.is_match(name), "{user} declares {name}");
                assert!(!grants.write.is_match(name), "{user} writes {name}");
                assert!(!grants.read.is_match(name), "{user} reads {name}");
            }
        }
    }
}
