//! The controller's hold on the broker: connecting and reading its
//! campaign in, the one-controller-per-campaign lock, and reconnecting
//! after a lost connection without publishing any device twice.

use super::*;

impl<'a, O: FnMut(&CampaignState)> Controller<'a, O> {
    /// Connects, reads the campaign (and, if capped, the cap ledger) to the
    /// end of the events stream, and writes the `started` decision or
    /// checks a resumed run uses the campaign's files.
    pub(super) async fn connect(
        broker: &Broker,
        topology: &'a Topology,
        campaign: &'a Campaign,
        spec: &RunSpec<'_>,
        observe: O,
    ) -> Result<(Controller<'a, O>, Steering<'a>), ProducerError> {
        topology.declare(broker).await?;
        let connection = broker.connection().await?;
        hold_campaign_lock(&connection, topology, &campaign.id).await?;
        let (mut controller, mut steering, commands) =
            match Self::read_in(&connection, topology, campaign, spec, observe).await {
                Ok(read) => read,
                Err(error) => {
                    release_campaign_lock(&connection, topology, &campaign.id).await;
                    return Err(error);
                }
            };
        controller.connection = Some(connection);
        let begun = async {
            controller.start_or_resume(&mut steering, spec).await?;
            for (offset, message) in commands {
                controller.command(&mut steering, offset, &message).await?;
            }
            Ok(())
        };
        match begun.await {
            Ok(()) => Ok((controller, steering)),
            Err(error) => {
                controller.release_lock().await;
                Err(error)
            }
        }
    }

    /// [`Controller::connect`] once the campaign lock is held: the streams
    /// read to their ends, and the commands to answer.
    pub(super) async fn read_in(
        connection: &deadpool_lapin::Connection,
        topology: &'a Topology,
        campaign: &'a Campaign,
        spec: &RunSpec<'_>,
        observe: O,
    ) -> Result<(Controller<'a, O>, Steering<'a>, Vec<(u64, ControlMessage)>), ProducerError> {
        let decisions = Publisher::open(connection).await?;
        let lookup = Lookup::read(connection, topology, &campaign.id).await?;
        let rollout = &campaign.rollout;
        let capped = rollout.per_host.is_some() || rollout.per_image_host.is_some();

        // The ledger comes from a recent snapshot of any capped controller,
        // or is folded from where no capped campaign had room.
        let mut ledger = CapLedger::default();
        let (ledger_from, ledger_covers) = if capped {
            match Recent::read(connection, topology, &campaign.id)
                .await?
                .ledger
            {
                Some((covers, snapshot)) => {
                    ledger = CapLedger::from_snapshot(snapshot);
                    (Some(covers + 1), Some(covers))
                }
                None => (lookup.ledger_start(), None),
            }
        } else {
            (None, None)
        };
        let campaign_from = lookup.created.as_ref().map(|c| c.events_offset);
        let from = match (campaign_from, ledger_from) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let whose = if from.is_some() && from == campaign_from {
            format!("campaign {}", campaign.id)
        } else {
            "the concurrency-cap ledger".to_owned()
        };

        let mut state = CampaignState::new(&campaign.id);
        let mut completed_at = None;
        let mut events =
            EventFeed::open(connection, topology, from.map_or(Offset::Next, Offset::At)).await?;
        let expect = from.map(|first| {
            (
                first,
                Gone {
                    whose: &whose,
                    topology,
                },
            )
        });
        let position = events
            .catch_up(connection, expect, None, |offset, event| {
                note_completed(&mut completed_at, offset, &event, &campaign.id);
                state.apply(&event);
                if capped && ledger_covers.is_none_or(|covers| offset > covers) {
                    ledger.apply(&event);
                }
            })
            .await?
            .ok_or(BrokerError::ConnectionLost)?;
        if lookup.created.is_none() {
            // Before the `started` decision: every campaign that has one
            // can be found.
            let created = Created {
                campaign: campaign.id.clone(),
                at: Utc::now(),
                events_offset: position,
                capped,
            };
            catalogue::record_created(&decisions, topology, created).await?;
        }

        let mut control = ControlFeed::open(connection, topology, Offset::First).await?;
        let commands = control.catch_up(connection).await?;
        let launcher = Launcher::open(connection).await?;
        let controller = Controller {
            campaign,
            topology,
            inventory: spec.inventory.to_owned(),
            only: spec.only.clone(),
            capped,
            position,
            control_position: commands.last().map(|(offset, _)| *offset),
            completed_at,
            ended_recorded: lookup.ended.is_some(),
            snapshot: None,
            connection: None,
            decisions,
            launcher,
            keyring: spec.keyring.clone(),
            event_rx: forward(events),
            control_rx: forward_control(control),
            observe,
        };
        let cursor = Cursor::open(spec.inventory, spec.only.clone())?;
        let steering = Steering::new(campaign, state, ledger, cursor);
        Ok((controller, steering, commands))
    }

    /// Gives the campaign lock up, so that this process (whose connection
    /// the pool keeps) may run the campaign again. Best effort: a lock on a
    /// dead connection is gone anyway.
    pub(super) async fn release_lock(&self) {
        if let Some(connection) = &self.connection {
            release_campaign_lock(connection, self.topology, &self.campaign.id).await;
        }
    }

    /// Reconnects with backoff until it works or fails for another reason
    /// than the broker being away.
    pub(super) async fn reconnect(
        &mut self,
        broker: &Broker,
        steering: &mut Steering<'_>,
    ) -> Result<(), ProducerError> {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            tokio::time::sleep(backoff).await;
            match self.reattach(broker, steering).await {
                Ok(()) => return Ok(()),
                // The broker may not have noticed yet that the old
                // connection, which held the campaign lock, is gone.
                Err(error @ ProducerError::AlreadyRunning { .. }) => {
                    warn!(%error, retry_in = ?backoff, "the old connection still holds the campaign lock")
                }
                Err(error) if error.is_connection_loss() => {
                    warn!(%error, retry_in = ?backoff, "reconnecting to the broker")
                }
                Err(error) => return Err(error),
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    /// A new connection, the streams read on from where they were to their
    /// end, and the inventory walked again from the top (devices that were
    /// being published are skipped if the stream has them).
    pub(super) async fn reattach(
        &mut self,
        broker: &Broker,
        steering: &mut Steering<'_>,
    ) -> Result<(), ProducerError> {
        while let Ok(Ok((offset, event))) = self.event_rx.try_recv() {
            self.apply_read(steering, offset, &event);
        }
        // Commands received but not applied are read again: the control
        // feed reopens after the last one applied.
        self.topology.declare(broker).await?;
        let connection = broker.connection().await?;
        hold_campaign_lock(&connection, self.topology, &self.campaign.id).await?;
        let (position, control_from) = (self.position, self.control_position);
        let read_on = async {
            let decisions = Publisher::open(&connection).await?;
            let launcher = Launcher::open(&connection).await?;
            let mut events =
                EventFeed::open(&connection, self.topology, Offset::At(position + 1)).await?;
            let mut read = Vec::new();
            let position = events
                .catch_up(&connection, None, None, |offset, event| {
                    read.push((offset, event))
                })
                .await?
                .ok_or(BrokerError::ConnectionLost)?;
            let control_from = control_from.map_or(Offset::First, |p| Offset::At(p + 1));
            let mut control = ControlFeed::open(&connection, self.topology, control_from).await?;
            let commands = control.catch_up(&connection).await?;
            Ok::<_, ProducerError>((
                decisions, launcher, events, read, position, control, commands,
            ))
        };
        let (decisions, launcher, events, read, position, control, commands) = match read_on.await {
            Ok(read) => read,
            Err(error) => {
                // Another attempt may get another connection: free this
                // one's lock if it still lives.
                release_campaign_lock(&connection, self.topology, &self.campaign.id).await;
                return Err(error);
            }
        };

        for (offset, event) in read {
            self.apply_read(steering, offset, &event);
        }
        self.position = self.position.max(position);
        self.connection = Some(connection);
        self.decisions = decisions;
        // Batches whose commits were not answered are in the stream (read
        // above) or nowhere: the devices of those nowhere are read again
        // with the inventory and published anew.
        self.launcher = launcher;
        steering.reread(Cursor::open(&self.inventory, self.only.clone())?);
        self.event_rx = forward(events);
        self.control_rx = forward_control(control);
        for (offset, message) in commands {
            self.command(steering, offset, &message).await?;
        }
        Ok(())
    }
}

/// One controller per campaign: a second `run` of a campaign that is
/// running would start its devices twice. The lock is an exclusive queue,
/// which the broker deletes with this connection, so a crashed controller
/// never blocks its own restart.
pub(super) async fn hold_campaign_lock(
    connection: &lapin::Connection,
    topology: &Topology,
    campaign: &str,
) -> Result<(), ProducerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let name = format!("{}.controller.{campaign}", topology.prefix());
    let options = lapin::options::QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    match channel
        .queue_declare(name.as_str().into(), options, Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 405) => {
            Err(ProducerError::AlreadyRunning {
                campaign: campaign.to_owned(),
            })
        }
        Err(error) => Err(BrokerError::from(error).into()),
    }
}

pub(super) async fn release_campaign_lock(
    connection: &lapin::Connection,
    topology: &Topology,
    campaign: &str,
) {
    let name = format!("{}.controller.{campaign}", topology.prefix());
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .queue_delete(name.as_str().into(), Default::default())
            .await;
        let _ = channel.close(200, "campaign lock released".into()).await;
    }
}

/// Notes the offset of the campaign's `completed` decision.
pub(super) fn note_completed(
    completed_at: &mut Option<u64>,
    offset: u64,
    event: &Event,
    campaign: &str,
) {
    if event.campaign == campaign
        && let EventBody::Decision(DecisionEvent {
            decision: Decision::Completed,
            ..
        }) = &event.body
    {
        completed_at.get_or_insert(offset);
    }
}

/// Reads the events stream in the background.
pub(super) fn forward(mut feed: EventFeed) -> mpsc::Receiver<Result<(u64, Event), BrokerError>> {
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        loop {
            let event = feed.next().await;
            let failed = event.is_err();
            if tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

pub(super) fn forward_control(
    mut feed: ControlFeed,
) -> mpsc::Receiver<Result<(u64, ControlMessage), BrokerError>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let command = feed.next().await;
            let failed = command.is_err();
            if tx.send(command).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}
