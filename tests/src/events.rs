//! What a test reads of the events stream (a campaign's state, its step
//! events, waiting for either) and the filler it writes into it.

use crate::Harness;
use flotilla_common::{
    Event, EventBody, Message, Publisher, StepEvent,
    stream::{Offset, StreamReader},
};
use flotilla_producer::CampaignState;
use std::time::Duration;

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

    /// Every event of `campaign` in the stream now (reads until it has been
    /// quiet for a second).
    pub async fn all_events(&self, campaign: &str) -> CampaignState {
        let mut tracker = CampaignState::new(campaign);
        let result = flotilla_producer::follow_campaign(
            &self.broker,
            &self.topology,
            &mut tracker,
            Duration::from_secs(1),
            |_| false,
            |_| {},
        )
        .await;
        assert!(
            matches!(result, Err(flotilla_producer::FollowError::Quiet(_))),
            "reading events: {result:?}"
        );
        tracker
    }

    /// Every step event of `campaign` in the stream now, in stream order
    /// (reads until it has been quiet for a second).
    pub async fn step_events(&self, campaign: &str) -> Vec<StepEvent> {
        let connection = self.broker.connection().await.expect("broker reachable");
        let mut reader = StreamReader::open(&connection, &self.topology.events(), Offset::First)
            .await
            .expect("the events stream opens");
        let mut steps = Vec::new();
        loop {
            let record = match tokio::time::timeout(Duration::from_secs(1), reader.next()).await {
                Err(_) => break,
                Ok(Some(Ok(record))) => record,
                Ok(other) => panic!("reading events: {other:?}"),
            };
            for event in record.events().unwrap_or_default() {
                if event.campaign == campaign
                    && let EventBody::Step(step) = event.body
                {
                    steps.push(step);
                }
            }
        }
        steps
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
