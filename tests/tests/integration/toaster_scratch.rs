use flotilla_common::{DeviceKind, Outcome};
use flotilla_sim::{Fleet, FleetSpec};
use flotilla_tests::{Harness, fleet_credentials};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasters_toast() {
    let harness = Harness::new("toaster").await;
    let fleet = Fleet::start(FleetSpec::default().with(DeviceKind::Toaster, 3))
        .await
        .unwrap();
    let worker = harness.start_worker("w1", fleet_credentials(&fleet));
    let campaign = harness.campaign("toaster");
    let controller = harness.start_campaign(&campaign, fleet.devices());
    let state = controller.finished().await;
    worker.stop().await;
    for device in fleet.devices() {
        assert_eq!(
            state.outcome_of(&device.id).unwrap().ending.outcome,
            Outcome::Succeeded
        );
        assert_eq!(fleet.upgrades_of(&device.id), 1);
    }
    let _ = Duration::ZERO;
    harness.teardown().await;
}
