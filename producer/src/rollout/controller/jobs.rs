//! A device's first job as the controller publishes it (signed, with its
//! trace started), the `published` events that go with a batch, and the
//! batches whose commits have been answered.

use super::*;

impl<O: FnMut(&CampaignState)> Controller<'_, O> {
    /// A device's first job (its body and message, signed) and the event
    /// recording its publication in `wave`.
    pub(super) fn job_message(&self, device: Device, wave: u32) -> (Vec<u8>, Message, Event) {
        let mut job = Job::new(
            &self.campaign.id,
            device,
            self.campaign.target.clone(),
            self.campaign.policy.clone(),
        );
        job.settings = self.campaign.settings_for(job.device.kind);
        job.tls = self
            .campaign
            .tls
            .profile_for(job.device.group.as_deref())
            .clone();
        let body = serde_json::to_vec(&job).expect("a job serializes to JSON");
        // The device's rollout is one trace, started here; the job
        // carries its context to every step.
        let rollout_span = info_span!(
            parent: None,
            "rollout",
            otel.name = %format!("rollout {}", job.device.kind),
            campaign = %job.campaign,
            device = %job.device.id,
            kind = %job.device.kind,
        );
        let mut headers = FieldTable::default();
        rollout_span.in_scope(|| telemetry::inject_current(&mut headers));
        let message = Message::new(JOB_MESSAGE_TYPE)
            .id(format!("{}/{}/0", job.campaign, job.device.id))
            .headers(headers)
            .signed(&self.keyring, &body);
        let event = Event::new(
            &self.campaign.id,
            EventBody::Published(PublishedEvent {
                device: job.device.id,
                kind: job.device.kind,
                wave: Some(wave),
            }),
        );
        (body, message, event)
    }

    /// Adds the events to the transaction open on `channel`, as one record.
    pub(super) async fn add_to_transaction(
        &self,
        channel: &TxPublisher,
        events: &[Event],
    ) -> Result<(), ProducerError> {
        if events.is_empty() {
            return Ok(());
        }
        let (body, kind) = EventRecord::encode(events);
        channel
            .send(&self.topology.events(), &body, Message::new(kind))
            .await?;
        Ok(())
    }

    /// Applies the batches whose commits have been answered, without
    /// waiting.
    pub(super) fn apply_committed(
        &mut self,
        steering: &mut Steering<'_>,
    ) -> Result<(), ProducerError> {
        for committed in self.launcher.answered() {
            steering.published(&committed?);
        }
        Ok(())
    }

    /// Waits for every commit under way, applying each batch.
    pub(super) async fn await_commits(
        &mut self,
        steering: &mut Steering<'_>,
    ) -> Result<(), ProducerError> {
        while self.launcher.is_committing() {
            let committed = self.launcher.committed().await?;
            steering.published(&committed);
        }
        Ok(())
    }
}
