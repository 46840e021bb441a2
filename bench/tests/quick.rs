//! CI runs the throughput benchmark's quick size once: it must run to its
//! end against the real broker, worker and producer processes, with every
//! outcome the simulator's. Its figures are not judged here (timing
//! targets belong to the benchmark itself, see the README).

use std::process::Command;

#[test]
fn the_quick_throughput_benchmark_completes_with_every_outcome_as_simulated() {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args(["throughput", "--quick"])
        .output()
        .expect("flotilla-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "flotilla-bench throughput --quick failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("every outcome matched the simulator"),
        "{stdout}"
    );
    for row in ["| 1 |", "| 2 |", "| producer, no workers |"] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}
