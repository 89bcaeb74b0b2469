//! The kernel command line: `banger.*` parameters and `ip=`.

use std::net::{IpAddr, Ipv4Addr};

use banger_agent_proto::guest::{DEFAULT_VSOCK_PORT, cmdline as keys};

/// `key[=value]` words of `/proc/cmdline`, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

/// Which channel `--listen auto` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Serial,
    Vsock(u32),
}

/// How `--init` ends the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    PowerOff,
    Reboot,
}

impl KernelCmdline {
    /// Reads `/proc/cmdline`; empty when unreadable.
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/cmdline")
            .map(|s| Self::parse(&s))
            .unwrap_or_default()
    }

    /// Splits on whitespace outside double quotes, like the kernel does.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut in_quotes = false;
        let mut has_word = false;
        for c in text.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    has_word = true;
                }
                c if c.is_whitespace() && !in_quotes => {
                    if has_word {
                        params.push(split_param(&word));
                        word.clear();
                        has_word = false;
                    }
                }
                c => {
                    word.push(c);
                    has_word = true;
                }
            }
        }
        if has_word {
            params.push(split_param(&word));
        }
        Self { params }
    }

    /// Value of the last `key=value`; `Some("")` for a bare `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    pub fn channel(&self) -> ChannelKind {
        match self.get(keys::CHANNEL) {
            Some("vsock") => ChannelKind::Vsock(
                self.get(keys::VSOCK_PORT)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(DEFAULT_VSOCK_PORT),
            ),
            _ => ChannelKind::Serial,
        }
    }

    /// Nameservers from `banger.dns=`, else from `ip=`'s dns fields.
    pub fn dns(&self) -> Vec<IpAddr> {
        if let Some(list) = self.get(keys::DNS) {
            return list
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect();
        }
        match self.ip() {
            Some(Ok(ip)) => ip.dns.into_iter().map(IpAddr::V4).collect(),
            _ => Vec::new(),
        }
    }

    pub fn modules(&self) -> Vec<String> {
        self.get(keys::MODULES)
            .map(|m| {
                m.split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn halt(&self) -> Halt {
        match self.get(keys::HALT) {
            Some("reboot") => Halt::Reboot,
            _ => Halt::PowerOff,
        }
    }

    /// The static configuration in `ip=`, if any.
    pub fn ip(&self) -> Option<Result<IpConfig, String>> {
        IpConfig::parse(self.get("ip")?).transpose()
    }
}

fn split_param(word: &str) -> (String, Option<String>) {
    match word.split_once('=') {
        Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
        None => (word.to_owned(), None),
    }
}

/// Static IPv4 configuration from the kernel's
/// `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub client: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub prefix_len: u8,
    pub hostname: Option<String>,
    pub device: Option<String>,
    pub dns: Vec<Ipv4Addr>,
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

fn parse_ip(field: &str, what: &str) -> Result<Option<Ipv4Addr>, String> {
    match non_empty(Some(field)) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("bad {what} address {s:?}")),
    }
}

/// Prefix length of a dotted netmask (or a bare prefix length).
pub fn netmask_prefix(mask: &str) -> Result<u8, String> {
    if let Ok(prefix) = mask.parse::<u8>() {
        return if prefix <= 32 {
            Ok(prefix)
        } else {
            Err(format!("prefix length {prefix} out of range"))
        };
    }
    let bits = u32::from(
        mask.parse::<Ipv4Addr>()
            .map_err(|_| format!("bad netmask {mask:?}"))?,
    );
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(format!("netmask {mask} is not contiguous"));
    }
    Ok(prefix as u8)
}

/// The classful default the kernel uses when `ip=` has no netmask.
fn class_prefix(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

impl IpConfig {
    /// `Ok(None)` for `ip=off|none|dhcp...` (no static configuration).
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        match value {
            "" | "off" | "none" => return Ok(None),
            "on" | "any" | "dhcp" | "bootp" | "rarp" | "both" => {
                return Err(format!(
                    "ip={value}: only static configuration is supported"
                ));
            }
            _ => {}
        }
        let f: Vec<&str> = value.split(':').collect();
        let field = |i: usize| f.get(i).copied().unwrap_or("");
        let client = parse_ip(field(0), "client")?.ok_or("ip= has no client address")?;
        let gateway = parse_ip(field(2), "gateway")?;
        let prefix_len = match non_empty(Some(field(3))) {
            Some(mask) => netmask_prefix(mask)?,
            None => class_prefix(client),
        };
        match field(6) {
            "" | "off" | "none" => {}
            other => {
                return Err(format!(
                    "ip= autoconf {other:?}: only static configuration is supported"
                ));
            }
        }
        let mut dns = Vec::new();
        for i in [7, 8] {
            dns.extend(parse_ip(field(i), "dns")?);
        }
        Ok(Some(Self {
            client,
            gateway,
            prefix_len,
            hostname: non_empty(Some(field(4))).map(str::to_owned),
            device: non_empty(Some(field(5))).map(str::to_owned),
            dns,
        }))
    }

    /// `ip` (iproute2) invocations that apply this configuration to `device`
    /// (`replace`, so they are idempotent). Loopback comes up first.
    pub fn commands(&self, device: &str) -> Vec<Vec<String>> {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut cmds = vec![
            s(&["link", "set", "lo", "up"]),
            s(&[
                "addr",
                "replace",
                &format!("{}/{}", self.client, self.prefix_len),
                "dev",
                device,
            ]),
            s(&["link", "set", device, "up"]),
        ];
        if let Some(gw) = self.gateway {
            cmds.push(s(&[
                "route",
                "replace",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                device,
            ]));
        }
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_words_and_quotes() {
        let c = KernelCmdline::parse(
            "console=ttyS0 root=/dev/vda ro  banger.init=fast quiet x=\"a b\" banger.dns=1.1.1.1,9.9.9.9\n",
        );
        assert_eq!(c.get("console"), Some("ttyS0"));
        assert_eq!(c.get("ro"), Some(""));
        assert_eq!(c.get("x"), Some("a b"));
        assert_eq!(c.get("banger.init"), Some("fast"));
        assert_eq!(c.get("missing"), None);
        assert_eq!(
            c.dns(),
            vec![
                "1.1.1.1".parse::<IpAddr>().unwrap(),
                "9.9.9.9".parse().unwrap()
            ]
        );
        assert_eq!(c.channel(), ChannelKind::Serial);
        assert_eq!(c.halt(), Halt::PowerOff);
        let last_wins =
            KernelCmdline::parse("banger.channel=serial banger.channel=vsock banger.halt=reboot");
        assert_eq!(last_wins.channel(), ChannelKind::Vsock(1024));
        assert_eq!(last_wins.halt(), Halt::Reboot);
        let port =
            KernelCmdline::parse("banger.channel=vsock banger.vsock_port=5000 banger.modules=a,,b");
        assert_eq!(port.channel(), ChannelKind::Vsock(5000));
        assert_eq!(port.modules(), vec!["a", "b"]);
    }

    #[test]
    fn ip_static() {
        let ip = IpConfig::parse("172.16.0.2::172.16.0.1:255.255.255.0:vm-1:eth0:off")
            .unwrap()
            .unwrap();
        assert_eq!(
            ip,
            IpConfig {
                client: "172.16.0.2".parse().unwrap(),
                gateway: Some("172.16.0.1".parse().unwrap()),
                prefix_len: 24,
                hostname: Some("vm-1".into()),
                device: Some("eth0".into()),
                dns: vec![],
            }
        );
        assert_eq!(
            ip.commands("eth0"),
            vec![
                vec!["link", "set", "lo", "up"],
                vec!["addr", "replace", "172.16.0.2/24", "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec![
                    "route",
                    "replace",
                    "default",
                    "via",
                    "172.16.0.1",
                    "dev",
                    "eth0"
                ],
            ]
        );
    }

    #[test]
    fn ip_variants() {
        // Minimal: client only, classful mask, no gateway, no route.
        let ip = IpConfig::parse("10.1.2.3").unwrap().unwrap();
        assert_eq!(
            (ip.prefix_len, ip.gateway, ip.device.as_deref()),
            (8, None, None)
        );
        assert_eq!(ip.commands("eth1").len(), 3);
        // DNS fields and a prefix-length netmask.
        let ip = IpConfig::parse("192.168.7.9::192.168.7.1:20::::8.8.8.8:1.1.1.1")
            .unwrap()
            .unwrap();
        assert_eq!(ip.prefix_len, 20);
        assert_eq!(
            ip.dns,
            vec![Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(1, 1, 1, 1)]
        );
        let c = KernelCmdline::parse("ip=192.168.7.9::192.168.7.1:20::::8.8.8.8");
        assert_eq!(c.dns(), vec![IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8))]);
        assert_eq!(IpConfig::parse("off"), Ok(None));
        assert!(IpConfig::parse("dhcp").is_err());
        assert!(IpConfig::parse("10.0.0.2::10.0.0.1:255.255.255.0::eth0:dhcp").is_err());
        assert!(IpConfig::parse("10.0.0.300::::").is_err());
        assert!(IpConfig::parse(":10.0.0.1:::").is_err());
        assert!(IpConfig::parse("10.0.0.2:::255.0.255.0").is_err());
        assert!(KernelCmdline::parse("quiet").ip().is_none());
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask_prefix("255.255.255.255"), Ok(32));
        assert_eq!(netmask_prefix("255.255.252.0"), Ok(22));
        assert_eq!(netmask_prefix("0.0.0.0"), Ok(0));
        assert_eq!(netmask_prefix("16"), Ok(16));
        assert!(netmask_prefix("33").is_err());
        assert!(netmask_prefix("255.0.0.255").is_err());
        assert!(netmask_prefix("mask").is_err());
    }
}
