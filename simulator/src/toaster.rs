//! A toaster: `POST /toast` starts it, `GET /toast` says `done` after a while.

use crate::{
    Expectation, Simulated,
    build::{Builder, Seed},
};
use axum::{Router, extract::State, routing::get};
use flotilla_common::DeviceKind;
use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

const ERROR: &str = "simulated transient failure";

pub(crate) async fn simulate(fleet: &mut Builder<'_>) -> std::io::Result<()> {
    let kind = DeviceKind::Toaster;
    let spec = fleet.spec;
    for i in 0..fleet.count(kind) {
        let toaster = Toaster::default();
        let routes = Router::new()
            .route("/toast", get(status).post(toast))
            .with_state(toaster.clone());
        let behaviour = fleet.behaviour(Seed::new(kind, "host", i), ERROR);
        let host = fleet.serve(spec.ip, routes, behaviour, false).await?;
        let device = crate::build::device(
            format!("toaster-{:04}", i + 1),
            kind,
            Builder::url(host.addr(), false),
        );
        fleet.add(device, Expectation::succeeded(), Arc::new(toaster));
    }
    Ok(())
}

/// One toaster; cheap to clone.
#[derive(Clone, Default)]
pub struct Toaster {
    toasts: Arc<AtomicU32>,
}

impl Simulated for Toaster {
    fn upgrades(&self) -> u32 {
        self.toasts.load(Ordering::SeqCst)
    }
}

async fn status(State(toaster): State<Toaster>) -> &'static str {
    if toaster.toasts.load(Ordering::SeqCst) > 0 {
        "done"
    } else {
        "cold"
    }
}

async fn toast(State(toaster): State<Toaster>) {
    toaster.toasts.fetch_add(1, Ordering::SeqCst);
}
