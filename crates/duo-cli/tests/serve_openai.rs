//! `duo serve` over loopback, driven by the official `openai` Python client
//! (tests/serve/test_openai.py). The test installs the client into a virtual environment
//! under the target folder on first run (`python3 -m venv`, `pip install openai==3.57.0 httpx==0.28.1`),
//! starts two servers on free ports with the default model, and runs the Python suite:
//! chat and completions, streamed and not, logprobs, seeds, stop strings, every error
//! case, 429 with Retry-After, a client killed mid-stream freeing its KV, and 16
//! concurrent streams identical to running each alone.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// The official client, and httpx for the raw error-case requests.
const PACKAGES: [&str; 2] = ["openai==3.57.0", "httpx==0.28.1"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python with the openai client, installed once per target folder.
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let marker = venv.join(format!("{}.installed", PACKAGES.join("+")));
    if !marker.exists() {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().expect("python3 -m venv").success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]).args(PACKAGES).status().expect("pip").success();
        assert!(ok, "pip install {PACKAGES:?} failed");
        std::fs::write(&marker, "").expect("marker");
    }
    py
}

/// A running server; killed on drop.
struct Server {
    child: Child,
    url: String,
    /// Everything it wrote to standard error so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_duo"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("duo serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(addr) = line.split("listening on ").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_string());
            }
            eprintln!("[server] {line}");
            lines.lock().expect("log").push(line);
        }
    });
    let url = rx.recv_timeout(Duration::from_secs(120)).expect("the server prints its address");
    Server { child, url, log }
}

/// `GET path` with a raw socket: (status, body).
fn get(url: &str, path: &str) -> (u16, String) {
    let host = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn openai_client_against_duo_serve() {
    let py = python();
    // Fetch the default model before timing anything (first use downloads it).
    duo_model::fetch::default_model().expect("default model");
    let key = "test-key-123";
    let main = start(&["--api-key", key, "--max-body-bytes", "65536", "--max-running", "16"]);
    // Right after binding the model is still loading: /health says so.
    let (status, body) = get(&main.url, "/health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"code\":\"loading\""), "{body}");
    let tight = start(&["--max-waiting", "1", "--max-running", "1", "--timeout-keep-alive", "1", "--timeout-read", "1"]);
    let out = Command::new(&py)
        .arg(repo().join("tests/serve/test_openai.py"))
        .env("DUO_URL", &main.url)
        .env("DUO_KEY", key)
        .env("DUO_TIGHT_URL", &tight.url)
        .output()
        .expect("python runs");
    let report = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "the openai client suite failed:\n{report}");
    assert!(report.contains("OK"), "{report}");
    // Unknown request fields that change nothing are ignored with a log line naming them.
    let log = main.log.lock().expect("log").join("\n");
    assert!(log.contains("ignoring request fields") && log.contains("\"user\""), "{log}");
}
