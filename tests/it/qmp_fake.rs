//! The QMP client against a scripted fake monitor: reply routing by id,
//! events between replies, protocol faults, timeouts and event back-pressure.
//! No QEMU needed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use vma_writer::qmp::{self, Error, Qmp};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// The monitor side of one connection.
struct Fake {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Fake {
    /// Next command from the client.
    async fn read_cmd(&mut self) -> Value {
        let mut line = String::new();
        assert!(
            self.rd.read_line(&mut line).await.unwrap() > 0,
            "client hung up"
        );
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, line: &str) {
        self.wr.write_all(line.as_bytes()).await.unwrap();
        self.wr.write_all(b"\r\n").await.unwrap();
    }

    async fn reply(&mut self, cmd: &Value, ret: Value) {
        let msg = json!({"return": ret, "id": cmd["id"]});
        self.send(&msg.to_string()).await;
    }

    async fn event(&mut self, name: &str, data: Value) {
        let msg = json!({"event": name, "data": data,
                         "timestamp": {"seconds": 1, "microseconds": 2}});
        self.send(&msg.to_string()).await;
    }

    /// Greeting and `qmp_capabilities`, as QEMU does them.
    async fn negotiate(&mut self) {
        self.send(GREETING).await;
        let cmd = self.read_cmd().await;
        assert_eq!(cmd["execute"], "qmp_capabilities");
        self.reply(&cmd, json!({})).await;
    }
}

/// A listening fake monitor; `accept` gives the monitor side.
struct Server {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: UnixListener,
}

impl Server {
    fn new() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Server {
            _dir: dir,
            path,
            listener,
        }
    }

    async fn accept(&self) -> Fake {
        let (s, _) = self.listener.accept().await.unwrap();
        let (rd, wr) = s.into_split();
        Fake {
            rd: BufReader::new(rd),
            wr,
        }
    }
}

/// Connects a client while the fake negotiates.
async fn connected(server: &Server) -> (Qmp, Fake) {
    let (qmp, fake) = tokio::join!(Qmp::connect(&server.path), async {
        let mut f = server.accept().await;
        f.negotiate().await;
        f
    });
    let qmp = qmp.unwrap();
    assert_eq!(qmp.version().major, 10);
    assert_eq!(qmp.version().package, "fake");
    (qmp, fake)
}

#[tokio::test]
async fn replies_are_routed_by_id_with_events_between() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();

    let monitor = async {
        let a = fake.read_cmd().await;
        let b = fake.read_cmd().await;
        fake.event("JOB_STATUS_CHANGE", json!({"id": "j", "status": "running"}))
            .await;
        // Answer in reverse order; one of them fails.
        let (first, second) = if a["execute"] == "one" {
            (a, b)
        } else {
            (b, a)
        };
        fake.reply(&second, json!({"n": 2})).await;
        let err =
            json!({"id": first["id"], "error": {"class": "DeviceNotFound", "desc": "no such job"}});
        fake.send(&err.to_string()).await;
        assert_eq!(second["arguments"], json!({"x": 1}));
        fake
    };
    let (one, two, mut fake) = tokio::join!(
        qmp.execute("one", None),
        qmp.execute("two", Some(json!({"x": 1}))),
        monitor
    );
    assert_eq!(two.unwrap(), json!({"n": 2}));
    match one {
        Err(Error::Command {
            command,
            class: qmp::ErrorClass::DeviceNotFound,
            desc,
        }) => {
            assert_eq!(command, "one");
            assert_eq!(desc, "no such job");
        }
        other => panic!("{other:?}"),
    }
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.name, "JOB_STATUS_CHANGE");
    assert_eq!(ev.timestamp.seconds, 1);
    assert!(matches!(
        ev.typed().unwrap(),
        Some(qmp::JobEvent::StatusChange(ref c)) if c.status == qmp::JobStatus::Running
    ));

    // A reply without an id (or with an unknown one) is ignored, not fatal.
    let (r, ()) = tokio::join!(qmp.execute("three", None), async {
        let c = fake.read_cmd().await;
        fake.send(r#"{"return": {}}"#).await;
        fake.send(r#"{"return": {}, "id": 999999}"#).await;
        fake.reply(&c, json!(3)).await;
    });
    assert_eq!(r.unwrap(), json!(3));
}

#[tokio::test]
async fn bad_json_closes_and_fails_everything_pending() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();
    let (r, ()) = tokio::join!(qmp.execute("query-block-jobs", None), async {
        fake.read_cmd().await;
        fake.event("X", json!({})).await;
        fake.send("{this is not json").await;
    });
    match r {
        Err(Error::Closed { reason }) => assert!(reason.contains("bad JSON"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Events that came before the fault are still delivered, then Closed.
    assert_eq!(events.recv().await.unwrap().name, "X");
    assert!(matches!(events.recv().await, Err(Error::Closed { .. })));
    assert!(matches!(events.recv().await, Err(Error::Closed { .. })));
    assert!(qmp.is_closed());
}

#[tokio::test]
async fn eof_inside_a_message_is_reported() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let (r, ()) = tokio::join!(qmp.execute("x", None), async {
        fake.read_cmd().await;
        fake.wr.write_all(br#"{"return": "#).await.unwrap();
        drop(fake);
    });
    match r {
        Err(Error::Closed { reason }) => assert!(reason.contains("inside a message"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn command_timeout_leaves_connection_usable() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let (r, slow) = tokio::join!(
        qmp.execute_with_timeout("slow", None, Duration::from_millis(100)),
        fake.read_cmd()
    );
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    // The late reply is dropped; the next command gets its own.
    let (r, ()) = tokio::join!(qmp.execute("next", None), async {
        fake.reply(&slow, json!("late")).await;
        let c = fake.read_cmd().await;
        fake.reply(&c, json!("on time")).await;
    });
    assert_eq!(r.unwrap(), json!("on time"));
}

#[tokio::test]
async fn missing_greeting_times_out() {
    let server = Server::new();
    let t0 = Instant::now();
    let (r, _fake) = tokio::join!(
        Qmp::connect_with_timeout(&server.path, Duration::from_millis(200)),
        server.accept()
    );
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn wrong_first_message_and_missing_socket() {
    let server = Server::new();
    let (r, ()) = tokio::join!(Qmp::connect(&server.path), async {
        let mut f = server.accept().await;
        f.send(r#"{"return": {}}"#).await;
    });
    assert!(matches!(r, Err(Error::Protocol { .. })), "{r:?}");

    let r = Qmp::connect(&server.path.with_file_name("nope.sock")).await;
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");

    // A capabilities refusal is a command error.
    let (r, ()) = tokio::join!(Qmp::connect(&server.path), async {
        let mut f = server.accept().await;
        f.send(GREETING).await;
        let c = f.read_cmd().await;
        let err = json!({"id": c["id"], "error": {"class": "CommandNotFound", "desc": "x"}});
        f.send(&err.to_string()).await;
    });
    assert!(
        matches!(r, Err(Error::Command { ref command, .. }) if command == "qmp_capabilities"),
        "{r:?}"
    );
}

#[tokio::test]
async fn slow_subscriber_learns_how_many_events_it_lost() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();
    let extra = 10;
    let (r, ()) = tokio::join!(qmp.execute("sync", None), async {
        let c = fake.read_cmd().await;
        for i in 0..qmp::EVENT_BUFFER + extra {
            fake.event("TICK", json!({ "i": i })).await;
        }
        // The reply comes after the events, so they are all routed by then.
        fake.reply(&c, json!({})).await;
    });
    r.unwrap();
    match events.recv().await {
        Err(Error::EventsLost { count }) => assert_eq!(count, extra as u64),
        other => panic!("{other:?}"),
    }
    // It goes on with the oldest event still buffered.
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.data["i"], json!(extra));
}

#[tokio::test]
async fn dropping_the_client_ends_event_streams_and_hangs_up() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();
    drop(qmp);
    assert!(matches!(events.recv().await, Err(Error::Closed { .. })));
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(2), fake.rd.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "client did not hang up: {line}");
}

#[tokio::test]
async fn wait_for_skips_other_events_and_times_out() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();
    fake.event("A", json!({})).await;
    fake.event("B", json!({"k": 1})).await;
    let ev = qmp::wait_event(&mut events, |e| e.name == "B", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(ev.data, json!({"k": 1}));
    let r = events
        .wait_for(Duration::from_millis(100), |e| e.name == "C")
        .await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
}

#[tokio::test]
async fn wait_jobs_ended_collects_in_any_order() {
    let server = Server::new();
    let (qmp, mut fake) = connected(&server).await;
    let mut events = qmp.subscribe();
    let end = |job: &str, offset: u64| json!({"device": job, "len": 100, "offset": offset, "speed": 0, "type": "backup"});
    fake.event("JOB_STATUS_CHANGE", json!({"id": "b", "status": "running"}))
        .await;
    fake.event("BLOCK_JOB_CANCELLED", end("b", 40)).await;
    fake.event("BLOCK_JOB_COMPLETED", end("other", 100)).await;
    fake.event("BLOCK_JOB_COMPLETED", end("a", 100)).await;
    let got = events
        .wait_jobs_ended(&["a", "b"], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got[0].end.device, "a");
    assert!(got[0].is_success());
    assert_eq!(got[1].end.device, "b");
    assert!(got[1].cancelled && !got[1].is_success());

    // A job that never ends: the lost connection ends the wait.
    fake.event("BLOCK_JOB_COMPLETED", end("c", 100)).await;
    drop(fake);
    let r = events
        .wait_jobs_ended(&["c", "d"], Duration::from_secs(5))
        .await;
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
}
