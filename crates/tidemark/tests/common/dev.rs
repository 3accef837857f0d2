//! `tidemark dev`, the real binary, for tests of what a new user runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `tidemark dev`; ended (SIGINT, so it stops its cluster) when dropped, whatever
/// the test's outcome.
pub struct Dev {
    child: Child,
    /// The proxy's port.
    pub port: u16,
    /// Its banner, up to "Press Ctrl-C".
    pub banner: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Dev {
    /// Starts `tidemark dev` with `args` (besides --listen and --metrics-listen) and waits
    /// for its banner (60 s at most).
    pub async fn start(args: &[&str]) -> Dev {
        let (port, metrics) = (free_port(), free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .arg("dev")
            .args(args)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--metrics-listen",
                &format!("127.0.0.1:{metrics}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tidemark dev starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut dev = Dev {
            child,
            port,
            banner: Vec::new(),
        };
        // Read stdout to its end on a thread of its own (a closed pipe would make the dev
        // process's next print fail), handing lines over until the banner's last one.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        dev.banner = tokio::task::spawn_blocking(move || {
            let mut seen = Vec::new();
            while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
                let done = line.contains("Press Ctrl-C");
                seen.push(line);
                if done {
                    break;
                }
            }
            seen
        })
        .await
        .expect("stdout reader");
        let text = dev.banner.join("\n");
        assert!(text.contains("tidemark dev is ready"), "{text}");
        dev
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
