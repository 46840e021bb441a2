//! The RabbitMQ container of a test process started without `AMQP_URL`,
//! removed once the process has exited, however it exits.
//!
//! Dropping a testcontainers container removes it, but Rust runs no
//! destructor of a static at exit, and nextest runs every test in a process
//! of its own: a container kept for the process's life is never removed,
//! one per test. So, as Testcontainers does in other languages, the process
//! first starts Ryuk, the reaper, and keeps a TCP connection to it open
//! for as long as it lives, having told it this process's session label.
//! When the connection closes (the process ends, panics or is killed: the
//! kernel closes its sockets), Ryuk waits ten seconds for a reconnection,
//! removes every container with that label, and exits; Docker then removes
//! Ryuk itself (auto-remove). Containers are labelled before they start, so
//! none exists that Ryuk would not remove.
//!
//! Ryuk talks to the Docker daemon through its socket, bind-mounted from
//! `/var/run/docker.sock`, or from `TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE`
//! where the daemon's socket is elsewhere (rootless Docker, Podman), as in
//! other Testcontainers libraries.

use rand::Rng;
use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::OnceLock,
    time::Duration,
};
use testcontainers::{
    GenericImage, ImageExt,
    core::{IntoContainerPort, Mount, WaitFor},
    runners::AsyncRunner,
};

const RYUK_IMAGE: &str = "testcontainers/ryuk";
const RYUK_TAG: &str = "0.14.0";
const RYUK_PORT: u16 = 8080;
/// The label that tells Ryuk which containers are this process's.
const SESSION_LABEL: &str = "org.flotilla.tests.session";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection to Ryuk, open until the process exits.
static REAPER: OnceLock<TcpStream> = OnceLock::new();

/// Starts RabbitMQ for this process, to be removed after it exits, and
/// returns its AMQP URL.
pub(crate) async fn start_rabbitmq() -> String {
    let session = format!("{:016x}", rand::rng().random::<u64>());
    start_reaper(&session).await;
    let container = GenericImage::new("rabbitmq", "3.13")
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .with_label(SESSION_LABEL, &session)
        .start()
        .await
        .expect("AMQP_URL is unset and a RabbitMQ container could not start (is Docker running?)");
    let host = container
        .get_host()
        .await
        .expect("the container has a host");
    let port = container
        .get_host_port_ipv4(5672)
        .await
        .expect("the container exposes 5672");
    // Dropping it would remove it now, while this process still needs it
    // (tests of one process share it); Ryuk removes it after the exit.
    std::mem::forget(container);
    format!("amqp://guest:guest@{host}:{port}/%2f")
}

async fn start_reaper(session: &str) {
    let socket = std::env::var("TESTCONTAINERS_DOCKER_SOCKET_OVERRIDE")
        .unwrap_or_else(|_| "/var/run/docker.sock".to_owned());
    let ryuk = GenericImage::new(RYUK_IMAGE, RYUK_TAG)
        .with_exposed_port(RYUK_PORT.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Started"))
        .with_mount(Mount::bind_mount(socket, "/var/run/docker.sock"))
        .with_host_config_modifier(|config| config.auto_remove = Some(true))
        .start()
        .await
        .expect("AMQP_URL is unset and Ryuk, which removes the test's containers, could not start (is Docker running?)");
    let host = ryuk.get_host().await.expect("Ryuk has a host").to_string();
    let port = ryuk
        .get_host_port_ipv4(RYUK_PORT)
        .await
        .expect("Ryuk exposes its port");
    // Ryuk ends by itself once the connection closes; testcontainers must
    // not remove it first.
    std::mem::forget(ryuk);
    let label = format!("{SESSION_LABEL}={session}");
    let stream = tokio::task::spawn_blocking(move || register(&host, port, &label))
        .await
        .expect("the handshake did not panic")
        .expect("Ryuk accepts this process's session label");
    // Set once per process: amqp_url() starts one container.
    let _ = REAPER.set(stream);
}

/// Connects to Ryuk at `host:port` and has it watch containers labelled
/// `label` (`key=value`): Ryuk answers each filter line with `ACK`.
fn register(host: &str, port: u16, label: &str) -> std::io::Result<TcpStream> {
    let address = (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} has no address"),
        )
    })?;
    let mut stream = TcpStream::connect_timeout(&address, HANDSHAKE_TIMEOUT)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.write_all(format!("label={label}\n").as_bytes())?;
    let mut answer = [0; 4];
    stream.read_exact(&mut answer)?;
    if &answer != b"ACK\n" {
        return Err(std::io::Error::other(format!(
            "Ryuk answered {:?}, not ACK",
            String::from_utf8_lossy(&answer)
        )));
    }
    // From now on only the connection's closing matters.
    stream.set_read_timeout(None)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{io::BufRead, net::TcpListener, sync::mpsc, thread};

    /// A stand-in for Ryuk on a loopback port: reports the filter line it
    /// got, answers `answer`, then reports when the connection closes.
    fn fake_ryuk(answer: &'static [u8]) -> (u16, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            tx.send(line).unwrap();
            (&stream).write_all(answer).unwrap();
            let mut rest = Vec::new();
            // Returns at end of stream: the client closed its connection.
            reader.read_to_end(&mut rest).unwrap();
            tx.send("closed".to_owned()).unwrap();
        });
        (port, rx)
    }

    #[test]
    fn ryuk_gets_the_session_label_and_sees_the_connection_close() {
        let (port, events) = fake_ryuk(b"ACK\n");
        let stream = register("127.0.0.1", port, "org.flotilla.tests.session=abc").unwrap();
        assert_eq!(
            events.recv_timeout(HANDSHAKE_TIMEOUT).unwrap(),
            "label=org.flotilla.tests.session=abc\n"
        );
        assert!(
            events.recv_timeout(Duration::from_millis(200)).is_err(),
            "the connection stays open while it is held"
        );
        drop(stream);
        assert_eq!(events.recv_timeout(HANDSHAKE_TIMEOUT).unwrap(), "closed");
    }

    #[test]
    fn a_reaper_that_does_not_acknowledge_is_an_error() {
        let (port, _events) = fake_ryuk(b"NOPE");
        let error = register("127.0.0.1", port, "k=v").unwrap_err();
        assert!(error.to_string().contains("NOPE"), "{error}");
    }
}
