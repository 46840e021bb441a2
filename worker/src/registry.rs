//! The drivers a worker runs, by device kind, behind one object-safe face
//! ([`AnyDriver`]) so that the delivery loop needs no driver's types.

use crate::{
    driver::{Driver, Rejection},
    drivers,
    step::{self, Executed, StepEnv},
};
use flotilla_common::{DeviceKind, Job};
use futures::future::BoxFuture;
use std::collections::HashMap;

/// A [`Driver`] seen from the delivery loop. Implemented for every driver;
/// not meant to be implemented.
pub(crate) trait AnyDriver: Send + Sync {
    fn kind(&self) -> DeviceKind;

    /// Decodes the job's step, once, for the pipeline to run.
    fn prepare<'d>(&'d self, job: Job) -> Result<Box<dyn Prepared<'d> + 'd>, Rejection>;
}

/// A job whose step is decoded, ready to run.
pub(crate) trait Prepared<'d>: Send {
    /// The step's name, for the span and the events.
    fn step_name(&self) -> &'static str;

    fn execute<'a>(
        self: Box<Self>,
        cancelled: bool,
        env: &'a StepEnv<'a>,
    ) -> BoxFuture<'a, Result<Executed, Rejection>>
    where
        'd: 'a;
}

impl<D: Driver> AnyDriver for D {
    fn kind(&self) -> DeviceKind {
        D::KIND
    }

    fn prepare<'d>(&'d self, job: Job) -> Result<Box<dyn Prepared<'d> + 'd>, Rejection> {
        let step = step::decode_step(self, &job.step)?;
        Ok(Box::new(Typed {
            driver: self,
            job,
            step,
        }))
    }
}

struct Typed<'d, D: Driver> {
    driver: &'d D,
    job: Job,
    step: D::Step,
}

impl<'d, D: Driver> Prepared<'d> for Typed<'d, D> {
    fn step_name(&self) -> &'static str {
        D::step_name(&self.step)
    }

    fn execute<'a>(
        self: Box<Self>,
        cancelled: bool,
        env: &'a StepEnv<'a>,
    ) -> BoxFuture<'a, Result<Executed, Rejection>>
    where
        'd: 'a,
    {
        let Typed { driver, job, step } = *self;
        Box::pin(step::execute(driver, job, step, cancelled, env))
    }
}

/// The drivers a worker runs, by device kind: one for every kind.
pub(crate) struct Registry {
    drivers: HashMap<DeviceKind, Box<dyn AnyDriver>>,
}

impl Registry {
    /// Every driver Flotilla ships, from the table in [`drivers`], each
    /// under the kind it says it drives.
    pub(crate) fn standard() -> Self {
        Registry {
            drivers: DeviceKind::ALL
                .into_iter()
                .map(drivers::driver_for)
                .map(|driver| (driver.kind(), driver))
                .collect(),
        }
    }

    pub(crate) fn get(&self, kind: DeviceKind) -> &dyn AnyDriver {
        self.drivers
            .get(&kind)
            .expect("the registry holds every kind: `standard` has a driver for each, checked by a test")
            .as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_driver() {
        let registry = Registry::standard();
        assert_eq!(registry.drivers.len(), DeviceKind::ALL.len());
        for kind in DeviceKind::ALL {
            let driver = registry
                .drivers
                .get(&kind)
                .unwrap_or_else(|| panic!("no driver drives {kind}"));
            assert_eq!(driver.kind(), kind);
        }
    }
}
