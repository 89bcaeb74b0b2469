//! [`RecordingHostNet`]: a [`HostNet`] that simulates the host in memory
//! and records every call, so that the helper's logic is tested without
//! root. Failures can be injected per operation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ipnet::Ipv4Net;
use serde_json::Value;

use crate::host::{HostError, HostNet, Link, LinkKind, NftSet, NftTable};

/// One call made to the fake, with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Links,
    LinkAddBridge(String),
    LinkSetAlias(String, String),
    AddrAdd(String, Ipv4Net),
    LinkSetUp(String),
    TapCreate(String, u32),
    LinkSetMaster(String, String),
    LinkDel(String),
    NftApply(Value),
    NftTables,
    NftSets,
    NftChainPolicy(String, String, String),
    NftList(String, String, String, String),
    NftDeleteTable(String, String),
    IpForward,
    SetIpForward(bool),
    NeighReplace(String, std::net::Ipv4Addr, [u8; 6]),
}

impl Call {
    /// Does this call change the host? (`Links`, `NftTables`, `NftSets`,
    /// `NftChainPolicy`, `NftList` and `IpForward` only read.)
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Call::Links
                | Call::NftTables
                | Call::NftSets
                | Call::NftChainPolicy(..)
                | Call::NftList(..)
                | Call::IpForward
        )
    }
}

#[derive(Debug, Default)]
struct State {
    links: BTreeMap<String, Link>,
    next_index: u32,
    /// Table (family, name) → the batch that created it.
    tables: BTreeMap<(String, String), Value>,
    /// Sets (family, table, name) → made `dynamic` (sized, like the
    /// packet-path sets nft makes dynamic for the rule that adds to them).
    sets: BTreeMap<(String, String, String), bool>,
    ip_forward: bool,
    calls: Vec<Call>,
    /// Operation names (`"link_set_master"`, …) whose next call fails.
    fail: Vec<&'static str>,
}

/// An in-memory host. Starts with `lo` only, `ip_forward` off, no tables.
#[derive(Debug)]
pub struct RecordingHostNet {
    state: Mutex<State>,
}

impl Default for RecordingHostNet {
    fn default() -> Self {
        let fake = RecordingHostNet {
            state: Mutex::new(State {
                next_index: 1,
                ..State::default()
            }),
        };
        fake.add_link("lo", LinkKind::Other(None));
        fake.set_up("lo");
        fake
    }
}

impl RecordingHostNet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a link to the simulated host (not recorded as a call).
    pub fn add_link(&self, name: &str, kind: LinkKind) {
        let mut s = self.state.lock().unwrap();
        let index = s.next_index;
        s.next_index += 1;
        s.links.insert(
            name.to_owned(),
            Link {
                index,
                name: name.to_owned(),
                kind,
                master: None,
                up: false,
                addrs: Vec::new(),
                alias: None,
            },
        );
    }

    /// Edit a simulated link (not recorded as a call).
    pub fn edit_link(&self, name: &str, f: impl FnOnce(&mut Link)) {
        f(self
            .state
            .lock()
            .unwrap()
            .links
            .get_mut(name)
            .expect("no such link"));
    }

    fn set_up(&self, name: &str) {
        self.edit_link(name, |l| l.up = true);
    }

    /// Add an nftables table someone else owns (not recorded as a call).
    pub fn add_foreign_table(&self, family: &str, name: &str) {
        self.state
            .lock()
            .unwrap()
            .tables
            .insert((family.into(), name.into()), Value::Null);
    }

    /// Make the next call of operation `op` (a [`HostNet`] method name) fail.
    pub fn fail_next(&self, op: &'static str) {
        self.state.lock().unwrap().fail.push(op);
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

    pub fn link(&self, name: &str) -> Option<Link> {
        self.state.lock().unwrap().links.get(name).cloned()
    }

    pub fn tables(&self) -> Vec<NftTable> {
        self.state
            .lock()
            .unwrap()
            .tables
            .keys()
            .map(|(family, name)| NftTable {
                family: family.clone(),
                name: name.clone(),
            })
            .collect()
    }

    /// The batch that created table `inet <name>`, if it exists.
    pub fn table_batch(&self, name: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .tables
            .get(&("inet".to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn ip_forward_on(&self) -> bool {
        self.state.lock().unwrap().ip_forward
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
        if let Some(i) = s.fail.iter().position(|f| *f == op) {
            s.fail.remove(i);
            return Err(HostError::new(op, "injected failure"));
        }
        f(&mut s).map_err(|e| HostError::new(op, e))
    }
}

fn exists(s: &State, name: &str) -> Result<(), String> {
    if s.links.contains_key(name) {
        Ok(())
    } else {
        Err(format!("no link {name}"))
    }
}

fn create(s: &mut State, name: &str, kind: LinkKind) -> Result<(), String> {
    if s.links.contains_key(name) {
        return Err(format!("{name} exists"));
    }
    let index = s.next_index;
    s.next_index += 1;
    s.links.insert(
        name.to_owned(),
        Link {
            index,
            name: name.to_owned(),
            kind,
            master: None,
            up: false,
            addrs: Vec::new(),
            alias: None,
        },
    );
    Ok(())
}

impl HostNet for RecordingHostNet {
    async fn links(&self) -> Result<Vec<Link>, HostError> {
        self.op("links", Call::Links, |s| {
            Ok(s.links.values().cloned().collect())
        })
    }

    async fn link_add_bridge(&self, name: &str) -> Result<(), HostError> {
        self.op("link_add_bridge", Call::LinkAddBridge(name.into()), |s| {
            create(s, name, LinkKind::Bridge)
        })
    }

    async fn link_set_alias(&self, name: &str, alias: &str) -> Result<(), HostError> {
        self.op(
            "link_set_alias",
            Call::LinkSetAlias(name.into(), alias.into()),
            |s| {
                exists(s, name)?;
                s.links.get_mut(name).expect("checked").alias = Some(alias.into());
                Ok(())
            },
        )
    }

    async fn addr_add(&self, link: &str, addr: Ipv4Net) -> Result<(), HostError> {
        self.op("addr_add", Call::AddrAdd(link.into(), addr), |s| {
            exists(s, link)?;
            let l = s.links.get_mut(link).expect("checked");
            if l.addrs.contains(&addr) {
                return Err("address exists".into());
            }
            l.addrs.push(addr);
            Ok(())
        })
    }

    async fn link_set_up(&self, name: &str) -> Result<(), HostError> {
        self.op("link_set_up", Call::LinkSetUp(name.into()), |s| {
            exists(s, name)?;
            s.links.get_mut(name).expect("checked").up = true;
            Ok(())
        })
    }

    async fn tap_create(&self, name: &str, owner_uid: u32) -> Result<(), HostError> {
        self.op("tap_create", Call::TapCreate(name.into(), owner_uid), |s| {
            create(
                s,
                name,
                LinkKind::Tap {
                    owner: Some(owner_uid),
                },
            )
        })
    }

    async fn link_set_master(&self, name: &str, master: &str) -> Result<(), HostError> {
        self.op(
            "link_set_master",
            Call::LinkSetMaster(name.into(), master.into()),
            |s| {
                exists(s, name)?;
                exists(s, master)?;
                s.links.get_mut(name).expect("checked").master = Some(master.into());
                Ok(())
            },
        )
    }

    async fn link_del(&self, name: &str) -> Result<(), HostError> {
        self.op("link_del", Call::LinkDel(name.into()), |s| {
            exists(s, name)?;
            s.links.remove(name);
            // Like the kernel: ports of a deleted bridge are detached.
            for l in s.links.values_mut() {
                if l.master.as_deref() == Some(name) {
                    l.master = None;
                }
            }
            Ok(())
        })
    }

    async fn nft_apply(&self, batch: &Value) -> Result<(), HostError> {
        self.op("nft_apply", Call::NftApply(batch.clone()), |s| {
            // Understands the table- and set-level commands banger sends;
            // chains and rules live in the stored batch. All or nothing,
            // like nft.
            let mut tables = s.tables.clone();
            let mut sets = s.sets.clone();
            let mut added = Vec::new();
            for cmd in batch["nftables"].as_array().ok_or("not a batch")? {
                let (verb, obj) = cmd
                    .as_object()
                    .and_then(|o| o.iter().next())
                    .ok_or("empty command")?;
                if let Some(set) = obj.get("set") {
                    let text = |k: &str| set[k].as_str().unwrap_or_default().to_owned();
                    let (family, table) = (text("family"), text("table"));
                    if !tables.contains_key(&(family.clone(), table.clone())) {
                        return Err(format!("no such table {family} {table}"));
                    }
                    let key = (family, table, text("name"));
                    match verb.as_str() {
                        // As nft: an `add` of a dynamic set that exists fails.
                        "add" => match sets.get(&key) {
                            Some(true) => return Err(format!("set {key:?} exists")),
                            Some(false) => {}
                            None => {
                                sets.insert(key, set.get("size").is_some());
                            }
                        },
                        "delete" => {
                            sets.remove(&key).ok_or("no such set")?;
                        }
                        "flush" => {
                            sets.get(&key).ok_or("no such set")?;
                        }
                        other => return Err(format!("unexpected verb {other}")),
                    }
                    continue;
                }
                let Some(t) = obj.get("table") else { continue };
                let key = (
                    t["family"].as_str().unwrap_or_default().to_owned(),
                    t["name"].as_str().unwrap_or_default().to_owned(),
                );
                match verb.as_str() {
                    "add" => {
                        tables.entry(key.clone()).or_insert(Value::Null);
                        added.push(key);
                    }
                    "delete" => {
                        tables.remove(&key).ok_or("no such table")?;
                        sets.retain(|(f, t, _), _| (f, t) != (&key.0, &key.1));
                    }
                    other => return Err(format!("unexpected verb {other}")),
                }
            }
            for key in added {
                if let Some(v) = tables.get_mut(&key) {
                    *v = batch.clone();
                }
            }
            s.tables = tables;
            s.sets = sets;
            Ok(())
        })
    }

    async fn nft_tables(&self) -> Result<Vec<NftTable>, HostError> {
        self.op("nft_tables", Call::NftTables, |s| {
            Ok(s.tables
                .keys()
                .map(|(family, name)| NftTable {
                    family: family.clone(),
                    name: name.clone(),
                })
                .collect())
        })
    }

    async fn nft_sets(&self) -> Result<Vec<NftSet>, HostError> {
        self.op("nft_sets", Call::NftSets, |s| {
            Ok(s.sets
                .keys()
                .map(|(family, table, name)| NftSet {
                    family: family.clone(),
                    table: table.clone(),
                    name: name.clone(),
                })
                .collect())
        })
    }

    async fn nft_chain_policy(
        &self,
        family: &str,
        table: &str,
        chain: &str,
    ) -> Result<Option<String>, HostError> {
        let call = Call::NftChainPolicy(family.into(), table.into(), chain.into());
        self.op("nft_chain_policy", call, |s| {
            let Some(batch) = s.tables.get(&(family.to_owned(), table.to_owned())) else {
                return Ok(None);
            };
            // The last `add chain` of that name in the batch that made it.
            Ok(batch["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("add")?.get("chain"))
                .filter(|c| c["name"] == chain)
                .filter_map(|c| c["policy"].as_str().map(str::to_owned))
                .next_back())
        })
    }

    /// Chains and the contents of sets are not simulated: an empty
    /// listing, or for a set that does not exist, an error (as nft).
    async fn nft_list(
        &self,
        kind: &str,
        family: &str,
        table: &str,
        name: &str,
    ) -> Result<Value, HostError> {
        let call = Call::NftList(kind.into(), family.into(), table.into(), name.into());
        self.op("nft_list", call, |s| {
            let key = (family.to_owned(), table.to_owned(), name.to_owned());
            if kind == "set" && !s.sets.contains_key(&key) {
                return Err("No such file or directory".into());
            }
            Ok(serde_json::json!({ "nftables": [] }))
        })
    }

    async fn nft_delete_table(&self, family: &str, name: &str) -> Result<(), HostError> {
        self.op(
            "nft_delete_table",
            Call::NftDeleteTable(family.into(), name.into()),
            |s| {
                s.sets
                    .retain(|(f, t, _), _| (f.as_str(), t.as_str()) != (family, name));
                s.tables
                    .remove(&(family.to_owned(), name.to_owned()))
                    .map(drop)
                    .ok_or_else(|| "no such table".into())
            },
        )
    }

    async fn ip_forward(&self) -> Result<bool, HostError> {
        self.op("ip_forward", Call::IpForward, |s| Ok(s.ip_forward))
    }

    async fn set_ip_forward(&self, on: bool) -> Result<(), HostError> {
        self.op("set_ip_forward", Call::SetIpForward(on), |s| {
            s.ip_forward = on;
            Ok(())
        })
    }

    async fn neigh_replace(
        &self,
        link: &str,
        ip: std::net::Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), HostError> {
        self.op(
            "neigh_replace",
            Call::NeighReplace(link.into(), ip, mac),
            |s| {
                if s.links.contains_key(link) {
                    Ok(())
                } else {
                    Err("no such link".into())
                }
            },
        )
    }
}
