//! /proc accounting: CPU seconds of processes and of the whole machine, RSS, load, and the
//! local stack's processes by the pid files `deploy/local` manages them by.

use std::process::Command;
use std::time::{Duration, Instant};

pub(crate) fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The process's peak RSS (`VmHWM`) in KiB, then reset to its current RSS (`clear_refs`), so
/// that the next reading is the next phase's peak.
pub(crate) fn take_peak_rss_kib(pid: u32) -> u64 {
    let peak = proc_status_kib(pid, "VmHWM:");
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    peak
}

/// CPU seconds (user + system, all threads) the process has used.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name (which may hold spaces) start at state (field 3)
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / clk_tck()
}

pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The machine's busy CPU time so far, seconds summed over all cores (`/proc/stat`): how much of
/// the machine a phase used, every process included (broker, Canal, MariaDB, this bench).
pub(crate) fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    // user nice system idle iowait irq softirq steal
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / clk_tck()
}

/// Wait (at most 60 s) until the machine has been nearly idle for a second: what an earlier
/// phase left behind (MariaDB flushing a big transaction, Canal catching up) must not count
/// against the next measurement.
pub(crate) async fn settle() {
    let by = Instant::now() + Duration::from_secs(60);
    while Instant::now() < by {
        let b0 = machine_busy_seconds();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if machine_busy_seconds() - b0 < 0.3 {
            return;
        }
    }
    println!("note: the machine did not settle within 60 s (more than 0.3 cores busy)");
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A live process's pid from its pid file.
pub(crate) fn pid_from_file(path: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}/stat"))
        .exists()
        .then_some(pid)
}

/// The local Canal server's pid (`deploy/local`'s pid file), if it runs: its CPU is part of
/// what a fetch strategy costs.
pub(crate) fn canal_server_pid() -> Option<u32> {
    let state = std::env::var("CANAL_CONSUMER_STATE").unwrap_or("/var/tmp/canal-consumer".into());
    pid_from_file(&format!("{state}/canal/bin/canal.pid"))
}

/// The local services by the pid files `deploy/local` manages them by (`lib.sh`): the broker's
/// Erlang VM, the Canal server's JVM, MariaDB. Those that do not run (or run elsewhere) are left
/// out; their CPU then stays in "other".
pub(crate) fn stack_pids() -> Vec<(&'static str, u32)> {
    [
        ("broker", pid_from_file("/var/run/rabbitmq/pid")),
        ("Canal", canal_server_pid()),
        ("MariaDB", pid_from_file("/run/mysqld/mysqld.pid")),
    ]
    .into_iter()
    .filter_map(|(name, pid)| Some((name, pid?)))
    .collect()
}

/// Where the machine's time went over a phase: the machine's busy cores, and of them each
/// named process's (this bench, the service, the local services), the rest as "other".
pub(crate) struct Busy {
    pub(crate) t0: Instant,
    pub(crate) machine: f64,
    pub(crate) procs: Vec<(&'static str, u32, f64)>,
}

impl Busy {
    pub(crate) fn start(named: &[(&'static str, u32)]) -> Busy {
        Busy {
            t0: Instant::now(),
            machine: machine_busy_seconds(),
            procs: named
                .iter()
                .map(|&(n, pid)| (n, pid, cpu_seconds(pid)))
                .collect(),
        }
    }

    /// CPU seconds the process named `name` has used since `start`, if it was named.
    pub(crate) fn seconds(&self, name: &str) -> Option<f64> {
        self.procs
            .iter()
            .find(|p| p.0 == name)
            .map(|&(_, pid, c0)| cpu_seconds(pid) - c0)
    }

    /// Cores busy since `start`: the machine's, and each named process's, with "other" last.
    pub(crate) fn cores(&self) -> (f64, Vec<(&'static str, f64)>) {
        let secs = self.t0.elapsed().as_secs_f64();
        let machine = (machine_busy_seconds() - self.machine) / secs;
        let mut split: Vec<(&'static str, f64)> = self
            .procs
            .iter()
            .map(|&(n, pid, c0)| (n, (cpu_seconds(pid) - c0) / secs))
            .collect();
        let named: f64 = split.iter().map(|(_, c)| c).sum();
        split.push(("other", machine - named));
        (machine, split)
    }
}

/// CPU seconds of the service and of the local Canal server (if it runs here) since `busy`
/// started (it names them "service" and "Canal"), and as text: "service CPU 0.12s, Canal
/// server CPU 0.30s".
pub(crate) fn service_and_canal_cpu(busy: &Busy) -> ((f64, Option<f64>), String) {
    let d = (
        busy.seconds("service").unwrap_or(0.0),
        busy.seconds("Canal"),
    );
    let text = match d.1 {
        Some(c) => format!("service CPU {:.2}s, Canal server CPU {c:.2}s", d.0),
        None => format!("service CPU {:.2}s", d.0),
    };
    (d, text)
}

pub(crate) fn uptime_load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The HA Canal cluster of `deploy/local/up` parses the same binlog as the standalone server:
/// its CPU is in every figure while it runs.
pub(crate) fn ha_cluster_running() -> bool {
    ["127.0.0.1:11121", "127.0.0.1:11122"].iter().any(|a| {
        std::net::TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_millis(200))
            .is_ok()
    })
}

/// `BENCH_PERF=<file>`: the service's stacks sampled (`perf record`, cpu-clock) during one
/// phase, from [`Perf::start`] to [`Perf::stop`]. Without `BENCH_PERF`, nothing.
pub(crate) struct Perf(Option<std::process::Child>);

impl Perf {
    pub(crate) fn start(pid: u32) -> Perf {
        Perf(std::env::var("BENCH_PERF").ok().map(|out| {
            Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "499",
                    "--call-graph",
                    "dwarf,32768",
                    "-o",
                ])
                .arg(out)
                .args(["-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf (BENCH_PERF)")
        }))
    }

    /// Not sampling (no `BENCH_PERF`, or not this phase).
    pub(crate) fn none() -> Perf {
        Perf(None)
    }

    /// Stop sampling; perf writes its file on SIGINT.
    pub(crate) fn stop(self) {
        if let Some(mut perf) = self.0 {
            let _ = Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            let _ = perf.wait();
        }
    }
}
