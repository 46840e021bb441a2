//! What a test reads of the events stream (a campaign's state, its step
//! events, waiting for either) and the filler it writes into it.

use crate::Harness;
use flotilla_common::{
    Event, EventBody, Message, Publisher, StepEvent, broker,
    stream::{Marker, Offset, StreamReader},
};
use flotilla_producer::CampaignState;
use std::time::Duration;

/// Far more than reading a test's events stream to its end takes (well
/// under a second), and less than the test runner's timeout.
const READ_NOW_LIMIT: Duration = Duration::from_secs(60);

impl Harness {
    /// Follows the events stream until `devices` devices of `campaign` have
    /// finished.
    pub async fn wait_finished(
        &self,
        campaign: &str,
        devices: usize,
        within: Duration,
    ) -> CampaignState {
        let what = format!("{devices} finished devices");
        self.wait_until(campaign, within, &what, |t| t.finished() >= devices)
            .await
    }

    /// Follows the events stream until `condition` holds for `campaign`.
    pub async fn wait_until(
        &self,
        campaign: &str,
        within: Duration,
        what: &str,
        condition: impl FnMut(&CampaignState) -> bool,
    ) -> CampaignState {
        let mut state = CampaignState::new(campaign);
        let follow = flotilla_producer::follow_campaign(
            &self.broker,
            &self.topology,
            &mut state,
            within,
            condition,
            |_| {},
        );
        match tokio::time::timeout(within, follow).await {
            Ok(Ok(())) => state,
            Ok(Err(error)) => panic!("{campaign}: waiting for {what}: {error}"),
            Err(_) => panic!(
                "{campaign}: no {what} within {within:?} ({} devices finished)",
                state.finished()
            ),
        }
    }

    /// Every event of `campaign` in the stream now.
    pub async fn all_events(&self, campaign: &str) -> CampaignState {
        let mut tracker = CampaignState::new(campaign);
        self.each_event_now(|event| {
            if event.campaign == campaign {
                tracker.apply(&event);
            }
        })
        .await;
        tracker
    }

    /// Every step event of `campaign` in the stream now, in stream order.
    pub async fn step_events(&self, campaign: &str) -> Vec<StepEvent> {
        let mut steps = Vec::new();
        self.each_event_now(|event| {
            if event.campaign == campaign
                && let EventBody::Step(step) = event.body
            {
                steps.push(step);
            }
        })
        .await;
        steps
    }

    /// Hands every event written to the stream before the call to `each`,
    /// reading up to a marker of its own (see `flotilla_common::stream`).
    /// Panics if that takes longer than [`READ_NOW_LIMIT`]: a read that
    /// hangs fails its test at once, saying where, instead of at the test
    /// runner's timeout.
    async fn each_event_now(&self, mut each: impl FnMut(Event)) {
        let read = async {
            let connection = self.broker.connection().await.expect("broker reachable");
            let events = self.topology.events();
            let mut reader = StreamReader::open(&connection, &events, Offset::First)
                .await
                .expect("the events stream opens");
            let now = Marker::publish(&connection, &events)
                .await
                .expect("a marker is appended");
            reader
                .read_to(&now, |record| {
                    record
                        .events()
                        .unwrap_or_default()
                        .into_iter()
                        .for_each(&mut each)
                })
                .await
                .expect("reading the events stream");
            broker::close_connection(&connection, "read the events").await;
        };
        if tokio::time::timeout(READ_NOW_LIMIT, read).await.is_err() {
            panic!(
                "reading {} up to now took over {READ_NOW_LIMIT:?}",
                self.topology.events()
            );
        }
    }

    /// Appends `count` events of an unrelated campaign to the events stream,
    /// as fast as the broker takes them: several channels, each keeping
    /// many publishes in flight before waiting for their confirms.
    pub async fn write_filler(&self, count: usize) {
        const CHANNELS: usize = 4;
        const IN_FLIGHT: usize = 1000;
        let event = Event::new(
            "filler",
            EventBody::Step(StepEvent {
                device: "cpe-filler-000001".into(),
                kind: flotilla_common::DeviceKind::Dms,
                seq: 3,
                step: "poll_result".into(),
                attempt: 1,
                duration_ms: 4,
                next: Some("poll_result".into()),
                delay_ms: Some(1000),
                error: None,
                note: Some("download 42%".into()),
                worker: Some("filler".into()),
                tls_unverified: false,
                calls: None,
            }),
        );
        let body = std::sync::Arc::new(serde_json::to_vec(&event).expect("an event serializes"));
        let mut tasks = tokio::task::JoinSet::new();
        for channel in 0..CHANNELS {
            let (broker, queue, body) = (self.broker.clone(), self.topology.events(), body.clone());
            let share = count / CHANNELS + usize::from(channel < count % CHANNELS);
            tasks.spawn(async move {
                let connection = broker.connection().await.expect("broker reachable");
                let publisher = Publisher::open(&connection).await.expect("a publisher");
                let mut pending = Vec::with_capacity(IN_FLIGHT);
                for _ in 0..share {
                    let confirm = publisher
                        .send(
                            &queue,
                            &body,
                            Message::new(flotilla_common::EVENT_MESSAGE_TYPE),
                        )
                        .await
                        .expect("publishing filler");
                    pending.push(confirm);
                    if pending.len() == IN_FLIGHT {
                        for confirm in pending.drain(..) {
                            confirm.wait().await.expect("filler confirmed");
                        }
                    }
                }
                for confirm in pending {
                    confirm.wait().await.expect("filler confirmed");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a filler task did not panic");
        }
    }
}
