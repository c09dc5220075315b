//! A child process that cannot outlive its owner.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use super::LaunchError;

pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
    program: String,
    args: Vec<String>,
    binary: &'static str,
    package: &'static str,
    /// The group was signalled already: its number must not be signalled again, since it
    /// could belong to someone else once every member is gone.
    group_killed: bool,
}

impl ManagedProcess {
    /// Starts `program args…` with its output appended to `log`. `binary`/`package` name what
    /// to install when the program is missing.
    pub fn spawn(
        name: impl Into<String>,
        program: &str,
        args: Vec<String>,
        log: &Path,
        binary: &'static str,
        package: &'static str,
    ) -> Result<Self, LaunchError> {
        let name = name.into();
        let child = start(&name, program, &args, log, binary, package)?;
        Ok(ManagedProcess {
            name,
            child,
            log: log.to_path_buf(),
            program: program.to_string(),
            args,
            binary,
            package,
            group_killed: false,
        })
    }

    /// Starts the same command again (after `kill` or `terminate`), logging to the same file.
    pub fn respawn(&mut self) -> Result<(), LaunchError> {
        self.kill();
        self.child = start(
            &self.name,
            &self.program,
            &self.args,
            &self.log,
            self.binary,
            self.package,
        )?;
        self.group_killed = false;
        Ok(())
    }

    /// The command line, for the state file that chaos scripts read.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// False once the process has exited (and been reaped).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(process = %self.name, "did not stop within {grace:?}; killing it");
        self.kill();
    }

    /// SIGKILL to the whole process group and reap: the crash the chaos tests simulate. The
    /// group matters for nginx, whose workers would otherwise outlive their master.
    pub fn kill(&mut self) {
        if !self.group_killed
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            self.group_killed = true;
        }
        let _ = self.child.wait();
    }

    /// SIGSTOP / SIGCONT: a process that hangs without dying.
    pub fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

fn start(
    name: &str,
    program: &str,
    args: &[String],
    log: &Path,
    binary: &'static str,
    package: &'static str,
) -> Result<Child, LaunchError> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LaunchError::io(format!("opening {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| LaunchError::io("duplicating a log handle", e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure runs between fork and exec and only calls setpgid(2) and prctl(2),
    // which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            // Its own process group, so `kill` reaches the children it forks (nginx workers).
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).map_err(io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
        });
    }
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            LaunchError::Missing { binary, package }
        } else {
            LaunchError::io(format!("starting {name}"), e)
        }
    })
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
