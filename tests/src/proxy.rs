//! A TCP proxy in front of the broker whose connections a test can sever,
//! to see a worker survive a dropped broker connection.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

pub struct Proxy {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on a loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let registry = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Ok(mut server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let pipe = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                registry
                    .lock()
                    .expect("no panic holds this lock")
                    .push(pipe.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            addr,
            connections,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection open now, as a network failure would.
    pub fn sever(&self) -> usize {
        let open: Vec<AbortHandle> =
            std::mem::take(&mut *self.connections.lock().expect("no panic holds this lock"));
        for connection in &open {
            connection.abort();
        }
        open.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}
