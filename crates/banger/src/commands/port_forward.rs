//! `banger vm port-forward …` and the `-p` option of `vm create` / `vm run`.

use crate::out::outln;
use banger_wire::methods::{
    PortForwardAddParams, PortForwardInfo, PortForwardListParams, PortForwardRemoveParams,
    PortForwardSpec, VmPortForwardAdd, VmPortForwardList, VmPortForwardRemove,
};

use crate::context::Invocation;
use crate::error::CliError;

fn port(s: &str, what: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} {s:?} is not a port (1-65535)")),
    }
}

/// `[BIND:]HOSTPORT:GUESTPORT`, e.g. `8080:80` or `0.0.0.0:8080:80` (a clap value parser).
pub fn parse_spec(s: &str) -> Result<PortForwardSpec, String> {
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    match parts.as_slice() {
        [guest, host] => Ok(PortForwardSpec {
            bind: None,
            host_port: port(host, "host port")?,
            guest_port: port(guest, "guest port")?,
        }),
        [guest, host, bind] => {
            bind.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("bind address {bind:?} is not an IPv4 address"))?;
            Ok(PortForwardSpec {
                bind: Some(bind.to_string()),
                host_port: port(host, "host port")?,
                guest_port: port(guest, "guest port")?,
            })
        }
        _ => Err(format!(
            "{s:?} is not [BIND:]HOSTPORT:GUESTPORT (e.g. 8080:80)"
        )),
    }
}

/// `[BIND:]HOSTPORT` of a forward to remove.
pub fn parse_host(s: &str) -> Result<(Option<String>, u16), String> {
    match s.rsplit_once(':') {
        None => Ok((None, port(s, "host port")?)),
        Some((bind, p)) => {
            bind.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("bind address {bind:?} is not an IPv4 address"))?;
            Ok((Some(bind.to_string()), port(p, "host port")?))
        }
    }
}

pub async fn add(
    ctx: &Invocation,
    name: &str,
    specs: Vec<PortForwardSpec>,
) -> Result<u8, CliError> {
    let params = PortForwardAddParams {
        name: name.to_string(),
        forwards: specs,
    };
    let all = ctx.call::<VmPortForwardAdd>(&params).await?;
    if ctx.json {
        super::print_json(&all)?;
    } else {
        print_table(&all)?;
    }
    Ok(0)
}

pub async fn list(ctx: &Invocation, name: Option<String>) -> Result<u8, CliError> {
    let all = ctx
        .call::<VmPortForwardList>(&PortForwardListParams { name })
        .await?;
    if ctx.json {
        super::print_json(&all)?;
    } else {
        print_table(&all)?;
    }
    Ok(0)
}

pub async fn remove(
    ctx: &Invocation,
    name: &str,
    host: (Option<String>, u16),
) -> Result<u8, CliError> {
    let (bind, host_port) = host;
    let params = PortForwardRemoveParams {
        name: name.to_string(),
        bind,
        host_port,
    };
    ctx.call::<VmPortForwardRemove>(&params).await?;
    if ctx.json {
        super::print_json(&serde_json::json!({ "removed": params }))?;
    } else {
        outln!(
            "removed {}:{host_port} of {name}",
            params.bind.as_deref().unwrap_or("127.0.0.1")
        );
    }
    Ok(0)
}

/// One line per forward: `bind:host -> guest port (status)`.
pub fn describe(f: &PortForwardInfo) -> String {
    let error = f
        .error
        .as_deref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    format!(
        "{}:{} -> {} ({}{error})",
        f.bind, f.host_port, f.guest_port, f.status
    )
}

fn print_table(all: &[PortForwardInfo]) -> Result<(), CliError> {
    outln!("{:<20} {:<22} {:<6} STATUS", "VM", "HOST", "GUEST");
    for f in all {
        let error = f
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        outln!(
            "{:<20} {:<22} {:<6} {}{error}",
            f.vm,
            format!("{}:{}", f.bind, f.host_port),
            f.guest_port,
            f.status
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse_spec("8080:80").unwrap();
        assert_eq!((s.bind, s.host_port, s.guest_port), (None, 8080, 80));
        let s = parse_spec("0.0.0.0:8080:80").unwrap();
        assert_eq!(s.bind.as_deref(), Some("0.0.0.0"));
        for bad in ["80", "a:80", "8080:0", "x:1:2", "1:2:3:4", "70000:1"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_host("8080").unwrap(), (None, 8080));
        assert_eq!(
            parse_host("0.0.0.0:8080").unwrap(),
            (Some("0.0.0.0".into()), 8080)
        );
        assert!(parse_host("host:1").is_err());
    }
}
