#!/usr/bin/env bash
# Install the host packages banger needs (Debian/Ubuntu), then verify that
# every binary it runs is there and works. The packages and the binaries
# each must provide are listed in scripts/deps.list.
#   scripts/deps.sh                runtime packages
#   scripts/deps.sh --test         runtime + what the test suite uses
#   scripts/deps.sh --verify [--test]
#                                  only verify (no apt): exits 1 naming every
#                                  binary that is missing and its package
#   --list FILE                    another package list (the tests use it to
#                                  prove the verification fails)
#
# apt is free to resolve an install by removing packages. Here that happened
# to qemu-utils: a machine shipped it from a newer release, and installing the
# distro's qemu-system-x86 (whose qemu-system-common that qemu-utils Breaks)
# removed it, leaving no qemu-img. So QEMU's packages are asked for at one
# version in one transaction, apt's plan is read before it acts, and a plan
# that removes anything is refused with the packages named.
set -euo pipefail

list="$(dirname "$0")/deps.list"
with_tests=0
verify_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --test) with_tests=1 ;;
    --verify) verify_only=1 ;;
    --list) list=$2; shift ;;
    *) echo "deps: unknown argument $1 (see the comment at the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "deps: $*" >&2; }

# package -> "bin bin ..." for the packages wanted, in list order.
packages=()
declare -A binaries=()
while read -r pkg kind bins; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  bins=${bins%%#*}
  case "$kind" in
    runtime) ;;
    test) [[ $with_tests -eq 1 ]] || continue ;;
    *) say "$list: package $pkg: kind must be runtime or test, not '$kind'"; exit 2 ;;
  esac
  packages+=("$pkg")
  binaries[$pkg]=$(echo "$bins" | xargs | sed 's/^-$//')
done <"$list"

installed_version() {
  dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null |
    awk '$1 == "install" && $3 == "installed" { print $4 }'
}

# Every listed binary is shipped by its package (so the list is honest on any
# machine, whatever else is installed), is executable, and — for QEMU, whose
# tools break when their libraries and versions disagree — runs.
verify() {
  local failed=0 count=0 pkg bin path
  for pkg in "${packages[@]}"; do
    if [[ -z "$(installed_version "$pkg")" ]]; then
      for bin in ${binaries[$pkg]}; do
        say "MISSING $bin: package $pkg is not installed (apt-get install $pkg)"
      done
      [[ -n "${binaries[$pkg]}" ]] || say "MISSING package $pkg (apt-get install $pkg)"
      failed=1
      continue
    fi
    for bin in ${binaries[$pkg]}; do
      path=$(dpkg -L "$pkg" 2>/dev/null | grep -E "/s?bin/${bin//./\\.}\$" | head -n1 || true)
      # usrmerge: dpkg may record /sbin/x for what lives at /usr/sbin/x.
      if [[ -n "$path" && ! -x "$path" && -x "/usr$path" ]]; then path="/usr$path"; fi
      if [[ -z "$path" ]]; then
        say "MISSING $bin: package $pkg does not provide it (fix scripts/deps.list)"
        failed=1
      elif [[ ! -x "$path" ]]; then
        say "MISSING $bin: $path of package $pkg is gone (apt-get install --reinstall $pkg)"
        failed=1
      else
        count=$((count + 1))
      fi
    done
  done
  local tool
  for tool in qemu-system-x86_64 qemu-img; do
    if [[ " ${packages[*]} " == *" qemu-utils "* ]] && command -v "$tool" >/dev/null &&
      ! "$tool" --version >/dev/null 2>&1; then
      say "BROKEN $tool: '$tool --version' fails: $("$tool" --version 2>&1 | head -n1)"
      failed=1
    fi
  done
  if [[ $with_tests -eq 1 ]] && ! command -v npm >/dev/null; then
    say "MISSING npm: tests/dev_image.rs builds the dev image, whose npm packages npm installs on the host (apt-get install npm)"
    failed=1
  fi
  if [[ $failed -ne 0 ]]; then
    say "verification failed: see the lines above"
    return 1
  fi
  say "ok: $count binaries from ${#packages[@]} packages"
}

if [[ $verify_only -eq 1 ]]; then
  verify
  exit
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive

want=()
for pkg in "${packages[@]}"; do
  [[ -n "$(installed_version "$pkg")" ]] || want+=("$pkg")
done

# QEMU's system emulator and its tools come from one source package and must
# be of one version: ask for qemu-utils at the emulator's version.
qemu_pin=()
qemu_version() {
  local v
  v=$(installed_version qemu-system-x86)
  [[ -n "$v" ]] || v=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ { print $2 }')
  [[ "$v" != "(none)" ]] && echo "$v"
}
plan_qemu() {
  local target utils
  target=$(qemu_version || true)
  utils=$(installed_version qemu-utils)
  if [[ -n "$target" && "$utils" != "$target" ]]; then
    qemu_pin=("qemu-utils=$target")
    want=("${want[@]/#qemu-utils/}")
    [[ -n "$utils" ]] && say "qemu-utils $utils is not qemu-system-x86's $target: installing qemu-utils $target with it"
  fi
}

updated=0
apt_update() {
  [[ $updated -eq 1 ]] && return
  "${SUDO[@]}" apt-get update -qq
  updated=1
}

if [[ " ${packages[*]} " == *" qemu-utils "* ]]; then
  # The candidate version is only known after an update on a fresh machine.
  if [[ ${#want[@]} -gt 0 ]]; then apt_update; fi
  plan_qemu
fi
mapfile -t want < <(printf '%s\n' "${want[@]}" | grep -v '^$' || true)
want+=("${qemu_pin[@]}")

# npm for the dev image's build (tests/dev_image.rs): any npm on PATH does.
# Not in deps.list: a nodejs from elsewhere (NodeSource) bundles npm, and
# Debian's npm package conflicts with it.
if [[ $with_tests -eq 1 ]] && ! command -v npm >/dev/null; then
  want+=(npm)
fi

if [[ ${#want[@]} -gt 0 ]]; then
  apt_update
  args=(install -y -qq --no-install-recommends --allow-downgrades "${want[@]}")
  plan=$("${SUDO[@]}" apt-get -s "${args[@]}" 2>&1) || {
    say "apt cannot install ${want[*]}:"
    echo "$plan" >&2
    exit 1
  }
  removed=$(echo "$plan" | awk '/^Remv / { print $2 }' | xargs)
  if [[ -n "$removed" ]]; then
    say "refusing: installing ${want[*]} would make apt remove: $removed"
    say "install them at versions that fit together by hand, then run $0 again"
    exit 1
  fi
  # "Inst pkg [installed] (new ...)": a package apt replaces by another version.
  echo "$plan" | awk '$1 == "Inst" && $3 ~ /^\[/ {
    gsub(/[][]/, "", $3); sub(/^\(/, "", $4); print "deps: replacing " $2 " " $3 " by " $4 }' >&2
  say "installing ${want[*]}"
  "${SUDO[@]}" apt-get "${args[@]}" >/dev/null
fi
verify

# The MCP client tests/mcp.rs drives `banger mcp` with: the `mcp` package
# from PyPI, pinned, in a venv under the target dir.
MCP_CLIENT_VERSION=1.27.0
if [[ $with_tests -eq 1 ]]; then
  venv="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/mcp-venv"
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mcp') != '$MCP_CLIENT_VERSION')" 2>/dev/null; then
    say "installing the Python MCP client (mcp $MCP_CLIENT_VERSION) into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "mcp==$MCP_CLIENT_VERSION"
  fi
fi

# The browser driver tests/web_ui.rs runs Debian's chromium with:
# playwright-core from npm, pinned by its lockfile, under the target dir
# (reinstalled when the lockfile changes).
if [[ $with_tests -eq 1 ]]; then
  src="$(cd "$(dirname "$0")/.." && pwd)/crates/banger/tests/browser"
  dest="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/browser"
  if ! cmp -s "$src/package-lock.json" "$dest/package-lock.json" || [[ ! -d "$dest/node_modules/playwright-core" ]]; then
    say "installing the browser driver (playwright-core, $src/package-lock.json) into $dest"
    rm -rf "$dest"
    mkdir -p "$dest"
    cp "$src/package.json" "$src/package-lock.json" "$dest/"
    (cd "$dest" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
  fi
fi
