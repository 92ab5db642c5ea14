//! Every process a test starts dies with the test, pass or fail.
//!
//! [`ChildGuard`] owns a spawned child: dropping it (at the end of the test, or while a panic
//! unwinds) kills the child and waits for it. While the child runs, the guard keeps a pid file
//! in [`pid_dir`] (`$CANAL_CONSUMER_STATE/test-pids`, default `/var/tmp/canal-consumer/test-pids`)
//! holding the pid and the command line; the guard removes it on drop. A test run that was
//! itself killed (SIGKILL, a CI timeout) cannot run destructors: its pid files stay, and
//! `deploy/local/test` names those processes before the next run starts.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the guards record the processes they own.
pub fn pid_dir() -> PathBuf {
    let state = std::env::var_os("CANAL_CONSUMER_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/canal-consumer"));
    state.join("test-pids")
}

/// A child process that is killed and reaped when the guard is dropped.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    pid_file: Option<PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd`; `what` names it in panics and in the pid file.
    pub fn spawn(what: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let pid = child.id();
        let dir = pid_dir();
        let pid_file = dir.join(format!("{pid}.pid"));
        // Best effort: the guard kills the child either way; the file only helps the next run
        // name a process this run could not kill.
        // line 1: pid; line 2: the program (deploy/local/leftovers checks /proc/PID/cmdline
        // starts with it before it names or kills the pid); line 3: what it is
        let line = format!(
            "{pid}\n{}\n{what}: {}\n",
            cmd.get_program().to_string_lossy(),
            cmd.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let pid_file = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(&pid_file, line))
            .ok()
            .map(|_| pid_file);
        ChildGuard {
            child: Some(child),
            what: what.to_string(),
            pid_file,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `Some(status)` once the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.forget_pid_file();
        }
        status
    }

    /// Sends `signal` (e.g. "TERM") by pid; the guard still kills on drop.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits for the exit until `timeout`; `None` if it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.forget_pid_file();
    }

    fn forget_pid_file(&mut self) {
        if let Some(f) = self.pid_file.take() {
            let _ = std::fs::remove_file(f);
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion with its output captured, killing it if it takes longer than
/// `timeout` (then panics naming `what`). Replaces `Command::output`, which waits forever.
pub fn output_within(what: &str, cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    let mut guard = ChildGuard::spawn(what, cmd);
    let status = guard.wait_timeout(timeout);
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    let stderr = std::fs::read(&err_path).unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "{what} still running after {timeout:?}; killed. stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}
