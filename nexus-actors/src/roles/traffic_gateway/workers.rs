//! The proxy's threads: one current-thread tokio runtime per core, each
//! with a listener of its own on the gateway's port (`SO_REUSEPORT`: the
//! kernel spreads new connections over them). A connection lives on the
//! thread that accepted it, and so do the pooled connections to instances
//! it uses (see `Shared::client`): no request is handed between threads.
//! The first thread prepares what every thread shares (Redis connections,
//! access checks, the activator); the others wait for it. This module does
//! not look at requests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{oneshot, watch};

use super::proxy::Shared;
use super::GatewayError;

/// Connections waiting to be accepted, per listener.
const BACKLOG: i32 = 1024;

/// `threads` listeners on `addr` (the first picks the port when it is 0).
pub(super) fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = listen(addr)?;
    let bound = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..threads.max(1) {
        all.push(listen(bound)?);
    }
    Ok(all)
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Linux lets only sockets of the same user share the port.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Runs one thread per listener. The first runs `prepare` on its runtime
/// and hands the result to the others; every thread then serves its
/// listener with `serve` until it returns. `ready` says whether `prepare`
/// worked; `stopped` fires once every thread has ended.
pub(super) fn spawn<P, PF, S, SF>(
    listeners: Vec<std::net::TcpListener>,
    prepare: P,
    serve: S,
    ready: oneshot::Sender<Result<(), GatewayError>>,
    stopped: oneshot::Sender<()>,
) -> Result<(), GatewayError>
where
    P: FnOnce(tokio::runtime::Handle) -> PF + Send + 'static,
    PF: Future<Output = Result<Arc<Shared>, GatewayError>>,
    S: Fn(tokio::net::TcpListener, Arc<Shared>) -> SF + Send + Sync + 'static,
    SF: Future<Output = ()>,
{
    let (shared_tx, shared_rx) = watch::channel::<Option<Arc<Shared>>>(None);
    let serve = Arc::new(serve);
    let mut listeners = listeners.into_iter();
    let first = listeners.next().ok_or_else(|| GatewayError::Runtime(std::io::ErrorKind::InvalidInput.into()))?;
    let mut others = Vec::new();
    for (i, listener) in listeners.enumerate() {
        let (serve, mut shared_rx) = (serve.clone(), shared_rx.clone());
        let runtime = runtime()?;
        let thread = std::thread::Builder::new().name(format!("nexus-gateway-{}", i + 1)).spawn(move || {
            runtime.block_on(async move {
                let Ok(shared) = shared_rx.wait_for(Option::is_some).await.map(|s| s.clone()) else { return };
                let Some(shared) = shared else { return };
                if let Some(listener) = register(listener) {
                    serve(listener, shared).await;
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        others.push(thread.map_err(GatewayError::Runtime)?);
    }
    let runtime = runtime()?;
    std::thread::Builder::new()
        .name("nexus-gateway-0".into())
        .spawn(move || {
            let handle = runtime.handle().clone();
            runtime.block_on(async move {
                let shared = match prepare(handle).await {
                    Ok(shared) => shared,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                let _ = shared_tx.send(Some(shared.clone()));
                let _ = ready.send(Ok(()));
                if let Some(listener) = register(first) {
                    serve(listener, shared).await;
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
            for thread in others {
                let _ = thread.join();
            }
            let _ = stopped.send(());
        })
        .map_err(GatewayError::Runtime)?;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, GatewayError> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(GatewayError::Runtime)
}

/// The listener, registered with this thread's reactor.
fn register(listener: std::net::TcpListener) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::error!(%error, "a gateway thread could not listen");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_listens_on_the_one_port_and_a_stranger_without_reuse_cannot_take_it() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<u16> = listeners.iter().map(|l| l.local_addr().unwrap().port()).collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "one port for all: {ports:?}");
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", ports[0])).is_err(),
            "a socket that does not ask to share the port is refused"
        );
        // The kernel hands connections to the listeners; some one takes each.
        for _ in 0..6 {
            std::net::TcpStream::connect(("127.0.0.1", ports[0])).unwrap();
        }
        let accepted: usize = listeners.iter().map(|l| std::iter::from_fn(|| l.accept().ok()).count()).sum();
        assert_eq!(accepted, 6);
    }
}
