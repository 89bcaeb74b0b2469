#!/usr/bin/env bash
# Install banger on this machine: host packages, release binaries in
# $PREFIX/bin (default /usr/local), the guest agent, and — where systemd runs —
# the banger-helper service; then `banger doctor`, whose failing checks fail
# the install. Re-run it to upgrade.
set -euo pipefail
cd "$(dirname "$0")"
PREFIX=${PREFIX:-/usr/local}
SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi

scripts/deps.sh
cargo build --release --locked --bins --workspace
agent=$(scripts/build-agent.sh --release)

"${SUDO[@]}" install -d "$PREFIX/bin" "$PREFIX/lib/banger"
for bin in banger bangerd banger-helper; do
  "${SUDO[@]}" install -m 0755 "${CARGO_TARGET_DIR:-target}/release/$bin" "$PREFIX/bin/$bin"
done
"${SUDO[@]}" install -m 0755 "$agent" "$PREFIX/lib/banger/banger-agent"

# The root helper: a systemd service where systemd is PID 1. Elsewhere
# (containers, CI) bangerd starts the helper itself when it runs as root.
if [[ -d /run/systemd/system ]]; then
  uid=${SUDO_UID:-$(id -u)}
  # The helper attaches loop devices only over files in banger's state dir
  # (the XDG default; set BANGER_STATE_DIR where XDG_STATE_HOME or BANGER_HOME moves it).
  state=${BANGER_STATE_DIR:-$(getent passwd "$uid" | cut -d: -f6)/.local/state/banger}
  sed -e "s|@BIN@|$PREFIX/bin/banger-helper|" -e "s|@UID@|$uid|" -e "s|@STATE@|$state|" \
    packaging/banger-helper.service \
    | "${SUDO[@]}" tee /etc/systemd/system/banger-helper.service >/dev/null
  "${SUDO[@]}" systemctl daemon-reload
  "${SUDO[@]}" systemctl enable --now banger-helper.service
  echo "banger-helper.service installed for uid $uid"
fi
echo "banger installed in $PREFIX/bin"

# A daemon of the previous install would keep serving the old code: stop it
# (running VMs are adopted by the next one), then check the host for real.
banger=$PREFIX/bin/banger
if "$banger" daemon status >/dev/null 2>&1; then
  "$banger" daemon stop >/dev/null
fi
if ! "$banger" doctor; then
  echo "install: banger is installed, but banger doctor found failing checks: apply the fix lines above, then run '$banger doctor' again" >&2
  exit 1
fi
