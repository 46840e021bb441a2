//! HTTPS for simulated hosts: a certificate authority made up at fleet
//! start, a certificate per host IP signed by it, and a listener that
//! completes TLS handshakes before axum sees a connection.
//!
//! Clients trust the fleet by its CA certificate ([`FleetCa::pem`]), as a
//! campaign names an operator's CA; another fleet's CA does not verify
//! this one's hosts.

use axum::serve::Listener;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The fleet's certificate authority, and the server configurations it
/// signed, one per host IP.
pub struct FleetCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    configs: Mutex<HashMap<IpAddr, Arc<ServerConfig>>>,
}

impl FleetCa {
    pub fn new(name: &str) -> Result<FleetCa, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} simulator CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(FleetCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)?,
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: what a campaign's `ca_file` holds.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server configuration whose certificate names `ip`.
    pub(crate) fn server_config(&self, ip: IpAddr) -> Result<Arc<ServerConfig>, rcgen::Error> {
        let mut configs = self
            .configs
            .lock()
            .expect("the CA lock is never poisoned: nothing panics while holding it");
        if let Some(config) = configs.get(&ip) {
            return Ok(config.clone());
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![ip.to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, ip.to_string());
        let certificate = params.signed_by(&key, &self.issuer)?;
        let chain = vec![
            CertificateDer::from(certificate.der().to_vec()),
            self.issuer.der().clone(),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .and_then(|builder| builder.with_no_client_auth().with_single_cert(chain, key))
                .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
        let config = Arc::new(config);
        configs.insert(ip, config.clone());
        Ok(config)
    }
}

/// A listener that hands axum connections whose TLS handshake is done.
/// Handshakes run in their own tasks, so a slow client delays no other.
/// Dropping it closes the port.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Without it, keep-alive calls wait ~40 ms on a delayed ACK.
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    // A client that rejects our certificate ends its
                    // handshake with an alert: nothing to serve.
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            addr,
            accept,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept task is gone only when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
