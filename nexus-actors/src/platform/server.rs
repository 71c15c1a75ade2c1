//! The HTTP server a node listens with. actix-web's `App` answers requests;
//! a request that upgrades to a WebSocket goes, with its connection, to the
//! [`Upgrades`] handler instead (the sessions'), which then owns the socket.
//! That is what actix-web's `HttpServer` cannot do: there an upgraded
//! connection stays inside actix-http's HTTP/1 dispatcher, which keeps its
//! 8 KiB read and 8 KiB write buffers for the connection's life and handles
//! every frame the session writes.
//!
//! It owns listening and the connections' settings; routes are the roles'.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::{h1, ConnectionType, HttpService, Request, Response};
use actix_server::Server;
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use futures::future::LocalBoxFuture;
use futures::SinkExt;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection whose request asked to upgrade, with what the dispatcher
/// had read past the request's head.
pub type Upgraded = Framed<TcpStream, h1::Codec>;

/// Serves every request carrying `Upgrade: websocket` (and `CONNECT`s),
/// whatever its path: it answers the request itself on the connection,
/// then runs what the upgrade opened until it ends.
pub type Upgrades = Arc<dyn Fn(Request, Upgraded) -> LocalBoxFuture<'static, ()> + Send + Sync>;

/// Connections waiting to be accepted, per listener; actix-web's default.
const BACKLOG: i32 = 1024;
/// How long a refused upgrade's connection is read after its answer.
const LINGER: Duration = Duration::from_secs(1);

/// How a server listens.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Worker threads, each with its own copy of the app.
    pub workers: usize,
    /// How long an idle keep-alive connection stays open.
    pub keep_alive: Duration,
    /// How long a graceful stop waits for open connections.
    pub shutdown_timeout: Duration,
}

/// A server bound to its address, not yet running.
pub struct Bound {
    /// Run it (`actix_rt::spawn`) and stop it through its handle.
    pub server: Server,
    /// Where it listens (the port chosen when asked for port 0).
    pub addr: SocketAddr,
}

/// Binds `addr` and builds a server answering requests with `app` (one per
/// worker) and upgrades with `upgrades`; without it, every upgrade is
/// answered 404. Signals are left to the caller, which drains first.
pub fn bind<F, I, S, B>(
    addr: SocketAddr,
    options: &ServerOptions,
    app: F,
    upgrades: Option<Upgrades>,
) -> std::io::Result<Bound>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    B: MessageBody + 'static,
{
    let listener = listen(addr)?;
    let addr = listener.local_addr()?;
    let builder = Server::build().workers(options.workers).disable_signals();
    let shutdown = builder.graceful_shutdown_signal();
    let keep_alive = options.keep_alive;
    let server = builder
        .shutdown_timeout(options.shutdown_timeout.as_secs().max(1))
        .listen("nexus-http", listener, move || {
            let shutdown = shutdown.clone();
            let upgrades = upgrades.clone();
            let service = HttpService::build()
                // Closes idle keep-alive connections when a graceful stop
                // begins, as actix-web's server does, instead of waiting for
                // them until the shutdown timeout.
                .graceful_shutdown_signal(move || {
                    let shutdown = shutdown.clone();
                    async move { shutdown.notified().await }
                })
                .keep_alive(keep_alive)
                // actix-web's: a request's head within 5 s (slow clients are
                // cut off), and 1 s for a client to take an early answer
                // before its unread body turns the close into a reset.
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                .upgrade(fn_service(move |(req, io): (Request, Upgraded)| {
                    let upgrades = upgrades.clone();
                    async move {
                        match upgrades {
                            Some(upgrade) => upgrade(req, io).await,
                            None => refuse(io).await,
                        }
                        Ok::<_, std::convert::Infallible>(())
                    }
                }));
            let app = app().into_factory().map_err(|error| error.into().error_response());
            // `ConnectionInfo` falls back on this host for a request without
            // `Host` (HTTP/1.0), as under actix-web's server, which builds it
            // the same way (the constructor is hidden, not meant for use
            // outside actix; its default would say `localhost:8080`).
            service.finish(map_config(app, move |_| AppConfig::__priv_test_new(false, addr.to_string(), addr))).tcp()
        })?
        .run();
    Ok(Bound { server, addr })
}

/// A listening socket as actix-web makes one: reusable address, its backlog.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Answers an upgrade on a server that upgrades nothing.
async fn refuse(io: Upgraded) {
    answer(io, Response::not_found()).await;
}

/// Answers an upgrade's request with `res` instead (a refusal) and ends
/// the connection after it.
pub async fn answer(mut io: Upgraded, res: Response<BoxBody>) {
    let (mut head, body) = res.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    // Refusals carry a short JSON error; one that cannot be read goes without.
    let body = actix_http::body::to_bytes(body).await.unwrap_or_default();
    let sent = async {
        io.send((head, BodySize::Sized(body.len() as u64)).into()).await?;
        if !body.is_empty() {
            io.send(h1::Message::Chunk(Some(body))).await?;
        }
        io.send(h1::Message::Chunk(None)).await
    };
    if let Err(error) = sent.await {
        tracing::debug!(%error, "an upgrade's refusal could not be sent");
        return;
    }
    // What the client sent after its request (early frames) must not be
    // left unread.
    linger(&mut io.into_parts().io, LINGER).await;
}

/// Ends the write side of `socket` and reads what the peer still sends
/// until it closes too, for at most `within`: closing on unread bytes
/// would reset the connection, and the peer might lose what was last
/// written to it.
pub async fn linger(socket: &mut TcpStream, within: Duration) {
    let drained = async {
        socket.shutdown().await?;
        let mut rest = vec![0u8; 4096];
        while socket.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    if let Ok(Err(error)) = tokio::time::timeout(within, drained).await {
        tracing::debug!(%error, "a connection ended without a clean close");
    }
}
