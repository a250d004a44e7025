//! `aegis-shmctl top` against a real daemon and a running live session (a paced
//! `aegis-replay` and an `aegis-tap`, separate processes): the live view driven through a
//! pseudo-terminal whose output a terminal emulator (vt100) turns back into a screen, and
//! `top --once --json`.
//!
//! The view must show the session, its source, its consumer and their counters, quit on `q`,
//! on Ctrl-C and on SIGTERM with exit status 0, and leave the terminal as it found it: the
//! main screen, a visible cursor, canonical mode and echo back on.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::num::NonZeroU16;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{tcgetattr, LocalFlags};
use nix::unistd::Pid;
use serde_json::Value;

/// The bundled real klines: 1440 one-minute bars of one day.
const KLINES: &str = "data/binance/BTCUSDT-1m-2024-09-21.csv";
/// Their source name (the file name without extension).
const SOURCE: &str = "BTCUSDT-1m-2024-09-21";
/// Pace of the replay: the day in 1440 / (86 400 / 1200) ≈ 72 s, about 20 events a second,
/// so the session is still running while the tests look at it.
const SPEED: &str = "1200";
/// The pseudo-terminal's size.
const ROWS: u16 = 40;
const COLS: u16 = 160;
/// How long anything here may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `aegis-shmctl --socket S ARGS` to completion under the guard; returns (exit ok,
/// stdout, stderr).
fn shmctl(h: &mut Harness, b: &Bins, socket: &Path, args: &[&str]) -> (bool, String, String) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        h.dir.join(format!("shmctl-{n}.out")),
        h.dir.join(format!("shmctl-{n}.err")),
    );
    let i = h.spawn(
        Command::new(&b.shmctl)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap()),
        "aegis-shmctl",
    );
    let st = h.wait(i, DEADLINE, &format!("aegis-shmctl {args:?}"), || {});
    (
        st.success(),
        fs::read_to_string(out).unwrap_or_default(),
        fs::read_to_string(err).unwrap_or_default(),
    )
}

/// A daemon with the live session `lv` running: `feed-top` replays the klines at [`SPEED`],
/// `tap-top` counts them. Returns the socket once events flow.
fn running_session(h: &mut Harness, b: &Bins) -> PathBuf {
    let socket = h.start_daemon(b);
    // Recorded, so that the view shows the recorder's position too.
    let rec = h.dir.join("recording");
    let (ok, out, err) = shmctl(
        h,
        b,
        &socket,
        &[
            "--json",
            "session",
            "create",
            "lv",
            "--mode",
            "live",
            "--expect",
            "2",
            "--record",
            rec.to_str().unwrap(),
        ],
    );
    assert!(ok, "session create failed: {out}{err}");
    let created: Value = serde_json::from_str(&out).expect("session create --json");
    let token = created["token"].as_str().expect("a token").to_string();
    let klines = Path::new(env!("CARGO_MANIFEST_DIR")).join(KLINES);
    let component = |h: &mut Harness, program: &Path, args: &[&str], name: &str| {
        let log = fs::File::create(h.dir.join(format!("{name}.log"))).unwrap();
        h.spawn(
            Command::new(program)
                .args(args)
                .env("AEGIS_SOCKET", &socket)
                .env("AEGIS_SESSION_TOKEN", &token)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
            name,
        );
    };
    let klines = klines.to_str().unwrap();
    component(
        h,
        &b.replay,
        &["--name", "feed-top", "--speed", SPEED, klines],
        "feed-top",
    );
    component(
        h,
        &b.tap,
        &[
            "--name",
            "tap-top",
            "--format",
            "count",
            "--out",
            "/dev/null",
        ],
        "tap-top",
    );
    // Until the session runs and the tap has read something.
    let end = Instant::now() + DEADLINE;
    loop {
        let (_, out, _) = shmctl(h, b, &socket, &["--json", "session", "inspect", "lv"]);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if let Some(sid) = v["segments"]["bus"]
            .as_str()
            .and_then(|p| Path::new(p).file_name()?.to_str().map(str::to_string))
            .as_deref()
            .and_then(sid_of)
        {
            h.sids.insert(sid.to_string());
        }
        let read = v["consumers"][0]["read"].as_u64().unwrap_or(0);
        if v["state"] == "running" && read > 0 {
            return socket;
        }
        assert!(
            Instant::now() < end,
            "the session did not run within {DEADLINE:?}: {out}\ndaemon log:\n{}\nfeed:\n{}\ntap:\n{}",
            tail(&h.dir.join("daemon.log"), 2000),
            tail(&h.dir.join("feed-top.log"), 2000),
            tail(&h.dir.join("tap-top.log"), 2000)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `top` running in a pseudo-terminal, its output fed to a terminal emulator.
struct Pty {
    /// The guard's index of the `top` process.
    child: usize,
    master: fs::File,
    /// Our copy of the terminal side, to read its modes after `top` exits.
    slave: Option<OwnedFd>,
    screen: Arc<Mutex<vt100::Parser>>,
    /// Says when the reader has seen the end of the output.
    done: mpsc::Receiver<()>,
}

impl Pty {
    /// Starts `aegis-shmctl --socket S ARGS` on a new pseudo-terminal.
    fn start(h: &mut Harness, b: &Bins, socket: &Path, args: &[&str]) -> Pty {
        let size = Winsize {
            ws_row: ROWS,
            ws_col: COLS,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None).expect("openpty");
        let mut cmd = Command::new(&b.shmctl);
        cmd.arg("--socket")
            .arg(socket)
            .args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
            .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
            .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
        let child = h.spawn(&mut cmd, "aegis-shmctl top");
        drop(cmd); // closes the parent's copies of the terminal side given to the child
        let master = fs::File::from(pty.master);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(
            NonZeroU16::new(ROWS).unwrap(),
            NonZeroU16::new(COLS).unwrap(),
            0,
        )));
        let (tx, done) = mpsc::channel();
        let mut reader = master.try_clone().unwrap();
        let parser = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once no process holds the terminal side any more.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                parser.lock().unwrap().process(&buf[..n]);
            }
            let _ = tx.send(());
        });
        Pty {
            child,
            master,
            slave: Some(pty.slave),
            screen,
            done,
        }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until `ok(screen)` holds; panics with the screen after [`DEADLINE`].
    fn wait_for(&self, h: &mut Harness, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let s = self.contents();
            if ok(&s) {
                return s;
            }
            if let Some(st) = h.groups[self.child].try_wait().unwrap() {
                panic!("top exited ({st}) before the screen showed {what}:\n{s}");
            }
            assert!(
                Instant::now() < end,
                "the screen did not show {what} within {DEADLINE:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `keys`.
    fn send(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Waits for `top` to exit 0, then checks that it gave the terminal back: main screen,
    /// cursor shown, canonical mode and echo on.
    fn assert_exits_and_restores(mut self, h: &mut Harness, how: &str) {
        let st = h.wait(self.child, DEADLINE, &format!("top after {how}"), || {});
        let modes = tcgetattr(self.slave.as_ref().unwrap().as_fd()).expect("tcgetattr");
        // Now the reader sees the end of the output.
        drop(self.slave.take());
        self.done
            .recv_timeout(DEADLINE)
            .expect("the end of top's output");
        let screen = self.screen.lock().unwrap();
        let screen = screen.screen();
        assert!(
            st.success(),
            "top exited with {st} after {how}:\n{}",
            screen.contents()
        );
        assert!(
            !screen.alternate_screen(),
            "top left the alternate screen on after {how}"
        );
        assert!(
            !screen.hide_cursor(),
            "top left the cursor hidden after {how}"
        );
        assert!(
            modes
                .local_flags
                .contains(LocalFlags::ICANON | LocalFlags::ECHO),
            "top left the terminal in raw mode after {how}: {:?}",
            modes.local_flags
        );
    }
}

/// The whitespace-separated fields of the screen line that holds `name` as a word, without
/// the box-drawing borders.
fn fields(screen: &str, name: &str) -> Option<Vec<String>> {
    screen.lines().find_map(|l| {
        let f: Vec<String> = l
            .split(|c: char| c.is_whitespace() || c == '│')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        f.iter().any(|x| x == name).then_some(f)
    })
}

/// The number in column `i` of the line of `name`, if it is one.
fn number(screen: &str, name: &str, i: usize) -> Option<u64> {
    fields(screen, name)?.get(i)?.parse().ok()
}

#[test]
fn top_shows_a_running_session_and_restores_the_terminal() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("top");
    let socket = running_session(&mut h, &b);

    // q: after the screen shows the session, its source and consumer with counts and rates.
    let mut pty = Pty::start(&mut h, &b, &socket, &["top", "lv", "--interval", "200"]);
    let screen = pty.wait_for(&mut h, "the session with rates", |s| {
        // SOURCE STATE EVENTS EVENTS/S ...; CONSUMER SLOT STATE READ EVENTS/S ...
        let source_rate = fields(s, SOURCE).and_then(|f| f.get(3).cloned());
        s.contains("session lv · live · running")
            && number(s, SOURCE, 2).is_some_and(|n| n > 0)
            && number(s, "tap-top", 3).is_some_and(|n| n > 0)
            && source_rate.is_some_and(|r| r != "-")
    });
    eprintln!("top screen:\n{screen}");
    let source = fields(&screen, SOURCE).unwrap();
    assert_eq!(source[1], "active", "{screen}");
    // The watermark is an event time of the bundled day.
    assert_eq!(source[4], "2024-09-21", "{screen}");
    assert_eq!(source[6], "0", "no event rejected: {screen}");
    assert_eq!(source[7], "feed-top", "{screen}");
    assert!(
        screen.contains("recorder   recording · "),
        "the recorder's position: {screen}"
    );
    // CONSUMER SLOT STATE READ EVENTS/S LAG (a number and a unit) OVERRUNS MISSED STALLED
    let tap = fields(&screen, "tap-top").unwrap();
    assert_eq!(tap[2], "ready", "{screen}");
    assert_eq!(tap[7], "0", "no overrun: {screen}");
    assert_eq!(tap[9], "no", "the tap is not stalled: {screen}");
    assert!(fields(&screen, "feed-top").is_some(), "{screen}");
    for header in [
        "sessions",
        "sequencer",
        "sources",
        "consumers",
        "components",
    ] {
        assert!(
            screen.contains(header),
            "no {header} on the screen:\n{screen}"
        );
    }
    let shown = number(&screen, SOURCE, 2).unwrap();
    pty.send(b"q");
    pty.assert_exits_and_restores(&mut h, "q");

    // The events keep flowing: a later --once --json sees at least as many.
    let (ok, out, err) = shmctl(
        &mut h,
        &b,
        &socket,
        &["--json", "top", "lv", "--once", "--interval", "300"],
    );
    assert!(ok, "top --once --json failed: {out}{err}");
    let v: Value = serde_json::from_str(&out).expect("top --once --json prints JSON");
    assert!(v["interval_s"].as_f64().is_some_and(|s| s > 0.2), "{v}");
    assert!(v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "lv" && s["mode"] == "live"));
    let d = &v["details"][0];
    assert_eq!(d["name"], "lv", "{v}");
    let src = &d["sources"][0];
    assert_eq!(src["name"], SOURCE, "{v}");
    assert!(src["events"].as_u64().unwrap() >= shown, "{v}");
    assert!(src["events_per_s"].is_f64(), "{v}");
    assert_eq!(src["rejected"], 0, "{v}");
    let tap = &d["consumers"][0];
    assert_eq!(tap["name"], "tap-top", "{v}");
    assert_eq!(tap["stalled"], false, "{v}");
    assert!(tap["read"].as_u64().unwrap() > 0, "{v}");
    assert!(d["sequencer"]["merged_per_s"].is_f64(), "{v}");
    assert_eq!(d["recording"]["state"], "recording", "{v}");
    assert!(d["recording"]["frames"].as_u64().unwrap() > 0, "{v}");
    assert!(d["recording"]["frames_per_s"].is_f64(), "{v}");

    // Ctrl-C (a key in raw mode) and SIGTERM quit as cleanly.
    let mut pty = Pty::start(&mut h, &b, &socket, &["top", "--interval", "200"]);
    pty.wait_for(&mut h, "the session", |s| s.contains("session lv"));
    pty.send(&[0x03]);
    pty.assert_exits_and_restores(&mut h, "Ctrl-C");

    let pty = Pty::start(&mut h, &b, &socket, &["top", "--interval", "200"]);
    pty.wait_for(&mut h, "the session", |s| s.contains("session lv"));
    kill(Pid::from_raw(h.pid(pty.child) as i32), Signal::SIGTERM).unwrap();
    pty.assert_exits_and_restores(&mut h, "SIGTERM");
}

#[test]
fn top_without_a_terminal_points_to_once() {
    let _g = serial();
    let b = bins();
    let mut h = Harness::new("top-noterm");
    let socket = h.start_daemon(&b);
    let (ok, _, err) = shmctl(&mut h, &b, &socket, &["top"]);
    assert!(!ok);
    assert!(err.contains("top --once"), "{err}");
    // --once needs none, and an idle daemon is an empty list.
    let (ok, out, err) = shmctl(
        &mut h,
        &b,
        &socket,
        &["--json", "top", "--once", "--interval", "100"],
    );
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sessions"], serde_json::json!([]), "{v}");
    // A session that does not exist is an error.
    let (ok, _, err) = shmctl(&mut h, &b, &socket, &["top", "nope", "--once"]);
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
}
