//! QMP messages as bytes: decoding one line from QEMU into a greeting, a
//! reply, an error reply or an event; encoding one command line; QEMU's
//! error classes; and the typed block-job events a backup waits for.
//!
//! Pure: no sockets, no tasks, no clock. Framing (one JSON object per line)
//! and the connection belong to [`super::client`]; commands with typed
//! arguments to [`super::commands`].

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};

/// Longest piece of a bad message quoted in an error.
pub const MAX_QUOTE: usize = 512;

/// A message that is not what QMP allows at that point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("QMP protocol error: {what}: {text}")]
pub struct DecodeError {
    /// What was wrong.
    pub what: String,
    /// The offending text (clipped when long).
    pub text: String,
}

/// The error classes QEMU reports in `{"error": {"class": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost every error: bad arguments, unknown node, permission conflict.
    GenericError,
    /// The command does not exist in this QEMU (or is not allowed yet).
    CommandNotFound,
    /// A device has no medium, or a job is not in the right state.
    DeviceNotActive,
    /// No device or job with that name.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
    /// A class this client does not know.
    Other(String),
}

impl ErrorClass {
    /// Maps QEMU's spelling to the enum.
    pub fn parse(s: &str) -> ErrorClass {
        match s {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }

    /// QEMU's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuVersion {
    /// e.g. 10 for 10.0.2.
    pub major: u32,
    /// e.g. 0 for 10.0.2.
    pub minor: u32,
    /// e.g. 2 for 10.0.2.
    pub micro: u32,
    /// Distribution build string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package.trim())?;
        }
        Ok(())
    }
}

/// When QEMU emitted an event (its own clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch; -1 when QEMU could not read the clock.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// As a `SystemTime`, or `None` when QEMU sent an invalid time.
    pub fn to_system_time(self) -> Option<SystemTime> {
        let secs = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    }
}

/// One QMP event, untyped. See [`Event::typed`] for the block-job events.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `BLOCK_JOB_COMPLETED`.
    pub name: String,
    /// The `data` member (`Value::Null` when absent).
    pub data: Value,
    /// QEMU's timestamp.
    pub timestamp: Timestamp,
}

/// States of a QEMU job (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Not yet created.
    Undefined,
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused (also briefly at the start of a job).
    Paused,
    /// Mirror jobs: in sync.
    Ready,
    /// Paused while ready.
    Standby,
    /// Done, waiting for other jobs of its transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failing or being cancelled.
    Aborting,
    /// Finished, waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

/// `BLOCK_JOB_COMPLETED` and `BLOCK_JOB_CANCELLED`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobEnd {
    /// The job id.
    pub device: String,
    /// Job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Total amount of work.
    pub len: u64,
    /// Work done when it ended.
    pub offset: u64,
    /// Rate limit, 0 for none.
    pub speed: u64,
    /// Set when the job failed (only on `BLOCK_JOB_COMPLETED`).
    #[serde(default)]
    pub error: Option<String>,
}

/// `BLOCK_JOB_ERROR`: an I/O error hit a job (the job usually ends with a
/// `BLOCK_JOB_COMPLETED` carrying `error` afterwards).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobError {
    /// The job id.
    pub device: String,
    /// `read` or `write`.
    pub operation: String,
    /// What QEMU does about it: `report`, `ignore` or `stop`.
    pub action: String,
}

/// `JOB_STATUS_CHANGE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JobStatusChange {
    /// The job id.
    pub id: String,
    /// The new state.
    pub status: JobStatus,
}

/// The events a backup waits for, parsed. See [`Event::typed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `BLOCK_JOB_COMPLETED`; check `error`.
    Completed(BlockJobEnd),
    /// `BLOCK_JOB_CANCELLED`.
    Cancelled(BlockJobEnd),
    /// `BLOCK_JOB_ERROR`.
    Error(BlockJobError),
    /// `JOB_STATUS_CHANGE`.
    StatusChange(JobStatusChange),
}

impl JobEvent {
    /// The job the event is about.
    pub fn job_id(&self) -> &str {
        match self {
            JobEvent::Completed(e) | JobEvent::Cancelled(e) => &e.device,
            JobEvent::Error(e) => &e.device,
            JobEvent::StatusChange(e) => &e.id,
        }
    }
}

/// How one block job ended (`BLOCK_JOB_COMPLETED` or `BLOCK_JOB_CANCELLED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// True for `BLOCK_JOB_CANCELLED`, false for `BLOCK_JOB_COMPLETED`.
    pub cancelled: bool,
    /// The event's data; `end.device` is the job id.
    pub end: BlockJobEnd,
}

impl JobOutcome {
    /// Completed, without error, and copied everything.
    pub fn is_success(&self) -> bool {
        !self.cancelled && self.end.error.is_none() && self.end.offset == self.end.len
    }
}

impl Event {
    /// Parses the job events; `Ok(None)` for any other event, a
    /// [`DecodeError`] when a job event lacks a field.
    pub fn typed(&self) -> Result<Option<JobEvent>, DecodeError> {
        fn parse<T: for<'de> Deserialize<'de>>(ev: &Event) -> Result<T, DecodeError> {
            T::deserialize(&ev.data).map_err(|e| DecodeError {
                what: format!("bad {} event: {e}", ev.name),
                text: clip(&ev.data.to_string()),
            })
        }
        Ok(Some(match self.name.as_str() {
            "BLOCK_JOB_COMPLETED" => JobEvent::Completed(parse(self)?),
            "BLOCK_JOB_CANCELLED" => JobEvent::Cancelled(parse(self)?),
            "BLOCK_JOB_ERROR" => JobEvent::Error(parse(self)?),
            "JOB_STATUS_CHANGE" => JobEvent::StatusChange(parse(self)?),
            _ => return Ok(None),
        }))
    }
}

/// One message from QEMU, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting, first thing on a new connection.
    Greeting(QemuVersion),
    /// A command's `return` value.
    Return {
        /// The `id` we sent with the command.
        id: Option<Value>,
        /// The returned value.
        value: Value,
    },
    /// A command's `error`.
    Error {
        /// The `id` we sent with the command.
        id: Option<Value>,
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's human-readable message.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// `s`, or its first [`MAX_QUOTE`] bytes and its length when longer: for
/// quoting bad input in errors.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_QUOTE {
        return s.to_string();
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// Decodes one line from QEMU (its `\n` may be included).
pub fn decode(line: &[u8]) -> Result<Message, DecodeError> {
    let text = || clip(String::from_utf8_lossy(line).trim_end());
    let v: Value = serde_json::from_slice(line).map_err(|e| DecodeError {
        what: format!("bad JSON: {e}"),
        text: text(),
    })?;
    let Value::Object(mut obj) = v else {
        return Err(DecodeError {
            what: "message is not a JSON object".into(),
            text: text(),
        });
    };
    let bad = |what: &str| DecodeError {
        what: what.to_string(),
        text: text(),
    };
    if let Some(g) = obj.remove("QMP") {
        let q = g
            .get("version")
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| bad("greeting without version.qemu"))?;
        let num = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        return Ok(Message::Greeting(QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: g
                .get("version")
                .and_then(|v| v.get("package"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }));
    }
    if let Some(name) = obj.remove("event") {
        let name = name
            .as_str()
            .ok_or_else(|| bad("event name is not a string"))?
            .to_string();
        let timestamp = match obj.remove("timestamp") {
            Some(t) => Timestamp::deserialize(&t).map_err(|_| bad("bad event timestamp"))?,
            None => Timestamp::default(),
        };
        return Ok(Message::Event(Event {
            name,
            data: obj.remove("data").unwrap_or(Value::Null),
            timestamp,
        }));
    }
    let id = obj.remove("id");
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(err) = obj.remove("error") {
        let class = err
            .get("class")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("error without class"))?;
        let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
        return Ok(Message::Error {
            id,
            class: ErrorClass::parse(class),
            desc: desc.to_string(),
        });
    }
    Err(bad("neither greeting, reply nor event"))
}

/// Encodes one command line: `{"execute", "id", "arguments"}` and `\n`.
/// `args` must be a JSON object when given.
pub fn encode_command(id: u64, command: &str, args: Option<Value>) -> Vec<u8> {
    let mut msg = json!({"execute": command, "id": id});
    if let Some(args) = args {
        msg["arguments"] = args;
    }
    let mut line = serde_json::to_vec(&msg).expect("a JSON value always serializes");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}}"#;
        let Message::Greeting(v) = decode(line).unwrap() else {
            panic!("not a greeting")
        };
        assert_eq!((v.major, v.minor, v.micro), (10, 0, 2));
        assert_eq!(v.to_string(), "10.0.2 (Debian 1:10.0.2+ds-2)");
    }

    #[test]
    fn replies() {
        assert_eq!(
            decode(b"{\"return\": {}, \"id\": 7}\r\n").unwrap(),
            Message::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        assert_eq!(
            decode(br#"{"id": 3, "error": {"class": "GenericError", "desc": "Failed to find node with node-name='x'"}}"#)
                .unwrap(),
            Message::Error {
                id: Some(json!(3)),
                class: ErrorClass::GenericError,
                desc: "Failed to find node with node-name='x'".into()
            }
        );
        let Message::Error { id, class, .. } =
            decode(br#"{"error": {"class": "SomethingNew", "desc": ""}}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(id, None);
        assert_eq!(class, ErrorClass::Other("SomethingNew".into()));
        assert_eq!(class.to_string(), "SomethingNew");
    }

    #[test]
    fn error_classes_round_trip() {
        for s in [
            "GenericError",
            "CommandNotFound",
            "DeviceNotActive",
            "DeviceNotFound",
            "KVMMissingCap",
            "Unheard",
        ] {
            assert_eq!(ErrorClass::parse(s).as_str(), s);
        }
        assert_eq!(
            ErrorClass::parse("DeviceNotFound"),
            ErrorClass::DeviceNotFound
        );
    }

    #[test]
    fn bad_messages() {
        for (line, what) in [
            (&b"garbage"[..], "bad JSON"),
            (b"[1,2]", "message is not a JSON object"),
            (b"{\"foo\": 1}", "neither greeting, reply nor event"),
            (
                b"{\"error\": {\"desc\": \"no class\"}}",
                "error without class",
            ),
            (b"{\"event\": 5}", "event name is not a string"),
            (
                b"{\"event\": \"X\", \"timestamp\": 1}",
                "bad event timestamp",
            ),
            (b"{\"QMP\": {}}", "greeting without version.qemu"),
        ] {
            let e = decode(line).unwrap_err();
            assert!(
                e.what.starts_with(what),
                "{}: {e}",
                String::from_utf8_lossy(line)
            );
        }
        let e = decode(b"not json\n").unwrap_err();
        assert_eq!(e.text, "not json");
        assert!(
            e.to_string().starts_with("QMP protocol error: bad JSON"),
            "{e}"
        );
    }

    #[test]
    fn long_text_is_clipped() {
        let s = "é".repeat(1000);
        let c = clip(&s);
        assert!(c.len() < MAX_QUOTE + 40);
        assert!(c.ends_with("(2000 bytes)"));
        assert_eq!(clip("short"), "short");
        let e = decode(format!("[{}]", "1,".repeat(1000)).as_bytes()).unwrap_err();
        assert!(e.text.len() < MAX_QUOTE + 40, "{}", e.text);
    }

    #[test]
    fn commands() {
        assert_eq!(
            encode_command(1, "qmp_capabilities", None),
            b"{\"execute\":\"qmp_capabilities\",\"id\":1}\n"
        );
        let line = encode_command(42, "blockdev-del", Some(json!({"node-name": "x"})));
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"execute": "blockdev-del", "id": 42, "arguments": {"node-name": "x"}})
        );
    }

    fn event(line: &[u8]) -> Event {
        match decode(line).unwrap() {
            Message::Event(e) => e,
            m => panic!("not an event: {m:?}"),
        }
    }

    #[test]
    fn job_events() {
        let ev = event(
            br#"{"timestamp": {"seconds": 1795767188, "microseconds": 791307}, "event": "BLOCK_JOB_COMPLETED", "data": {"device": "backup-drive0", "len": 10486272, "offset": 10486272, "speed": 0, "type": "backup"}}"#,
        );
        assert_eq!(ev.timestamp.seconds, 1795767188);
        assert!(ev.timestamp.to_system_time().is_some());
        let want = BlockJobEnd {
            device: "backup-drive0".into(),
            job_type: "backup".into(),
            len: 10486272,
            offset: 10486272,
            speed: 0,
            error: None,
        };
        assert_eq!(ev.typed().unwrap(), Some(JobEvent::Completed(want)));

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_COMPLETED", "data": {"device": "j", "len": 100, "offset": 50, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
        );
        let Some(JobEvent::Completed(end)) = ev.typed().unwrap() else {
            panic!()
        };
        assert_eq!(end.error.as_deref(), Some("Input/output error"));

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_CANCELLED", "data": {"device": "j", "len": 100, "offset": 50, "speed": 1024, "type": "backup"}}"#,
        );
        let typed = ev.typed().unwrap().unwrap();
        assert!(matches!(typed, JobEvent::Cancelled(ref e) if e.speed == 1024));
        assert_eq!(typed.job_id(), "j");

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_ERROR", "data": {"device": "j", "operation": "write", "action": "report"}}"#,
        );
        assert_eq!(
            ev.typed().unwrap(),
            Some(JobEvent::Error(BlockJobError {
                device: "j".into(),
                operation: "write".into(),
                action: "report".into()
            }))
        );

        let ev = event(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "j"}}"#,
        );
        assert_eq!(
            ev.typed().unwrap(),
            Some(JobEvent::StatusChange(JobStatusChange {
                id: "j".into(),
                status: JobStatus::Waiting
            }))
        );
        let ev =
            event(br#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "brand-new", "id": "j"}}"#);
        assert!(matches!(
            ev.typed().unwrap(),
            Some(JobEvent::StatusChange(JobStatusChange {
                status: JobStatus::Unknown,
                ..
            }))
        ));

        let ev = event(br#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#);
        assert_eq!(ev.typed().unwrap(), None);

        let ev = event(br#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j"}}"#);
        let e = ev.typed().unwrap_err();
        assert!(e.what.starts_with("bad BLOCK_JOB_COMPLETED event"), "{e}");
        let ev = event(br#"{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}"#);
        assert_eq!(ev.data, Value::Null);
        assert_eq!(ev.timestamp.to_system_time(), None);
    }

    #[test]
    fn job_outcomes() {
        let end = BlockJobEnd {
            device: "j".into(),
            job_type: "backup".into(),
            len: 100,
            offset: 100,
            speed: 0,
            error: None,
        };
        let ok = JobOutcome {
            cancelled: false,
            end: end.clone(),
        };
        assert!(ok.is_success());
        let cancelled = JobOutcome {
            cancelled: true,
            ..ok.clone()
        };
        assert!(!cancelled.is_success());
        let short = JobOutcome {
            cancelled: false,
            end: BlockJobEnd {
                offset: 50,
                ..end.clone()
            },
        };
        assert!(!short.is_success());
        let failed = JobOutcome {
            cancelled: false,
            end: BlockJobEnd {
                error: Some("Input/output error".into()),
                ..end
            },
        };
        assert!(!failed.is_success());
    }
}
