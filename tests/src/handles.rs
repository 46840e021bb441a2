//! What a test holds of the controllers and workers it started in-process.

use flotilla_producer::{CampaignState, ProducerError};
use flotilla_worker::WorkerError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A campaign controller running in the background.
pub struct ControllerHandle {
    pub(crate) task: JoinHandle<Result<CampaignState, ProducerError>>,
}

impl ControllerHandle {
    /// Waits for the controller to finish the campaign.
    pub async fn finished(self) -> CampaignState {
        self.task
            .await
            .expect("the controller did not panic")
            .expect("the controller ran the campaign to its end")
    }

    /// Waits for the controller, returning its error.
    pub async fn result(self) -> Result<CampaignState, ProducerError> {
        self.task.await.expect("the controller did not panic")
    }

    /// Stops the controller at once, as a crash would.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// An in-process worker.
pub struct WorkerHandle {
    pub(crate) stop: CancellationToken,
    pub(crate) task: JoinHandle<Result<(), WorkerError>>,
}

impl WorkerHandle {
    /// Asks the worker to stop and waits for it to drain.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task
            .await
            .expect("the worker task did not panic")
            .expect("the worker stopped cleanly");
    }
}
