//! Large answers (`/processes`, `/stores`) written as the client reads them, under one
//! bound on the bytes in flight across every connection.
//!
//! A body is serialized on a blocking thread into chunks handed over one at a time: the
//! serializer waits while the client does not read, so a client that asks and never
//! reads holds a chunk or two, not a whole answer. Every chunk also takes its bytes from
//! one budget shared by all connections ([`InFlight`]) until the connection has written
//! it: however many clients stall, the answers waiting for them hold at most that much.

use std::{convert::Infallible, io, sync::Arc};

use axum::body::{Body, Bytes};
use serde::Serialize;
use tokio::{
    runtime::Handle,
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};

/// What a serializer fills before handing it over.
const CHUNK: usize = 32 << 10;
/// Chunks waiting in one answer's hand-over (more wait in the connection's buffer).
const QUEUED: usize = 2;

/// The bytes of answers written and not yet taken by their clients, across connections.
#[derive(Clone, Debug)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
}

impl InFlight {
    pub fn new(max_bytes: usize) -> Self {
        let max = max_bytes.clamp(CHUNK, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Bytes in flight now.
    pub fn used(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// `value` as a JSON body, serialized as the client reads it.
pub fn json<T: Serialize + Send + 'static>(value: T, in_flight: &InFlight) -> Body {
    let (tx, rx) = mpsc::channel(QUEUED);
    let mut chunks = Chunks {
        buf: Vec::with_capacity(CHUNK),
        tx,
        in_flight: in_flight.clone(),
        runtime: Handle::current(),
    };
    tokio::task::spawn_blocking(move || {
        // An error means the client went away (or the daemon is stopping): nothing more
        // to write, and nothing to report.
        if serde_json::to_writer(&mut chunks, &value).is_ok() {
            let _ = chunks.hand_over();
        }
    });
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(chunk), rx))
    }))
}

/// The serializer's end: fills a chunk, then waits for room in the budget and in the
/// hand-over.
struct Chunks {
    buf: Vec<u8>,
    tx: mpsc::Sender<Bytes>,
    in_flight: InFlight,
    runtime: Handle,
}

impl Chunks {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let want = bytes.len().min(self.in_flight.max) as u32;
        let permits = Arc::clone(&self.in_flight.permits);
        let tx = self.tx.clone();
        // The budget may be held by stalled clients for a while: a client that leaves
        // meanwhile frees this thread at once.
        let permit = self.runtime.block_on(async move {
            tokio::select! {
                permit = permits.acquire_many_owned(want) => permit.ok(),
                () = tx.closed() => None,
            }
        });
        let permit = permit.ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        self.tx
            .blocking_send(Bytes::from_owner(Held {
                bytes,
                _permit: permit,
            }))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

impl io::Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.hand_over()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A chunk and its share of the budget, given back when the connection drops the chunk
/// (written, or the connection gone).
struct Held {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    #[derive(Serialize)]
    struct Big(Vec<String>);

    /// Reads a body as a client does: each chunk copied out and let go.
    async fn read(mut body: Body) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                out.extend_from_slice(&data);
            }
        }
        out
    }

    fn big() -> Big {
        Big((0..2000).map(|i| format!("{i:0>200}")).collect())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_body_comes_whole_in_chunks_and_gives_its_budget_back() {
        let in_flight = InFlight::new(1 << 20);
        let bytes = read(json(big(), &in_flight)).await;
        let back: Vec<String> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, big().0);
        assert_eq!(in_flight.used(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stalled_clients_hold_no_more_than_the_budget() {
        let in_flight = InFlight::new(CHUNK * 4);
        // Ten answers nobody reads.
        let bodies: Vec<Body> = (0..10).map(|_| json(big(), &in_flight)).collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(in_flight.used() <= CHUNK * 4, "{}", in_flight.used());
        assert!(in_flight.used() > 0);
        // The clients go: the budget comes back, and the serializers stop.
        drop(bodies);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(in_flight.used(), 0);
        // And an answer can be had again.
        let bytes = read(json(big(), &in_flight)).await;
        assert!(bytes.len() > 400_000);
    }
}
