//! Flotilla's own processes as the benchmark runs them (real
//! `flotilla-worker`s and `flotilla-producer run`, so their memory is their
//! own), their peak memory, and what their metrics say.

use anyhow::Context;
use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::{Child, Command};

/// How often a running producer's peak memory is read: it can only be read
/// while the process lives.
const RSS_EVERY: Duration = Duration::from_millis(50);
/// A worker that is not consuming this long after its start is broken.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Where one run's processes find the broker and their queues.
pub(crate) struct RunEnv {
    pub amqp_url: String,
    pub prefix: String,
    /// Logs, the campaign file and the inventory.
    pub dir: PathBuf,
    /// The fleet's login, as workers resolve the `sim` reference.
    pub login: (String, String),
    /// The job keys the producer signs and the workers verify with
    /// (`FLOTILLA_JOB_KEYS`: `id=path`).
    pub job_keys: String,
}

impl RunEnv {
    fn broker_env(&self) -> [(&'static str, String); 3] {
        [
            ("AMQP_URL", self.amqp_url.clone()),
            ("FLOTILLA_PREFIX", self.prefix.clone()),
            (
                flotilla_common::signing::ENV_JOB_KEYS,
                self.job_keys.clone(),
            ),
        ]
    }

    fn log(&self, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
        let path = self.dir.join(format!("{name}.log"));
        let log =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok((Stdio::from(log.try_clone()?), Stdio::from(log)))
    }
}

/// A running `flotilla-worker`.
pub(crate) struct Worker {
    child: Child,
    pid: u32,
    metrics: SocketAddr,
}

impl Worker {
    /// Starts a worker (concurrency 64, the default) and waits until it
    /// consumes.
    pub(crate) async fn start(env: &RunEnv, binary: &Path, name: &str) -> anyhow::Result<Worker> {
        let metrics = free_port()?;
        let (stdout, stderr) = env.log(name)?;
        let child = Command::new(binary)
            .envs(env.broker_env())
            .env("FLOTILLA_METRICS_ADDR", metrics.to_string())
            .env("FLOTILLA_WORKER_NAME", name)
            .env("FLOTILLA_CREDENTIALS_SIM_USERNAME", &env.login.0)
            .env("FLOTILLA_CREDENTIALS_SIM_PASSWORD", &env.login.1)
            .env(
                "FLOTILLA_CREDENTIALS_SIM_ALLOWED_HOSTS",
                flotilla_tests::FLEET_ALLOWED_HOSTS,
            )
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the worker has a pid")?;
        let worker = Worker {
            child,
            pid,
            metrics,
        };
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        while !matches!(get(metrics, "/readyz").await, Ok((200, _))) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "worker {name} was not ready within {READY_WITHIN:?} (see {})",
                env.dir.join(format!("{name}.log")).display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(worker)
    }

    /// Its metrics, in Prometheus' text format.
    pub(crate) async fn metrics(&self) -> anyhow::Result<Metrics> {
        let (status, body) = get(self.metrics, "/metrics").await?;
        anyhow::ensure!(status == 200, "worker /metrics answered {status}");
        Ok(Metrics(body))
    }

    pub(crate) fn peak_rss(&self) -> anyhow::Result<u64> {
        peak_rss(self.pid)
    }

    /// Kills it: its figures are read, and nothing of it is left in flight
    /// once the campaign has completed.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Runs `flotilla-producer run` to its end; returns its exit status, how
/// long it took and its peak memory (read every [`RSS_EVERY`]).
pub(crate) async fn run_producer(
    env: &RunEnv,
    binary: &Path,
    campaign: &Path,
    inventory: &Path,
) -> anyhow::Result<(i32, Duration, u64)> {
    let started = std::time::Instant::now();
    let mut producer = spawn_producer(env, binary, campaign, inventory)?;
    let pid = producer.id().context("the producer has a pid")?;
    let mut peak = 0;
    let status = loop {
        tokio::select! {
            status = producer.wait() => break status?,
            _ = tokio::time::sleep(RSS_EVERY) => {
                if let Ok(rss) = peak_rss(pid) {
                    peak = peak.max(rss);
                }
            }
        }
    };
    let took = started.elapsed();
    let code = status
        .code()
        .with_context(|| format!("the producer ended by a signal ({status})"))?;
    Ok((code, took, peak))
}

/// Starts `flotilla-producer run`, its output in the run's directory.
pub(crate) fn spawn_producer(
    env: &RunEnv,
    binary: &Path,
    campaign: &Path,
    inventory: &Path,
) -> anyhow::Result<Child> {
    let (stdout, stderr) = env.log("producer")?;
    Command::new(binary)
        .arg("run")
        .arg("--campaign")
        .arg(campaign)
        .arg("--inventory")
        .arg(inventory)
        .envs(env.broker_env())
        .env("FLOTILLA_METRICS_ADDR", "off")
        .env("RUST_LOG", "warn")
        // As the producer's image runs it (see the Dockerfile): its memory
        // figures are those of a deployment.
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// A process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .with_context(|| format!("no VmHWM in {path}"))?;
    Ok(kb * 1024)
}

/// A loopback address nobody listens on now.
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let answer = reqwest::get(format!("http://{addr}{path}")).await?;
    Ok((answer.status().as_u16(), answer.text().await?))
}

/// A scrape of Prometheus' text format.
pub(crate) struct Metrics(String);

impl Metrics {
    /// The sample of `name` (no labels), zero if absent.
    pub(crate) fn value(&self, name: &str) -> f64 {
        self.samples(name).next().map_or(0.0, |(_, value)| value)
    }

    /// The cumulative buckets of histogram `name`: (upper bound, count).
    pub(crate) fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        self.samples(&bucket)
            .filter_map(|(labels, count)| {
                let le = labels.strip_prefix("le=\"")?.strip_suffix('"')?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, count))
            })
            .collect()
    }

    /// `(labels, value)` of every sample of `name`, labels without braces.
    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels, value.trim().parse().ok()?))
        })
    }
}

/// Histograms merged across processes.
#[derive(Default, Clone)]
pub(crate) struct Histogram {
    /// Cumulative counts by upper bound, ascending.
    buckets: Vec<(f64, f64)>,
}

impl Histogram {
    pub(crate) fn add(&mut self, buckets: &[(f64, f64)]) {
        if self.buckets.is_empty() {
            self.buckets = buckets.to_vec();
            return;
        }
        for ((bound, count), (other, more)) in self.buckets.iter_mut().zip(buckets) {
            debug_assert_eq!(bound, other, "one build's buckets");
            *count += more;
        }
    }

    pub(crate) fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |(_, count)| *count)
    }

    /// The `q` quantile (0..1), interpolated inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without observations.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(bound, count) in &self.buckets {
            if count >= rank {
                if bound.is_infinite() {
                    return Some(Duration::from_secs_f64(lower));
                }
                let inside = count - below;
                let share = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(Duration::from_secs_f64(lower + (bound - lower) * share));
            }
            (lower, below) = (bound, count);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let metrics = Metrics(
            "# HELP x_seconds How late.\n\
             x_seconds_bucket{le=\"0.1\"} 50\n\
             x_seconds_bucket{le=\"0.2\"} 90\n\
             x_seconds_bucket{le=\"+Inf\"} 100\n\
             x_seconds_count 100\n\
             y_total 7\n"
                .to_owned(),
        );
        assert_eq!(metrics.value("y_total"), 7.0);
        let mut histogram = Histogram::default();
        histogram.add(&metrics.buckets("x_seconds"));
        histogram.add(&metrics.buckets("x_seconds"));
        assert_eq!(histogram.count(), 200.0);
        let ms = |q| histogram.quantile(q).unwrap().as_secs_f64() * 1000.0;
        assert!((ms(0.5) - 100.0).abs() < 1e-6);
        assert!((ms(0.7) - 150.0).abs() < 1e-6);
        // Past the last finite bound: that bound, at least.
        assert!((ms(0.99) - 200.0).abs() < 1e-6);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
