//! A real etcd cluster on loopback ports in a temporary directory, for tests and benchmarks:
//! Debian's `etcd` binary (package `etcd-server`), one process per member.
//!
//! [`EtcdCluster::start`] returns `None` when there is no `etcd` on the `PATH`, unless
//! `ANCHORAGE_ETCD_TEST=1` says the tests must run (CI sets it), in which case it panics with
//! how to install it. Members can be killed and started again to test failures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{find_in_path, free_port};

/// How long a new cluster may take to elect a leader and answer.
const START_LIMIT: Duration = Duration::from_secs(30);

/// One member's addresses and process.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; its processes are killed when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    token: String,
    _dir: tempfile::TempDir,
}

/// Whether etcd tests must run (and fail without etcd) rather than skip.
pub fn required() -> bool {
    std::env::var("ANCHORAGE_ETCD_TEST").is_ok_and(|v| v == "1")
}

impl EtcdCluster {
    /// Starts a cluster of `n` members and waits until it answers; `None` (after saying so
    /// on stderr) when etcd is not installed and not [`required`].
    pub fn start(n: usize) -> Option<EtcdCluster> {
        let Some(binary) = find_in_path("etcd") else {
            assert!(
                !required(),
                "ANCHORAGE_ETCD_TEST=1 but there is no `etcd` on the PATH: install Debian's \
                 etcd-server (apt-get install etcd-server)"
            );
            eprintln!("skipped: no `etcd` on the PATH (install etcd-server to run this test)");
            return None;
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            binary,
            members,
            token: format!("anchorage-test-{}", std::process::id()),
            _dir: dir,
        };
        for i in 0..n {
            cluster.start_member(i, "new");
        }
        cluster.wait_ready();
        Some(cluster)
    }

    /// The client URLs of every member, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_member(i, "existing");
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_member(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let log = std::fs::File::create(m.dir.with_extension("log")).expect("an etcd log file");
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Loopback and a temp dir: quick elections, no space quota surprises.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.members[i].child = Some(child);
    }

    /// Waits until a client can read through every live member.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + START_LIMIT;
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if health(m.client) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} did not become healthy in {START_LIMIT:?}: {}",
                    m.name,
                    tail(&m.dir.with_extension("log"))
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Whether etcd's `/health` on `port` says it is healthy (it needs a leader).
fn health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"") || answer.contains("\"health\": \"true\"")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
