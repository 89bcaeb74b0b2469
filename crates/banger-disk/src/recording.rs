//! [`RecordingHostDisk`]: a [`HostDisk`] that simulates loop and dm devices
//! in memory and records every call, so that the helper's disk logic (and
//! the daemon's use of it) is tested without root or device-mapper.
//! Failures can be injected per operation.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::host::{DmDevice, FileId, HostDisk, HostError, LoopDevice};

/// One call made to the fake, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    LoopAttach { path: PathBuf, read_only: bool },
    LoopDetach(String),
    Loops,
    DmCreate { name: String, table: String },
    DmRemove(String),
    DmDevices,
    DmChown(String, u32),
}

impl Call {
    /// Does this call change the host? (`Loops` and `DmDevices` only read.)
    pub fn mutates(&self) -> bool {
        !matches!(self, Call::Loops | Call::DmDevices)
    }
}

/// A simulated dm device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDm {
    pub table: String,
    pub slaves: Vec<String>,
    pub owner: Option<u32>,
}

#[derive(Debug, Default)]
struct State {
    /// `/dev/loopN` → (backing file, read-only).
    loops: BTreeMap<String, (PathBuf, bool)>,
    /// The identity of each loop's file when it was attached.
    loop_ids: BTreeMap<String, Option<FileId>>,
    dms: BTreeMap<String, FakeDm>,
    unavailable: Option<String>,
    calls: Vec<Call>,
    /// (operation name (`"dm_create"`, …), calls of it to let through
    /// first): that call fails.
    fail: Vec<(&'static str, usize)>,
}

/// An in-memory host with device-mapper, no loop or dm devices.
#[derive(Debug, Default)]
pub struct RecordingHostDisk {
    state: Mutex<State>,
}

impl RecordingHostDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulate a host without device-mapper (`why` says so).
    pub fn set_unavailable(&self, why: &str) {
        self.state.lock().unwrap().unavailable = Some(why.into());
    }

    /// Attach a loop device someone else made (not recorded as a call).
    pub fn add_loop(&self, device: &str, backing: &Path) {
        let mut s = self.state.lock().unwrap();
        s.loops.insert(device.into(), (backing.into(), true));
        let id = std::fs::metadata(backing).ok().map(|m| FileId::of(&m));
        s.loop_ids.insert(device.into(), id);
    }

    /// Add a dm device someone else made (not recorded as a call).
    pub fn add_dm(&self, name: &str, slaves: &[&str]) {
        self.state.lock().unwrap().dms.insert(
            name.into(),
            FakeDm {
                table: String::new(),
                slaves: slaves.iter().map(|s| s.to_string()).collect(),
                owner: None,
            },
        );
    }

    /// Make the next call of operation `op` (a [`HostDisk`] method name) fail.
    pub fn fail_next(&self, op: &'static str) {
        self.fail_nth(op, 0);
    }

    /// Let `skip` calls of operation `op` through, then make one fail.
    pub fn fail_nth(&self, op: &'static str, skip: usize) {
        self.state.lock().unwrap().fail.push((op, skip));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls that changed (or tried to change) the host.
    pub fn mutations(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::mutates).collect()
    }

    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }

    /// Attached loop devices: device → (backing file, read-only).
    pub fn loop_devices(&self) -> BTreeMap<String, (PathBuf, bool)> {
        self.state.lock().unwrap().loops.clone()
    }

    pub fn dm(&self, name: &str) -> Option<FakeDm> {
        self.state.lock().unwrap().dms.get(name).cloned()
    }

    pub fn dm_names(&self) -> Vec<String> {
        self.state.lock().unwrap().dms.keys().cloned().collect()
    }

    /// Record `call`; fail if `op` was armed with [`Self::fail_next`], else
    /// run `f` on the state.
    fn op<T>(
        &self,
        op: &'static str,
        call: Call,
        f: impl FnOnce(&mut State) -> Result<T, String>,
    ) -> Result<T, HostError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(call);
        if let Some(i) = s.fail.iter().position(|f| f.0 == op) {
            if s.fail[i].1 == 0 {
                s.fail.remove(i);
                return Err(HostError::new(op, "injected failure"));
            }
            s.fail[i].1 -= 1;
        }
        f(&mut s).map_err(|e| HostError::new(op, e))
    }
}

impl HostDisk for RecordingHostDisk {
    fn unavailable(&self) -> Option<String> {
        self.state.lock().unwrap().unavailable.clone()
    }

    async fn loop_attach(
        &self,
        file: &File,
        path: &Path,
        read_only: bool,
    ) -> Result<String, HostError> {
        let call = Call::LoopAttach {
            path: path.into(),
            read_only,
        };
        // As the kernel does: the open file is what the device is over.
        let id = file.metadata().ok().map(|m| FileId::of(&m));
        self.op("loop_attach", call, |s| {
            let n = (0..)
                .find(|n| !s.loops.contains_key(&format!("/dev/loop{n}")))
                .expect("a free loop number");
            let device = format!("/dev/loop{n}");
            s.loops.insert(device.clone(), (path.into(), read_only));
            s.loop_ids.insert(device.clone(), id);
            Ok(device)
        })
    }

    async fn loop_detach(&self, device: &str) -> Result<(), HostError> {
        self.op("loop_detach", Call::LoopDetach(device.into()), |s| {
            if s.dms.values().any(|d| d.slaves.iter().any(|l| l == device)) {
                return Err(format!("{device} is busy"));
            }
            s.loop_ids.remove(device);
            s.loops
                .remove(device)
                .map(drop)
                .ok_or_else(|| format!("{device} is not attached"))
        })
    }

    async fn loops(&self) -> Result<Vec<LoopDevice>, HostError> {
        self.op("loops", Call::Loops, |s| {
            Ok(s.loops
                .iter()
                .map(|(device, (backing, _))| LoopDevice {
                    device: device.clone(),
                    backing_file: backing.clone(),
                    backing_id: s.loop_ids.get(device).copied().flatten(),
                })
                .collect())
        })
    }

    async fn dm_create(&self, name: &str, table: &str) -> Result<(), HostError> {
        let call = Call::DmCreate {
            name: name.into(),
            table: table.into(),
        };
        self.op("dm_create", call, |s| {
            if s.dms.contains_key(name) {
                return Err(format!("{name} exists"));
            }
            // `<start> <len> snapshot <origin> <cow> P <chunk>`, like the kernel checks it.
            let f: Vec<&str> = table.split(' ').collect();
            let [_, _, "snapshot", origin, cow, "P", _] = f[..] else {
                return Err(format!("unexpected table {table:?}"));
            };
            for dev in [origin, cow] {
                if !s.loops.contains_key(dev) {
                    return Err(format!("{dev} does not exist"));
                }
            }
            if s.loops[cow].1 {
                return Err(format!("COW device {cow} is read-only"));
            }
            s.dms.insert(
                name.into(),
                FakeDm {
                    table: table.into(),
                    slaves: vec![origin.into(), cow.into()],
                    owner: None,
                },
            );
            Ok(())
        })
    }

    async fn dm_remove(&self, name: &str) -> Result<(), HostError> {
        self.op("dm_remove", Call::DmRemove(name.into()), |s| {
            s.dms
                .remove(name)
                .map(drop)
                .ok_or_else(|| format!("no dm device {name}"))
        })
    }

    async fn dm_devices(&self) -> Result<Vec<DmDevice>, HostError> {
        self.op("dm_devices", Call::DmDevices, |s| {
            Ok(s.dms
                .iter()
                .map(|(name, d)| DmDevice {
                    name: name.clone(),
                    slaves: d.slaves.clone(),
                })
                .collect())
        })
    }

    async fn dm_chown(&self, name: &str, uid: u32) -> Result<String, HostError> {
        self.op("dm_chown", Call::DmChown(name.into(), uid), |s| {
            let d = s
                .dms
                .get_mut(name)
                .ok_or_else(|| format!("no dm device {name}"))?;
            d.owner = Some(uid);
            Ok(format!("/dev/mapper/{name}"))
        })
    }
}
