#!/usr/bin/env bash
# The web UI's browser libraries (xterm.js and its fit addon) come from npm,
# pinned by crates/banger-web/vendor/package-lock.json, and are served by the
# daemon from crates/banger-web/ui/vendor/, where they are checked in: a
# cargo build needs no npm and no network, and the UI loads nothing from a CDN.
#   scripts/vendor-ui.sh           install the locked packages, copy the files in
#   scripts/vendor-ui.sh --check   fail (naming the file) when a checked-in file
#                                  is not what the lockfile's package holds
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/crates/banger-web/vendor
dest=$root/crates/banger-web/ui/vendor
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "vendor-ui: unknown argument $1" >&2; exit 2 ;;
esac

# package file -> name under ui/vendor
files=(
  "@xterm/xterm/lib/xterm.js xterm.js"
  "@xterm/xterm/css/xterm.css xterm.css"
  "@xterm/addon-fit/lib/addon-fit.js addon-fit.js"
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$src/package.json" "$src/package-lock.json" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)

failed=0
mkdir -p "$dest"
for f in "${files[@]}"; do
  read -r from to <<<"$f"
  if [[ $check -eq 1 ]]; then
    if ! cmp -s "$work/node_modules/$from" "$dest/$to"; then
      echo "vendor-ui: ui/vendor/$to is not $from of the locked package: run scripts/vendor-ui.sh" >&2
      failed=1
    fi
  else
    cp "$work/node_modules/$from" "$dest/$to"
  fi
done
extra=$(cd "$dest" && ls | grep -vxF -e xterm.js -e xterm.css -e addon-fit.js || true)
if [[ -n "$extra" ]]; then
  echo "vendor-ui: ui/vendor has files no package gives: $extra" >&2
  failed=1
fi
[[ $failed -eq 0 ]] && echo "vendor-ui: ${#files[@]} files $([[ $check -eq 1 ]] && echo match || echo copied)" >&2
exit $failed
