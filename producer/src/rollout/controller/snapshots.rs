//! Writing the campaign's snapshot (and the cap ledger's) for cheap
//! readers: soon after a change, else as a heartbeat.

use super::*;

impl<O: FnMut(&CampaignState)> Controller<'_, O> {
    /// When the next snapshot is due (`None`: now, there is none yet): soon
    /// after a change, else a heartbeat.
    pub(super) fn snapshot_due(&self) -> Option<Instant> {
        match self.snapshot {
            None => None,
            Some((at, covers)) if covers != self.position => Some(at + SNAPSHOT_EVERY),
            Some((at, _)) => Some(at + SNAPSHOT_HEARTBEAT),
        }
    }

    /// Writes the campaign's state (and the ledger, if capped) as of the
    /// events read so far, when due. What the controller applied before
    /// reading it back (its own publications and decisions) is in it too:
    /// a reader applying the events after `position` sees those again and
    /// counts them once, as the state does.
    pub(super) async fn snapshot_if_due(
        &mut self,
        steering: &Steering<'_>,
    ) -> Result<(), ProducerError> {
        if self.snapshot_due().is_some_and(|due| Instant::now() < due) {
            return Ok(());
        }
        let covers = self.position;
        catalogue::write_snapshot(
            &self.decisions,
            self.topology,
            covers,
            &steering.state.snapshot(),
        )
        .await?;
        if self.capped {
            catalogue::write_ledger(
                &self.decisions,
                self.topology,
                covers,
                &steering.ledger.snapshot(),
            )
            .await?;
        }
        self.snapshot = Some((Instant::now(), covers));
        Ok(())
    }
}
