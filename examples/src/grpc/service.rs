//! The Echo RPCs: what each answers, and the `sleep_ms` and `fail_code`
//! knobs that make a call slow or fail on demand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::debug;

use super::metadata::CallInfo;
use super::proto::echo_server::Echo;
use super::proto::{EchoReply, EchoRequest, StreamRequest};

/// The largest `size` a ServerStream call may ask for: 1 MiB, well under
/// tonic's default 4 MiB limit on a received message, so a reply never
/// fails at the client for its size alone.
pub const MAX_STREAM_PAYLOAD: u32 = 1 << 20;

/// The Echo service as instance `id`. Clones share the call counter, so a
/// test can keep one to read [`EchoService::calls`] while another serves.
#[derive(Debug, Clone)]
pub struct EchoService {
    id: Arc<str>,
    calls: Arc<AtomicU64>,
}

impl EchoService {
    /// The service as instance `id`, answered in every reply and in the
    /// `x-instance` trailer.
    pub fn new(id: impl Into<String>) -> Self {
        EchoService {
            id: Arc::from(id.into()),
            calls: Arc::default(),
        }
    }

    /// This instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Calls received so far, of every kind, including those that fail on
    /// purpose or run out of time.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Counts a call and notes what its reply needs to say about it.
    fn begin<T>(&self, rpc: &'static str, request: &Request<T>) -> Arc<Call> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let info = request
            .extensions()
            .get::<CallInfo>()
            .cloned()
            .unwrap_or_default();
        // Per call at debug, not info: a benchmark at thousands of calls a
        // second would otherwise spend its time logging.
        debug!(rpc, authority = %info.authority, timeout = ?info.timeout, "call");
        Arc::new(Call {
            instance: self.id.to_string(),
            authority: info.authority,
            timeout_ms: info.timeout.map_or(0, |timeout| {
                u64::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
            }),
        })
    }
}

/// What every reply of one call says about the call.
#[derive(Debug)]
struct Call {
    instance: String,
    authority: String,
    timeout_ms: u64,
}

impl Call {
    fn reply(&self, message: String, payload: Bytes, received: Received) -> EchoReply {
        EchoReply {
            message,
            payload,
            instance: self.instance.clone(),
            received_bytes: received.bytes,
            received_messages: received.messages,
            authority: self.authority.clone(),
            timeout_ms: self.timeout_ms,
        }
    }
}

/// What a call has received so far.
#[derive(Debug, Clone, Copy, Default)]
struct Received {
    bytes: u64,
    messages: u64,
}

impl Received {
    fn add(&mut self, req: &EchoRequest) {
        self.bytes += req.payload.len() as u64;
        self.messages += 1;
    }
}

/// Applies a request's knobs: sleeps `sleep_ms`, then fails with
/// `fail_code` if it is set.
async fn obey(req: &EchoRequest) -> Result<(), Status> {
    if req.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(req.sleep_ms.into())).await;
    }
    match req.fail_code {
        0 => Ok(()),
        code => {
            // Out of range is UNKNOWN, as tonic maps any unknown code.
            let grpc = Code::from(i32::try_from(code).unwrap_or(i32::MAX));
            Err(Status::new(
                grpc,
                format!("failing as asked (fail_code {code})"),
            ))
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let call = self.begin("unary", &request);
        let req = request.into_inner();
        let mut received = Received::default();
        received.add(&req);
        obey(&req).await?;
        Ok(Response::new(call.reply(
            req.message,
            req.payload,
            received,
        )))
    }

    type ServerStreamStream = BoxStream<'static, Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let call = self.begin("server_stream", &request);
        let StreamRequest { count, size } = request.into_inner();
        if size > MAX_STREAM_PAYLOAD {
            return Err(Status::invalid_argument(format!(
                "size {size} is over the limit of {MAX_STREAM_PAYLOAD} bytes a reply"
            )));
        }
        // One buffer, shared by every reply: a long stream costs no memory.
        let payload = Bytes::from(vec![0; size as usize]);
        let received = Received {
            bytes: 0,
            messages: 1,
        };
        // Made as the client reads, so HTTP/2 flow control paces it.
        let replies = stream::iter(1..=count)
            .map(move |n| Ok(call.reply(n.to_string(), payload.clone(), received)));
        Ok(Response::new(replies.boxed()))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let call = self.begin("client_stream", &request);
        let mut requests = request.into_inner();
        let mut received = Received::default();
        let mut last = String::new();
        while let Some(req) = requests.message().await? {
            received.add(&req);
            obey(&req).await?;
            last = req.message;
        }
        Ok(Response::new(call.reply(last, Bytes::new(), received)))
    }

    type BidiStream = BoxStream<'static, Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let call = self.begin("bidi", &request);
        let mut received = Received::default();
        // `then` reads the next request only once this one is answered, so
        // each is answered as it comes, in order; a failure ends the stream
        // with its status.
        let replies = request.into_inner().then(move |req| {
            let call = call.clone();
            let so_far = req.map(|req| {
                received.add(&req);
                (req, received)
            });
            async move {
                let (req, received) = so_far?;
                obey(&req).await?;
                Ok(call.reply(req.message, req.payload, received))
            }
        });
        Ok(Response::new(replies.boxed()))
    }
}
