//! The fixed ports `shopctl up` serves on, and the one way such a port can
//! be taken that is not a stack: the services' gRPC ports (50051 and up)
//! lie inside Linux's range for clients' local ports (32768 to 60999), so
//! any outgoing connection can be given one. Once that connection closes,
//! its end lingers in TIME_WAIT (60 s, fixed in Linux) and no listener can
//! bind the port until it is gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Long enough for TIME_WAIT (60 s) and FIN_WAIT2 (`tcp_fin_timeout`,
/// 60 s by default) to end.
pub(crate) const PATIENCE: Duration = Duration::from_secs(75);

/// Returns once `port` on `listen` can be bound. A port something listens
/// on is an error at once; one held by a connection's local end is waited
/// for, at most `patience`, with one line on stderr saying why.
pub(crate) async fn claim(
    listen: IpAddr,
    port: u16,
    what: &str,
    patience: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = false;
    loop {
        // Bound as the servers bind (std sets SO_REUSEADDR, as tokio does).
        if TcpListener::bind((listen, port)).is_ok() {
            return Ok(());
        }
        if listens(listen, port).await {
            anyhow::bail!(
                "port {port} ({what}) is taken: stop whatever listens there and run shopctl up again"
            );
        }
        if started.elapsed() >= patience {
            anyhow::bail!(
                "port {port} ({what}) is held by a connection's local end, not a listener, and stayed so for {} s: \
                 `ss -tanp sport = :{port}` shows which",
                patience.as_secs()
            );
        }
        if !said {
            eprintln!(
                "port {port} ({what}) is the local end of a connection that is closing (clients are given ports \
                 in this range); waiting for it, at most {} s",
                patience.as_secs()
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether something accepts connections on `port` where a server on
/// `listen` would.
async fn listens(listen: IpAddr, port: u16) -> bool {
    let host = match listen {
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
    async fn a_free_port_is_claimed_at_once() {
        let port = TcpListener::bind((LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        claim(LOCALHOST, port, "test", Duration::ZERO)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_port_something_listens_on_is_refused_at_once() {
        let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        let error = claim(LOCALHOST, port, "test", Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("stop whatever listens there"),
            "{error}"
        );
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
        claim(LOCALHOST, port, "test", Duration::from_secs(30))
            .await
            .unwrap();
        closer.join().unwrap();
    }

    #[tokio::test]
    async fn a_port_held_longer_than_the_patience_says_by_what() {
        let (_client, port) = connection();
        let error = claim(LOCALHOST, port, "test", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("held by a connection's local end"),
            "{error}"
        );
    }
}
