//! `cargo xtask broker start|stop|status`: a local Kafka-API broker (tansu)
//! for the tests and for trying rewind against Kafka without one.
//!
//! tansu is built once per machine with `cargo install` into
//! `~/.cargo/rewind-tools` (13–17 minutes cold; CI caches `~/.cargo`). The
//! broker keeps its pid, port and log under `target/broker/`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, target_dir};

/// The tansu release line the tests are written against.
const TANSU_VERSION: &str = "^0.6";
/// The port `start` listens on unless told otherwise.
const DEFAULT_PORT: u16 = 19092;

/// Where tansu is installed (`$REWIND_TOOLS`, or `~/.cargo/rewind-tools`).
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REWIND_TOOLS") {
        return PathBuf::from(dir);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    cargo_home.join("rewind-tools")
}

/// The tansu binary, built first if missing.
/// The confluent-kafka release the tests' independent client uses
/// (librdkafka 2.16, which speaks tansu's ApiVersion v3).
const CONFLUENT_KAFKA: &str = "confluent-kafka==2.16.*";

/// A Python with confluent-kafka, in a venv under the tools directory: the
/// tests' independent Kafka client (`tests/client/kafka_client.py`).
pub fn kafka_client() -> Result<PathBuf> {
    let venv = tools_dir().join("venv");
    let python = venv.join("bin").join("python");
    let ready = Command::new(&python)
        .args(["-c", "import confluent_kafka"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        return Ok(python);
    }
    eprintln!(
        "xtask: installing {CONFLUENT_KAFKA} into {}",
        venv.display()
    );
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("cannot run python3 (apt-get install python3 python3-venv)")?;
    if !created.success() {
        bail!("python3 -m venv failed: apt-get install python3-venv, then rerun");
    }
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", CONFLUENT_KAFKA])
        .status()
        .context("cannot run pip")?;
    if !installed.success() {
        bail!("pip install {CONFLUENT_KAFKA} failed");
    }
    Ok(python)
}

pub fn tansu() -> Result<PathBuf> {
    let dir = tools_dir();
    let bin = dir.join("bin").join("tansu");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building the tansu broker into {} (once per machine; 13–17 minutes cold)",
        dir.display()
    );
    let status = Command::new(cargo())
        .args([
            "install",
            "--quiet",
            "tansu",
            "--version",
            TANSU_VERSION,
            "--features",
            "dynostore,libsql",
            "--root",
        ])
        .arg(&dir)
        // Kept, so an interrupted build resumes where it stopped.
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .status()
        .context("cannot run cargo install")?;
    if !status.success() || !bin.is_file() {
        bail!("building tansu failed ({status})");
    }
    Ok(bin)
}

fn state_dir() -> PathBuf {
    target_dir().join("broker")
}

/// The pid and port of the broker `start` left running, if it still runs.
fn running() -> Option<(u32, u16)> {
    let dir = state_dir();
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let port: u16 = std::fs::read_to_string(dir.join("port"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some((pid, port))
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What `cargo xtask broker` does.
#[derive(clap::Subcommand)]
pub enum Action {
    /// Start the broker in the background (in memory; nothing is kept across restarts)
    Start {
        /// The loopback port to listen on
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
    },
    /// Stop the broker `start` started
    Stop,
    /// Say whether a broker is running, and where
    Status,
}

pub fn run(action: Action) -> Result<()> {
    match action {
        Action::Start { port } => start(port),
        Action::Stop => stop(),
        Action::Status => {
            match running() {
                Some((pid, port)) => println!("broker running: pid {pid}, 127.0.0.1:{port}"),
                None => println!("no broker running (cargo xtask broker start)"),
            }
            Ok(())
        }
    }
}

/// Starts tansu on `port` of the loopback interface, keeping its log in memory.
pub fn spawn(tansu: &Path, port: u16, stdout: Stdio, stderr: Stdio) -> Result<Child> {
    let url = format!("tcp://127.0.0.1:{port}");
    Command::new(tansu)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", tansu.display()))
}

fn start(port: u16) -> Result<()> {
    if let Some((pid, port)) = running() {
        println!("broker already running: pid {pid}, 127.0.0.1:{port}");
        return Ok(());
    }
    let tansu = tansu()?;
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("log"))?;
    let child = spawn(
        &tansu,
        port,
        Stdio::from(log.try_clone()?),
        Stdio::from(log),
    )?;
    std::fs::write(dir.join("pid"), child.id().to_string())?;
    std::fs::write(dir.join("port"), port.to_string())?;
    wait_for_port(port, Duration::from_secs(30)).with_context(|| {
        format!(
            "the broker did not come up; see {}",
            dir.join("log").display()
        )
    })?;
    println!(
        "broker running: pid {}, 127.0.0.1:{port} (in memory; log in {})",
        child.id(),
        dir.join("log").display()
    );
    Ok(())
}

fn stop() -> Result<()> {
    let Some((pid, _)) = running() else {
        println!("no broker running");
        return Ok(());
    };
    let status = Command::new("kill").arg(pid.to_string()).status()?;
    if !status.success() {
        bail!("cannot stop the broker (pid {pid})");
    }
    let _ = std::fs::remove_file(state_dir().join("pid"));
    println!("broker stopped");
    Ok(())
}
