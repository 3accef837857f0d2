//! A small in-process TCP fault proxy for tests: put it between tidemark and a node, then
//! delay, blackhole or reset the traffic. (There is no netem on these machines.)

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does to the traffic from now on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Forward each chunk after this delay (both directions).
    Delay(Duration),
    /// Keep connections open but forward nothing, and accept new ones without answering.
    Blackhole,
    /// Close every connection and refuse new ones.
    Reset,
}

struct Shared {
    mode: AtomicU8,
    delay_us: AtomicU64,
    /// New connections wait this long before the proxy connects them on (0: at once).
    hold_new_us: AtomicU64,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    /// A one-shot cut armed by [`FaultProxy::cut_on`]: (pattern, forward it).
    cut: Mutex<Option<(Vec<u8>, bool)>>,
}

const PASS: u8 = 0;
const DELAY: u8 = 1;
const BLACKHOLE: u8 = 2;
const RESET: u8 = 3;

/// A TCP proxy from a free local port to `target`, with switchable faults.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
}

impl FaultProxy {
    pub fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(PASS),
            delay_us: AtomicU64::new(0),
            hold_new_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            cut: Mutex::new(None),
        });
        let sh = shared.clone();
        thread::spawn(move || accept_loop(listener, target, sh));
        Ok(FaultProxy { port, shared })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set(&self, fault: Fault) {
        let m = match fault {
            Fault::Pass => PASS,
            Fault::Delay(d) => {
                self.shared
                    .delay_us
                    .store(d.as_micros() as u64, Ordering::SeqCst);
                DELAY
            }
            Fault::Blackhole => BLACKHOLE,
            Fault::Reset => RESET,
        };
        self.shared.mode.store(m, Ordering::SeqCst);
        if m == RESET {
            close_all(&self.shared);
        }
    }
}

impl FaultProxy {
    /// Arms a one-shot cut of the first connection whose client-to-server traffic contains
    /// `pattern`: with `forward = false` the bytes before the pattern reach the server, the
    /// server's answers to them still come back for 300 ms, then the connection is closed (a
    /// server lost between two pipelined statements); with `forward = true` the pattern reaches
    /// the server but nothing the server sends afterwards comes back (a reply lost on the way).
    pub fn cut_on(&self, pattern: &[u8], forward: bool) {
        if let Ok(mut c) = self.shared.cut.lock() {
            *c = Some((pattern.to_vec(), forward));
        }
    }

    /// Connections accepted from now on wait `d` before the proxy connects them to the target
    /// (a connection already open is not affected): a cancel request, which travels on a new
    /// connection, reaches the server late. `Duration::ZERO` ends it.
    pub fn hold_new_connections(&self, d: Duration) {
        self.shared
            .hold_new_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// True while an armed cut has not happened yet.
    pub fn cut_pending(&self) -> bool {
        self.shared.cut.lock().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        close_all(&self.shared);
    }
}

fn close_all(sh: &Shared) {
    if let Ok(mut conns) = sh.conns.lock() {
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let mode = sh.mode.load(Ordering::SeqCst);
                if mode == RESET {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let sh2 = sh.clone();
                thread::spawn(move || connect_pair(client, target, sh2));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn connect_pair(client: TcpStream, target: SocketAddr, sh: Arc<Shared>) {
    // A blackholed node does not answer new connections either.
    while sh.mode.load(Ordering::SeqCst) == BLACKHOLE && !sh.stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
    let hold = sh.hold_new_us.load(Ordering::SeqCst);
    if hold > 0 {
        thread::sleep(Duration::from_micros(hold));
    }
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    if let Ok(mut conns) = sh.conns.lock() {
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                conns.push(c);
            }
        }
    }
    let sh2 = sh.clone();
    let mute = Arc::new(AtomicBool::new(false));
    let mute2 = mute.clone();
    thread::spawn(move || pump(c2, server, sh2, Dir::Up(mute2)));
    pump(s2, client, sh, Dir::Down(mute));
}

/// Which way a pump forwards: client to server (`Up`) or back (`Down`); the flag, once set by
/// a cut, silences the way back.
enum Dir {
    Up(Arc<AtomicBool>),
    Down(Arc<AtomicBool>),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: Arc<Shared>, dir: Dir) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        match sh.mode.load(Ordering::SeqCst) {
            BLACKHOLE => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            RESET => break,
            _ => {}
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sh.mode.load(Ordering::SeqCst) == DELAY {
                    thread::sleep(Duration::from_micros(sh.delay_us.load(Ordering::SeqCst)));
                }
                while sh.mode.load(Ordering::SeqCst) == BLACKHOLE && !sh.stop.load(Ordering::SeqCst)
                {
                    thread::sleep(Duration::from_millis(10));
                }
                match &dir {
                    Dir::Down(mute) if mute.load(Ordering::SeqCst) => continue,
                    Dir::Up(mute) => {
                        let hit = sh.cut.lock().ok().and_then(|mut c| {
                            let at = c.as_ref().and_then(|(p, _)| find(&buf[..n], p))?;
                            c.take().map(|(_, fwd)| (at, fwd))
                        });
                        if let Some((at, forward)) = hit {
                            if forward {
                                mute.store(true, Ordering::SeqCst);
                                let _ = to.write_all(&buf[..n]);
                            } else {
                                let _ = to.write_all(&buf[..at]);
                            }
                            thread::sleep(Duration::from_millis(300));
                            mute.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    _ => {}
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_then_blackholes_then_resets() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        thread::spawn(move || {
            for s in echo.incoming() {
                let Ok(mut s) = s else { continue };
                thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = FaultProxy::start(target).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", p.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");

        p.set(Fault::Blackhole);
        c.write_all(b"lost").unwrap();
        assert!(
            c.read_exact(&mut b).is_err(),
            "nothing comes back while blackholed"
        );

        p.set(Fault::Pass);
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"lost", "held bytes flow again after the blackhole");

        p.set(Fault::Reset);
        let r = c.read(&mut b);
        assert!(matches!(r, Ok(0) | Err(_)), "connection closed on reset");
    }
}
