//! The node's local API: a unix socket in the state directory (`api.sock`, owner-only) through
//! which `anchor-node call`, `expose`, `connect` and `peers` reach the running agent, and which
//! applications on the node may use too.
//!
//! The protocol is JSON lines: the client writes one request object on one line; the agent
//! answers with one object on one line, `{"ok": true, ...}` or
//! `{"ok": false, "code": "...", "error": "..."}`. Requests:
//!
//! | request | answer |
//! |---|---|
//! | `{"op":"peers"}` | `{"ok":true,"peers":[{device_id,name,path,addr,rtt_ms,loss,since,connected,services,may_call,may_open,may_call_here}]}` |
//! | `{"op":"call","peer":P,"capability":C,"input":JSON,"timeout_ms":N}` | `{"ok":true,"invocation_id","state","output","error","took_ms"}` |
//! | `{"op":"expose","name":S,"to":"HOST:PORT"}` | `{"ok":true}`, then the service stays exposed until the client closes the connection |
//! | `{"op":"connect","peer":P,"service":S,"listen":"HOST:PORT"}` | `{"ok":true,"listening":"HOST:PORT"}`, then connections are carried until the client closes |
//!
//! `P` is a device id, a unique prefix of one, or a device name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anchorage_wire::invoke::{InvokeResult, Outcome};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::peer::{PeerError, Peers, tunnel};
use crate::state::StateDir;

/// The socket's file name in the state directory.
pub const API_SOCKET: &str = "api.sock";
/// Longest request line, bytes (a call's input is at most 256 KiB of JSON).
pub const MAX_REQUEST: usize = 1024 * 1024;
/// Default timeout of a call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Every peer of the directory.
    Peers,
    /// Invoke a capability on a peer.
    Call {
        /// Device id, unique prefix or name.
        peer: String,
        /// Capability.
        capability: String,
        /// Input (JSON).
        #[serde(default)]
        input: Value,
        /// Milliseconds to wait for the result.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Expose a local TCP service to peers while the connection lasts.
    Expose {
        /// Service name.
        name: String,
        /// Where connections go, `HOST:PORT`.
        to: String,
    },
    /// Listen locally and carry connections to a peer's service while the connection lasts.
    Connect {
        /// Device id, unique prefix or name.
        peer: String,
        /// Service name.
        service: String,
        /// Where to listen, `HOST:PORT`.
        listen: String,
    },
}

/// The running API server; [`ApiServer::stop`] removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Stops serving and removes the socket file.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves the API of `peers` on the state directory's socket. A socket left by an agent that
/// died is replaced; one a running agent answers on is an error.
pub fn serve(state: &StateDir, peers: Arc<Peers>) -> std::io::Result<ApiServer> {
    let path = state.path().join(API_SOCKET);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "another agent is running on this state directory ({} answers)",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    restrict(&path)?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let peers = peers.clone();
                    tokio::spawn(async move { client(stream, peers).await });
                }
                Err(e) => {
                    warn!(error = %e, "local API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(ApiServer { path, task })
}

#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

async fn client(stream: UnixStream, peers: Arc<Peers>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let request = match read_line(&mut read).await {
        Ok(Some(line)) => serde_json::from_str::<Request>(&line)
            .map_err(|e| refusal("bad_request", format!("not a request: {e}"))),
        Ok(None) => return,
        Err(e) => Err(refusal("bad_request", e.to_string())),
    };
    let request = match request {
        Ok(r) => r,
        Err(answer) => {
            let _ = send(&mut write, &answer).await;
            return;
        }
    };
    debug!(?request, "local API request");
    match request {
        Request::Peers => {
            let _ = send(&mut write, &json!({"ok": true, "peers": peers.list()})).await;
        }
        Request::Call {
            peer,
            capability,
            input,
            timeout_ms,
        } => {
            let answer = call(&peers, &peer, &capability, input, timeout_ms).await;
            let _ = send(&mut write, &answer).await;
        }
        Request::Expose { name, to } => {
            let target = match parse_addr(&to) {
                Ok(t) => t,
                Err(answer) => {
                    let _ = send(&mut write, &answer).await;
                    return;
                }
            };
            let guard = match peers.expose(&name, target) {
                Ok(g) => g,
                Err(e) => {
                    let _ = send(&mut write, &error(&e)).await;
                    return;
                }
            };
            if send(&mut write, &json!({"ok": true})).await.is_ok() {
                until_closed(&mut read).await;
            }
            drop(guard);
        }
        Request::Connect {
            peer,
            service,
            listen,
        } => {
            let listen = match parse_addr(&listen) {
                Ok(l) => l,
                Err(answer) => {
                    let _ = send(&mut write, &answer).await;
                    return;
                }
            };
            let device = match peers.resolve(&peer) {
                Ok(d) => d,
                Err(e) => {
                    let _ = send(&mut write, &error(&e)).await;
                    return;
                }
            };
            match tunnel::connect_listener(peers.clone(), device, service, listen).await {
                Ok((bound, task)) => {
                    let answer =
                        json!({"ok": true, "listening": bound.to_string(), "peer": device});
                    if send(&mut write, &answer).await.is_ok() {
                        until_closed(&mut read).await;
                    }
                    task.abort();
                }
                Err(e) => {
                    let _ = send(&mut write, &error(&e)).await;
                }
            }
        }
    }
}

async fn call(
    peers: &Arc<Peers>,
    peer: &str,
    capability: &str,
    input: Value,
    timeout_ms: Option<u64>,
) -> Value {
    let device = match peers.resolve(peer) {
        Ok(d) => d,
        Err(e) => return error(&e),
    };
    let input = if input.is_null() {
        b"{}".to_vec()
    } else {
        input.to_string().into_bytes()
    };
    let timeout = timeout_ms.map_or(DEFAULT_CALL_TIMEOUT, Duration::from_millis);
    let started = tokio::time::Instant::now();
    match peers.call(device, capability, input, timeout).await {
        Ok((id, result)) => call_answer(&id.to_string(), &result, started.elapsed()),
        Err(e) => error(&e),
    }
}

/// The answer to a call, in `anchorctl invoke --json`'s shape.
fn call_answer(id: &str, result: &InvokeResult, took: Duration) -> Value {
    let state = match result.outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::TimedOut | Outcome::Expired => "timed_out",
        Outcome::Rejected => "rejected",
        _ => "failed",
    };
    let output = if result.output.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&result.output)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&result.output).into_owned()))
    };
    json!({
        "ok": true,
        "invocation_id": id,
        "state": state,
        "output": output,
        "error": result.error,
        "truncated": result.truncated,
        "ran_ms": result.duration_ms,
        // To a microsecond: more digits are float noise.
        "took_ms": (took.as_secs_f64() * 1_000_000.0).round() / 1000.0,
    })
}

fn parse_addr(text: &str) -> Result<SocketAddr, Value> {
    text.parse().map_err(|_| {
        refusal(
            "bad_request",
            format!("{text:?} is not HOST:PORT with an IP address, e.g. 127.0.0.1:22"),
        )
    })
}

fn refusal(code: &str, message: String) -> Value {
    json!({"ok": false, "code": code, "error": message})
}

fn error(e: &PeerError) -> Value {
    refusal(e.code(), e.to_string())
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, answer: &Value) -> std::io::Result<()> {
    let mut line = answer.to_string();
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    write.flush().await
}

/// Reads one line of at most [`MAX_REQUEST`] bytes; `None` at end of file.
async fn read_line<R: AsyncBufReadExt + Unpin>(read: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut limited = read.take(MAX_REQUEST as u64 + 1);
    let n = limited.read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request is at most {MAX_REQUEST} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Waits until the client closes its side (whatever it sends meanwhile is ignored).
async fn until_closed<R: AsyncReadExt + Unpin>(read: &mut R) {
    let mut sink = [0u8; 256];
    while let Ok(n) = read.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

/// Why the local API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answers on the socket.
    #[error("no running agent answers on {path} ({source}); start it with `anchor-node run`")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        source: std::io::Error,
    },
    /// The conversation failed.
    #[error("the agent's local API failed: {0}")]
    Io(#[from] std::io::Error),
    /// The agent answered something that is not an answer.
    #[error("the agent answered something unexpected: {0}")]
    Garbled(String),
}

/// A client connection to a running agent's API.
#[derive(Debug)]
pub struct Client {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the agent running on `state_dir` and sends `request`; returns the first
    /// answer and the connection (which keeps an `expose` or `connect` alive while open).
    pub async fn request(
        state_dir: &Path,
        request: &Request,
    ) -> Result<(Value, Client), ClientError> {
        let path = state_dir.join(API_SOCKET);
        let stream =
            UnixStream::connect(&path)
                .await
                .map_err(|source| ClientError::NotRunning {
                    path: path.clone(),
                    source,
                })?;
        let (read, mut write) = stream.into_split();
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::Garbled(e.to_string()))?;
        line.push('\n');
        write.write_all(line.as_bytes()).await?;
        let mut client = Client {
            read: BufReader::new(read),
            write,
        };
        let answer = client.answer().await?;
        Ok((answer, client))
    }

    async fn answer(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        let n = (&mut self.read)
            .take(64 * 1024 * 1024)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Err(ClientError::Garbled(
                "the agent closed the connection".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| ClientError::Garbled(e.to_string()))
    }

    /// Closes the connection: an `expose` or `connect` ends.
    pub async fn close(mut self) {
        let _ = self.write.shutdown().await;
    }

    /// Waits until the agent closes the connection (it stopped).
    pub async fn closed(&mut self) {
        until_closed(&mut self.read).await;
    }
}
