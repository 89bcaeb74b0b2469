//! A VM's secrets inside its guest: only the placeholders. At every boot the
//! guest is given each as the environment variable of the secret's name (for
//! `vm exec`, through the exec request; for logins, `/etc/profile.d` and
//! `/etc/environment`) and as the file `/run/banger/secrets/NAME`, and the
//! install's CA joins its trust store (the proxy answers for the secrets'
//! hosts with certificates the CA signs). The values stay in the daemon's
//! proxy (`crate::proxy`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use banger_agent_proto::AgentClient;
use banger_store::Vm;

use super::{VmError, VmService};

/// Trusts the CA (`$1` its PEM, `$2` its file name: kept in
/// `/usr/local/share/ca-certificates`, where `update-ca-certificates` finds
/// it, and added to the bundle OpenSSL, curl and most tools read: running
/// `update-ca-certificates` itself takes longer than an agent call may in a
/// loaded TCG guest) and writes the
/// placeholders: the other arguments are pairs `NAME PLACEHOLDER` (both
/// `[A-Za-z0-9_]`, so they need no quoting in the files). Run through the
/// agent's exec (a fixed script, values as arguments), so the agent
/// protocol needs nothing new. Files are written beside their target and
/// renamed into place; lines a previous boot wrote are replaced.
const PLACEHOLDERS: &str = r#"set -e
umask 022
mkdir -p /usr/local/share/ca-certificates /etc/ssl/certs
printf '%s\n' "$1" > "/usr/local/share/ca-certificates/$2"
bundle=/etc/ssl/certs/ca-certificates.crt
touch "$bundle"
grep -qF "$(printf '%s\n' "$1" | sed -n 2p)" "$bundle" || printf '%s\n' "$1" >> "$bundle"
shift 2
mkdir -p /run/banger/secrets /etc/profile.d
touch /etc/environment
prof=$(mktemp /etc/profile.d/.banger-secrets.XXXXXX)
envf=$(mktemp /etc/.banger-environment.XXXXXX)
cp /etc/environment "$envf"
while [ $# -ge 2 ]; do
  printf '%s' "$2" > "/run/banger/secrets/$1"
  printf 'export %s=%s\n' "$1" "$2" >> "$prof"
  grep -v "^$1=" "$envf" > "$envf.x" || true
  mv "$envf.x" "$envf"
  printf '%s=%s\n' "$1" "$2" >> "$envf"
  shift 2
done
chmod 0644 "$prof" "$envf"
mv "$prof" /etc/profile.d/banger-secrets.sh
mv "$envf" /etc/environment
"#;

impl VmService {
    /// Before `vm`'s tap is guarded: the secrets proxy serves the guest at
    /// `ip` if the VM has secrets (listening on `gateway`).
    pub(super) async fn serve_secrets(
        &self,
        vm_id: &str,
        ip: Ipv4Addr,
        gateway: Ipv4Addr,
    ) -> Result<(), VmError> {
        let secrets = self.store.vm_secrets(vm_id)?;
        if secrets.is_empty() {
            return Ok(());
        }
        self.net
            .proxy()
            .register(ip, vm_id, secrets, gateway)
            .await
            .map_err(|e| {
                VmError::Failed(format!("the secrets proxy cannot listen on {gateway}: {e}"))
            })
    }

    /// The placeholders of `vm`'s secrets, by name.
    pub(super) fn placeholders(&self, vm: &Vm) -> Result<BTreeMap<String, String>, VmError> {
        Ok(self
            .store
            .vm_secrets(&vm.id)?
            .into_iter()
            .map(|s| (s.name, s.placeholder))
            .collect())
    }

    /// At boot: the guest's copies of the placeholders (nothing for a VM
    /// without secrets).
    pub(super) async fn give_guest_placeholders(
        &self,
        vm: &Vm,
        client: &AgentClient,
    ) -> Result<(), VmError> {
        let placeholders = self.placeholders(vm)?;
        if placeholders.is_empty() {
            return Ok(());
        }
        let ca = self
            .net
            .proxy()
            .ca()
            .map_err(|e| VmError::Failed(format!("the secrets proxy's CA: {e:#}")))?;
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            PLACEHOLDERS.into(),
            "banger-secrets".into(),
            ca.cert_pem.trim_end().to_owned(),
            self.net.proxy().ca_file_name(),
        ];
        for (name, placeholder) in placeholders {
            argv.push(name);
            argv.push(placeholder);
        }
        self.guest_change(vm, client, "the secret placeholders", argv)
            .await
    }
}
