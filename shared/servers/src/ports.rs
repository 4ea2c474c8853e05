//! Fixed ports, and the one way such a port can be taken that is not a
//! server: ports from 32768 to 60999 (PostgreSQL's 55432 and the services'
//! gRPC ports from 50051 among them) are also the ones Linux gives clients
//! as their local ends, so any outgoing connection can be given one. Once
//! that connection closes, its end lingers in TIME_WAIT (60 s, fixed in
//! Linux) and nothing can listen on the port until it is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use crate::ServerError;

/// Long enough for TIME_WAIT (60 s) and FIN_WAIT2 (`tcp_fin_timeout`,
/// 60 s by default) to end.
pub const PORT_PATIENCE: Duration = Duration::from_secs(75);

/// Why a port could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Something listens on it.
    #[error("port {port} is taken: something listens there")]
    Listening {
        /// The port.
        port: u16,
    },
    /// No listener, but a connection's local end held it for longer than
    /// the patience given.
    #[error(
        "port {port} is held by a connection's local end, not a listener, and stayed so for {seconds} s: \
         `ss -tanp sport = :{port}` shows which"
    )]
    Held {
        /// The port.
        port: u16,
        /// How long it was waited for.
        seconds: u64,
    },
}

/// Binds `port` on `host` as tokio's `TcpListener::bind` does
/// (SO_REUSEADDR, a backlog of 1024) and returns the listener, to serve on
/// or to drop so that a server binds the port instead. A port
/// something listens on is an error at once; one held by a connection's
/// local end is waited for, at most `patience`, with a warning saying why.
pub async fn claim_port(
    host: IpAddr,
    port: u16,
    patience: Duration,
) -> Result<TcpListener, PortError> {
    let started = Instant::now();
    let mut said = false;
    loop {
        if let Ok(listener) = bind(SocketAddr::new(host, port)) {
            return Ok(listener);
        }
        if listens(host, port).await {
            return Err(PortError::Listening { port });
        }
        if started.elapsed() >= patience {
            return Err(PortError::Held {
                port,
                seconds: patience.as_secs(),
            });
        }
        if !said {
            tracing::warn!(
                port,
                patience_seconds = patience.as_secs(),
                "the port is the local end of a connection that is closing \
                 (clients are given ports in this range); waiting for it"
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// [`claim_port`] on 127.0.0.1, where the local servers listen, let go at
/// once for the server to bind, its error naming the server.
pub(crate) async fn ensure_port_free(what: &'static str, port: u16) -> Result<(), ServerError> {
    claim_port(IpAddr::V4(Ipv4Addr::LOCALHOST), port, PORT_PATIENCE)
        .await
        .map(drop)
        .map_err(|error| ServerError::Start {
            what,
            detail: match error {
                PortError::Listening { .. } => format!("{error}; stop it, or choose another port"),
                PortError::Held { .. } => error.to_string(),
            },
        })
}

/// A listener on `addr`; SO_REUSEADDR, as tokio, PostgreSQL and
/// nats-server set it.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// Whether something accepts connections on `port` where a server on
/// `host` would.
async fn listens(host: IpAddr, port: u16) -> bool {
    let host = match host {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let connect = tokio::net::TcpStream::connect(SocketAddr::new(host, port));
    matches!(
        tokio::time::timeout(Duration::from_secs(1), connect).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A connection whose client end holds a local port with nothing
    /// listening there: the server's end closed first, so the client's sits
    /// in CLOSE_WAIT until it is dropped, and then nothing is left (no
    /// TIME_WAIT on the client's side).
    fn connection() -> (TcpStream, u16) {
        let server = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (accepted, _) = server.accept().unwrap();
        drop(accepted);
        drop(server);
        let port = client.local_addr().unwrap().port();
        (client, port)
    }

    #[tokio::test]
    async fn a_free_port_is_claimed_at_once_and_held_until_let_go() {
        let port = TcpListener::bind((LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = claim_port(LOCALHOST, port, Duration::ZERO).await.unwrap();
        assert_eq!(listener.local_addr().unwrap().port(), port);
        // Held until dropped: nothing else can take it meanwhile.
        let error = claim_port(LOCALHOST, port, Duration::ZERO)
            .await
            .unwrap_err();
        assert!(matches!(error, PortError::Listening { .. }), "{error}");
        drop(listener);
        claim_port(LOCALHOST, port, Duration::ZERO).await.unwrap();
    }

    #[tokio::test]
    async fn a_port_something_listens_on_is_refused_at_once() {
        let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let error = claim_port(LOCALHOST, port, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(error, PortError::Listening { .. }), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "it waited for a listener"
        );
    }

    #[tokio::test]
    async fn a_port_held_by_a_closing_connection_is_waited_for() {
        let (client, port) = connection();
        // The premise: binding the port fails while the connection holds it.
        assert!(
            TcpListener::bind((LOCALHOST, port)).is_err(),
            "port {port} is free already"
        );
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(client);
        });
        claim_port(LOCALHOST, port, Duration::from_secs(30))
            .await
            .unwrap();
        closer.join().unwrap();
    }

    #[tokio::test]
    async fn a_port_held_longer_than_the_patience_says_by_what() {
        let (_client, port) = connection();
        let error = claim_port(LOCALHOST, port, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(error, PortError::Held { .. }), "{error}");
    }
}
