//! The Echo gRPC service end to end on loopback: each RPC kind, the
//! metadata it carries (`x-instance` trailer, `x-echo` header), its failure
//! and deadline knobs, the `:authority` it reports, graceful shutdown, and
//! the open-loop load generator against it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use signpost_examples::grpc::{
    self, EchoReply, EchoRequest, EchoService, INSTANCE_TRAILER, StreamRequest, bench,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// How long a test waits for an answer that should come at once.
const PATIENCE: Duration = Duration::from_secs(5);

/// A grpc-echo on a free loopback port.
struct Echo {
    addr: SocketAddr,
    /// A clone of the served service, to read its call counter.
    service: EchoService,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), grpc::Error>>,
}

impl Echo {
    async fn start(id: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = EchoService::new(id);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(grpc::serve_with(
            listener,
            service.clone(),
            async move {
                let _ = stopped.await;
            },
            PATIENCE,
        ));
        Echo {
            addr,
            service,
            stop: Some(stop),
            task,
        }
    }

    /// A client calling `authority` on this server.
    async fn client(&self, authority: &str) -> grpc::EchoClient<Channel> {
        grpc::echo_client(self.addr, authority)
            .await
            .expect("connects")
    }

    /// Stops the server and waits for it to finish draining.
    async fn stop(mut self) -> Result<(), grpc::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE * 2, self.task)
            .await
            .expect("server stops")
            .expect("server task")
    }
}

fn ask(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        ..EchoRequest::default()
    }
}

fn text<'a>(metadata: &'a MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn unary_echoes_and_names_instance_authority_and_deadline() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo.xingren.host").await;
    let mut request = Request::new(EchoRequest {
        message: "hi".to_string(),
        payload: Bytes::from_static(b"12345"),
        ..EchoRequest::default()
    });
    request.set_timeout(Duration::from_secs(5));
    request
        .metadata_mut()
        .insert("x-echo", MetadataValue::from_static("ping"));
    let answer = client.unary(request).await.expect("unary");

    // tonic merges a unary call's trailers into its metadata.
    assert_eq!(text(answer.metadata(), INSTANCE_TRAILER), Some("e1"));
    assert_eq!(text(answer.metadata(), "x-echo"), Some("ping"));
    let reply = answer.into_inner();
    assert_eq!(
        reply,
        EchoReply {
            message: "hi".to_string(),
            payload: Bytes::from_static(b"12345"),
            instance: "e1".to_string(),
            received_bytes: 5,
            received_messages: 1,
            authority: "grpc-echo.xingren.host".to_string(),
            timeout_ms: reply.timeout_ms,
        }
    );
    // The deadline arrives as sent, less the time in transit.
    assert!(
        (4_000..=5_000).contains(&reply.timeout_ms),
        "timeout_ms {}",
        reply.timeout_ms
    );
    assert_eq!(echo.service.calls(), 1);
    echo.stop().await.expect("clean stop");
}

#[tokio::test]
async fn without_a_deadline_the_reply_says_none() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let reply = client.unary(ask("hi")).await.expect("unary").into_inner();
    assert_eq!(reply.timeout_ms, 0);
    assert_eq!(reply.authority, "grpc-echo");
}

#[tokio::test]
async fn authority_defaults_to_what_the_channel_was_given() {
    let echo = Echo::start("e1").await;
    let authority = echo.addr.to_string();
    let mut client = echo.client(&authority).await;
    let reply = client.unary(ask("hi")).await.expect("unary").into_inner();
    assert_eq!(reply.authority, authority);
}

#[tokio::test]
async fn server_stream_sends_count_replies_then_the_instance_trailer() {
    let echo = Echo::start("e2").await;
    let mut client = echo.client("grpc-echo").await;
    let mut request = Request::new(StreamRequest {
        count: 5,
        size: 1000,
    });
    request
        .metadata_mut()
        .insert("x-echo", MetadataValue::from_static("s"));
    let answer = client.server_stream(request).await.expect("stream");
    // Before any message, the metadata is the response headers alone.
    assert_eq!(text(answer.metadata(), "x-echo"), Some("s"));
    assert_eq!(text(answer.metadata(), INSTANCE_TRAILER), None);

    let mut replies = answer.into_inner();
    let mut numbers = Vec::new();
    while let Some(reply) = replies.message().await.expect("message") {
        assert_eq!(reply.payload.len(), 1000);
        assert_eq!(reply.instance, "e2");
        numbers.push(reply.message);
    }
    assert_eq!(numbers, ["1", "2", "3", "4", "5"]);
    let trailers = replies
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(text(&trailers, INSTANCE_TRAILER), Some("e2"));
}

#[tokio::test]
async fn server_stream_refuses_replies_over_the_size_limit() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let status = client
        .server_stream(StreamRequest {
            count: 1,
            size: grpc::MAX_STREAM_PAYLOAD + 1,
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn client_stream_answers_the_totals_received() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let requests = futures::stream::iter((1..=4).map(|n| EchoRequest {
        message: format!("m{n}"),
        payload: Bytes::from(vec![0; n * 10]),
        ..EchoRequest::default()
    }));
    let answer = client.client_stream(requests).await.expect("client stream");
    assert_eq!(text(answer.metadata(), INSTANCE_TRAILER), Some("e1"));
    let reply = answer.into_inner();
    assert_eq!(reply.received_messages, 4);
    assert_eq!(reply.received_bytes, 10 + 20 + 30 + 40);
    assert_eq!(reply.message, "m4");
}

#[tokio::test]
async fn bidi_answers_each_message_before_the_next_is_sent() {
    let echo = Echo::start("e3").await;
    let mut client = echo.client("grpc-echo").await;
    let (send, requests) = mpsc::unbounded::<EchoRequest>();
    send.unbounded_send(ask("one")).expect("send");
    let mut replies = client.bidi(requests).await.expect("bidi").into_inner();
    for (n, word) in ["one", "two", "three"].into_iter().enumerate() {
        if n > 0 {
            send.unbounded_send(ask(word)).expect("send");
        }
        // The next message is not sent until this echo is in.
        let reply = tokio::time::timeout(PATIENCE, replies.message())
            .await
            .expect("echo before the next message")
            .expect("message")
            .expect("not the end");
        assert_eq!(reply.message, word);
        assert_eq!(reply.instance, "e3");
        assert_eq!(reply.received_messages, n as u64 + 1);
    }
    drop(send);
    assert!(replies.message().await.expect("clean end").is_none());
    let trailers = replies.trailers().await.expect("trailers").expect("some");
    assert_eq!(text(&trailers, INSTANCE_TRAILER), Some("e3"));
}

#[tokio::test]
async fn fail_code_is_answered_as_that_status_with_the_instance() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let status = client
        .unary(EchoRequest {
            fail_code: Code::NotFound as u32,
            ..ask("x")
        })
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(text(status.metadata(), INSTANCE_TRAILER), Some("e1"));

    // Past the last code: UNKNOWN, as any unknown code reads.
    let status = client
        .unary(EchoRequest {
            fail_code: 99,
            ..ask("x")
        })
        .await
        .expect_err("fails");
    assert_eq!(status.code(), Code::Unknown);
}

#[tokio::test]
async fn fail_code_ends_a_bidi_stream_after_the_earlier_echoes() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let requests = futures::stream::iter([
        ask("ok"),
        EchoRequest {
            fail_code: Code::ResourceExhausted as u32,
            ..ask("fail")
        },
        ask("never"),
    ]);
    let mut replies = client.bidi(requests).await.expect("bidi").into_inner();
    let first = replies.message().await.expect("first").expect("some");
    assert_eq!(first.message, "ok");
    let status = replies.message().await.expect_err("fails");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(text(status.metadata(), INSTANCE_TRAILER), Some("e1"));
}

#[tokio::test]
async fn a_call_sleeping_past_its_deadline_is_cut_off_at_the_deadline() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let mut request = Request::new(EchoRequest {
        sleep_ms: 3_000,
        ..ask("slow")
    });
    request.set_timeout(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let status = client.unary(request).await.expect_err("times out");
    let elapsed = started.elapsed();
    // tonic reports a deadline its own timer enforced as CANCELLED
    // ("Timeout expired"), not DEADLINE_EXCEEDED, on client and server
    // alike; a gRPC peer in another language would say DEADLINE_EXCEEDED.
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_calls_in_flight_finish_and_refuses_new_ones() {
    let echo = Echo::start("e1").await;
    let mut client = echo.client("grpc-echo").await;
    let in_flight = tokio::spawn(async move {
        client
            .unary(EchoRequest {
                sleep_ms: 300,
                ..ask("late")
            })
            .await
    });
    // Let the call reach the server before it is told to stop.
    let counted = tokio::time::timeout(PATIENCE, async {
        while echo.service.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "the call never arrived");
    let addr = echo.addr;
    echo.stop().await.expect("clean stop");

    let reply = in_flight.await.expect("task").expect("finished");
    assert_eq!(reply.into_inner().message, "late");
    assert!(
        grpc::echo_client(addr, "grpc-echo").await.is_err(),
        "still accepting"
    );
}

#[tokio::test]
async fn bench_offers_rate_times_duration_calls() {
    let echo = Echo::start("e1").await;
    let client = echo.client("grpc-echo").await;
    let load = bench::Load {
        rate: 200.0,
        duration: Duration::from_millis(500),
        concurrency: 16,
        timeout: PATIENCE,
        request: ask("bench"),
    };
    let report = bench::run(client, &load).await;
    assert_eq!(
        (report.calls, report.errors, report.unsent),
        (100, 0, 0),
        "{report}"
    );
    assert_eq!(report.latencies.len(), 100);
    assert_eq!(echo.service.calls(), 100);
    // Open loop: the calls were spread over the duration, not sent at once.
    assert!(report.elapsed >= Duration::from_millis(490), "{report}");
}

#[tokio::test]
async fn connecting_to_nothing_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let err = grpc::echo_client(addr, "grpc-echo")
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(err, grpc::Error::Connect { target, .. } if target == addr),
        "{err:?}"
    );
}
