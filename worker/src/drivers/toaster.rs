//! A toaster: `POST /toast`, then `GET /toast` until it is done.

use crate::driver::{Driver, Next, StepContext, StepError};
use flotilla_common::DeviceKind;
use serde::{Deserialize, Serialize};

pub(crate) struct Toaster;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ToasterStep {
    Toast,
    Wait,
}

impl Driver for Toaster {
    type Step = ToasterStep;
    const KIND: DeviceKind = DeviceKind::Toaster;

    fn first_step(&self) -> ToasterStep {
        ToasterStep::Toast
    }

    fn step_name(step: &ToasterStep) -> &'static str {
        match step {
            ToasterStep::Toast => "toast",
            ToasterStep::Wait => "wait",
        }
    }

    async fn run(
        &self,
        step: ToasterStep,
        cx: &StepContext<'_>,
    ) -> Result<Next<ToasterStep>, StepError> {
        let reply = cx.http.get("/toast").send().await?.success()?;
        let done = reply.body == b"done";
        match step {
            _ if done => Ok(Next::succeeded()),
            ToasterStep::Toast => {
                cx.http.post("/toast").send().await?.success()?;
                Ok(Next::poll(ToasterStep::Wait))
            }
            ToasterStep::Wait => Ok(Next::poll(ToasterStep::Wait)),
        }
    }

    fn cleanup(&self, _step: &ToasterStep) -> Option<ToasterStep> {
        None
    }
}
