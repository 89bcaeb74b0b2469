//! The one place that waits for child processes.
//!
//! As PID 1 the agent inherits every orphan of the guest and must reap
//! them, which means waiting for *any* child. That would steal the exit
//! status of processes the agent started itself, so every child is spawned
//! through [`Reaper::spawn`] and gets its status from the reaper thread.
//!
//! The reaper blocks in `waitid(P_ALL, WEXITED | WNOWAIT)` (which does not
//! reap), then takes the lock and reaps every zombie with `WNOHANG`. Spawns
//! happen under the same lock, so the standard library's own `waitpid` on a
//! child whose `exec` failed (inside `Command::spawn`) never races with it,
//! and a child cannot exit before its waiter is registered.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, PoisonError};
use std::time::Duration;

use banger_agent_proto::ExitStatus;
use rustix::io::Errno;
use rustix::process::{WaitId, WaitIdOptions, WaitOptions, WaitStatus};

#[derive(Debug, Default)]
struct State {
    waiters: HashMap<i32, Sender<ExitStatus>>,
    /// Bumped on every spawn, so the reaper does not sleep through one.
    spawns: u64,
}

/// Spawns children and delivers their exit statuses.
#[derive(Debug)]
pub struct Reaper {
    state: Mutex<State>,
    cv: Condvar,
    started: Once,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_exit_status(status: WaitStatus) -> ExitStatus {
    match (status.exit_status(), status.terminating_signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        // WEXITED only reports exits and deaths by signal.
        (None, None) => ExitStatus::Code(-1),
    }
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            started: Once::new(),
        })
    }

    /// Starts the reaper thread (`spawn` does it too). PID 1 calls this
    /// early: orphans need reaping even if the agent never spawns anything.
    pub fn start(self: &Arc<Self>) {
        self.started.call_once(|| {
            let me = self.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .stack_size(128 * 1024)
                .spawn(move || me.reap_forever())
                .expect("cannot start the reaper thread");
        });
    }

    /// Spawns `cmd`; the receiver yields its exit status exactly once.
    pub fn spawn(self: &Arc<Self>, cmd: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        self.start();
        let mut st = lock(&self.state);
        let child = cmd.spawn()?;
        let (tx, rx) = mpsc::channel();
        // Linux pids fit in i32.
        st.waiters.insert(child.id() as i32, tx);
        st.spawns += 1;
        self.cv.notify_all();
        Ok((child, rx))
    }

    /// Runs `cmd` to completion.
    pub fn run(self: &Arc<Self>, cmd: &mut Command) -> io::Result<ExitStatus> {
        let (_child, rx) = self.spawn(cmd)?;
        rx.recv()
            .map_err(|_| io::Error::other("reaper lost the child"))
    }

    fn reap_forever(&self) {
        loop {
            let seen_spawns = lock(&self.state).spawns;
            match rustix::process::waitid(
                WaitId::All,
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {
                Ok(_) => self.reap_zombies(),
                Err(Errno::CHILD) => {
                    let st = lock(&self.state);
                    if st.spawns == seen_spawns {
                        // Nothing to wait for until the next spawn (or, as
                        // PID 1, an orphan: hence the timeout).
                        let _ = self.cv.wait_timeout(st, Duration::from_secs(1));
                    }
                }
                Err(Errno::INTR) => {}
                Err(e) => {
                    log!("waitid failed: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn reap_zombies(&self) {
        let mut st = lock(&self.state);
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if let Some(tx) = st.waiters.remove(&pid.as_raw_nonzero().get()) {
                        let _ = tx.send(to_exit_status(status));
                    }
                }
                Ok(None) | Err(Errno::CHILD) => return,
                Err(Errno::INTR) => {}
                Err(e) => {
                    log!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }
}
