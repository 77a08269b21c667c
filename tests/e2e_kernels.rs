//! End-to-end tests on other kernels: boot Debian's cloud kernels under QEMU (TCG, no KVM
//! needed) with an initramfs whose init either runs `uringproxy demo` with and without
//! offload (bookworm's 6.1 and 6.12) or starts the proxy where it must refuse the kernel
//! in one line (Debian 11's 5.10), and check the markers it prints on the serial console.
//!
//! tests/e2e_kernels/prepare.sh fetches the kernel and busybox packages (cached in
//! target/kernels/) and builds the initramfs; tests/e2e_kernels/init is its PID 1, told
//! which run to do by its argument on the kernel command line.

mod common;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Package downloads (about 35 MB, plus `apt-get update` when the lists are stale or, for
/// 5.10, 8 MB of bullseye's lists the first time).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// Boot plus both demo runs: 16-32 s measured on the 2-core CI machine, 6 s on a later
/// one; the refusal run 2 s there, 32 s if the proxy starts after all (init stops it).
const VM_TIMEOUT: Duration = Duration::from_secs(180);
/// The demo runs the init script reports on.
const DEMOS: [&str; 2] = ["offload", "no-offload"];

/// One VM at a time: two TCG guests would share the 2 cores and both run at half speed,
/// and both preparations would unpack the same busybox package.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn demo_passes_on_linux_6_1() {
    check_demo("6.1");
}

#[test]
fn demo_passes_on_linux_6_12() {
    check_demo("6.12");
}

#[test]
fn linux_5_10_is_refused_in_one_line() {
    check_refusal("5.10");
}

/// What the VM's init does, named by its argument on the kernel command line.
#[derive(Clone, Copy)]
enum Run {
    /// `uringproxy demo` with and without offload.
    Demo,
    /// The proxy started on a kernel below its floor.
    Refusal,
}

impl Run {
    fn init_arg(self) -> &'static str {
        match self {
            Run::Demo => "demo",
            Run::Refusal => "refusal",
        }
    }
}

/// A child in its own process group, killed with the whole group (apt-get under the
/// prepare script, say) when it is dropped, so a panic or timeout leaves nothing running.
struct Guard(Child);

impl Guard {
    fn spawn(command: &mut Command) -> Guard {
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()));
        Guard(child)
    }

    /// Waits up to `timeout`; None if the child was still running then.
    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().expect("wait for child") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// A log file and both its stdout and stderr handles.
fn log_to(path: &Path) -> (Stdio, Stdio) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let copy = file.try_clone().expect("clone log file handle");
    (file.into(), copy.into())
}

/// The log's last lines, for a panic message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `command` with its output in `log`; panics with the log's tail if it fails or
/// outlives `timeout`.
fn run_logged(what: &str, command: &mut Command, log: &Path, timeout: Duration) {
    let (stdout, stderr) = log_to(log);
    let mut child = Guard::spawn(command.stdout(stdout).stderr(stderr));
    let outcome = match child.wait(timeout) {
        Some(status) if status.success() => return,
        Some(status) => format!("failed ({status})"),
        None => format!("was killed after {} s", timeout.as_secs()),
    };
    panic!("{what} {outcome}; log {}:\n{}", log.display(), tail(log));
}

/// The rest of each line of the serial log that holds `marker`, in order; the marker may
/// be anywhere in the line, as the firmware's terminal escapes come before the first one.
fn all_after<'a>(serial: &'a str, marker: &str) -> impl Iterator<Item = &'a str> {
    serial.lines().filter_map(move |line| {
        let start = line.find(marker)? + marker.len();
        Some(line[start..].trim_end())
    })
}

/// The rest of the first line of the serial log that holds `marker`.
fn after<'a>(serial: &'a str, marker: &str) -> Option<&'a str> {
    all_after(serial, marker).next()
}

/// The value of `key=value` on the first line that holds `marker`.
fn field<'a>(serial: &'a str, marker: &str, key: &str) -> Option<&'a str> {
    after(serial, marker)?
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

/// A VM that has run to its end (powered off): its serial console and its timings.
struct Booted {
    series: &'static str,
    serial: String,
    serial_log: PathBuf,
    started: Instant,
    /// The first part of the summary line: kernel and timings.
    summary: String,
}

impl Booted {
    fn fail(&self, why: impl std::fmt::Display) -> ! {
        panic!(
            "Linux {}: {why}; serial log {}:\n{}",
            self.series,
            self.serial_log.display(),
            tail(&self.serial_log)
        )
    }

    fn after(&self, marker: &str) -> Option<&str> {
        after(&self.serial, marker)
    }

    fn field(&self, marker: &str, key: &str) -> Option<&str> {
        field(&self.serial, marker, key)
    }

    /// The release the guest reported (`uname -r`).
    fn kernel(&self) -> &str {
        self.after("UPX-KERNEL ")
            .unwrap_or_else(|| self.fail("the VM never reported its kernel"))
    }

    /// Prints the summary line with the run's own `details`, then checks that the kernel
    /// booted was of the series asked for.
    fn report(&self, details: &str) {
        let summary = format!(
            "{}{details}, total {:.1} s",
            self.summary,
            self.started.elapsed().as_secs_f64()
        );
        // Straight to stderr, past the harness's capture: the timings belong in the CI log.
        let _ = writeln!(io::stderr(), "{summary}");
        let kernel = self.kernel();
        if !kernel.starts_with(&format!("{}.", self.series)) {
            self.fail(format!("booted {kernel}, not Linux {}", self.series));
        }
    }
}

/// Prepares the kernel and initramfs of `series` and boots them with init doing `run`;
/// None (test skipped) without root.
fn boot(series: &'static str, run: Run) -> Option<Booted> {
    if !common::privileged_or_skip(&format!("e2e_kernels on Linux {series}")) {
        return None;
    }
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("kernels");
    fs::create_dir_all(&cache).expect("create the kernel cache dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e_kernels/prepare.sh");
    run_logged(
        "preparing the kernel and initramfs",
        Command::new("bash")
            .arg(&script)
            .arg(series)
            .arg(&cache)
            .arg(common::PROXY_BIN),
        &cache.join(format!("{series}-prepare.log")),
        PREPARE_TIMEOUT,
    );
    let prepared = started.elapsed();

    let dir = cache.join(series);
    let serial_log = cache.join(format!("{series}-serial.log"));
    let (stdout, stderr) = log_to(&serial_log);
    let booted = Instant::now();
    let mut qemu = Guard::spawn(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2"])
            // Serial console on stdout (the log file); no network device in the guest.
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(dir.join("initrd.cpio"))
            // The kernel hands what follows `--` to init as its arguments.
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet -- {}",
                run.init_arg()
            ))
            .stdout(stdout)
            .stderr(stderr),
    );
    let status = qemu.wait(VM_TIMEOUT);
    // Killed here if it outlived the timeout, before its log is read.
    drop(qemu);
    let vm_seconds = booted.elapsed().as_secs_f64();
    let mut vm = Booted {
        series,
        serial: fs::read_to_string(&serial_log).unwrap_or_default(),
        serial_log,
        started,
        summary: String::new(),
    };
    match status {
        None => vm.fail(format!(
            "the VM was killed after {} s",
            VM_TIMEOUT.as_secs()
        )),
        Some(status) if !status.success() => vm.fail(format!("qemu failed ({status})")),
        Some(_) => {}
    }
    if let Some(error) = vm.after("UPX-ERROR ") {
        vm.fail(format!("init: {error}"));
    }
    vm.summary = format!(
        "e2e_kernels: Linux {}: prepare {:.1} s, VM {vm_seconds:.1} s (guest booted in {} s)",
        vm.kernel(),
        prepared.as_secs_f64(),
        vm.field("UPX-BOOT", "seconds").unwrap_or("?"),
    );
    Some(vm)
}

fn check_demo(series: &'static str) {
    let Some(vm) = boot(series, Run::Demo) else {
        return;
    };
    let mut details = String::new();
    let mut failed = Vec::new();
    let mut workers = Vec::new();
    for run in DEMOS {
        let marker = format!("UPX-RESULT {run} ");
        let Some(rc) = vm.field(&marker, "rc") else {
            vm.fail(format!("no result for the {run} demo run"));
        };
        let threads = format!("UPX-THREADS {run} ");
        details += &format!(
            ", {run} rc={rc} in {} s with {} proxy threads ({})",
            vm.field(&marker, "seconds").unwrap_or("?"),
            vm.field(&threads, "max").unwrap_or("?"),
            vm.field(&threads, "names").unwrap_or("?"),
        );
        if rc != "0" {
            failed.push(run);
        }
        // One thread owns all I/O: io-wq workers (iou-wrk) would mean TUN or socket
        // operations that cannot complete inline, as happened on 6.1 before the TUN
        // was opened O_NONBLOCK (48-95 workers).
        if vm.field(&threads, "max").is_some_and(|n| n != "1") {
            workers.push(run);
        }
    }
    vm.report(&details);
    if !failed.is_empty() {
        vm.fail(format!("demo run(s) {} failed", failed.join(", ")));
    }
    if !workers.is_empty() {
        vm.fail(format!(
            "the proxy ran io_uring worker threads in run(s) {}",
            workers.join(", ")
        ));
    }
}

/// The proxy on a kernel below its floor (6.1): exit status 1 and one line on stderr
/// naming the kernel and the floor, printed before the TUN or the --route rule exists.
fn check_refusal(series: &'static str) {
    let Some(vm) = boot(series, Run::Refusal) else {
        return;
    };
    let marker = "UPX-REFUSAL ";
    let field = |key| {
        vm.field(marker, key)
            .unwrap_or_else(|| vm.fail(format!("no {key}= in the refusal report")))
    };
    let (rc, tun, rule) = (field("rc"), field("tun"), field("rule"));
    let lines: Vec<&str> = all_after(&vm.serial, "UPX-STDERR ").collect();
    vm.report(&format!(
        ", refusal rc={rc}, {} stderr line(s), TUN left: {tun}, rule left: {rule}",
        lines.len()
    ));
    // The init counts the lines it echoed: a mismatch means the console lost some.
    if field("stderr_lines") != lines.len().to_string() {
        vm.fail(format!(
            "init read {} stderr lines, the console shows {}",
            field("stderr_lines"),
            lines.len()
        ));
    }
    let kernel = vm.kernel();
    let refusal_ok = matches!(
        lines[..],
        [line] if line.starts_with("uringproxy: error:")
            && line.contains(kernel)
            && line.contains("6.1 or newer")
    );
    if !refusal_ok {
        vm.fail(format!(
            "expected one stderr line, `uringproxy: error:` naming {kernel} and \
             `6.1 or newer`; got {lines:?}"
        ));
    }
    if rc != "1" {
        vm.fail(format!("the proxy exited with status {rc}, not 1"));
    }
    if tun != "no" || rule != "no" {
        vm.fail(format!(
            "the refusal left things behind: TUN upxold0 {tun}, rule for 10.9.9.0/24 {rule}"
        ));
    }
}
