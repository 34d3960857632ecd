#!/usr/bin/env bash
# System packages the test suite uses besides Python ones: Debian's nginx (the gateway test in
# tests/deploy/ runs it on loopback) and chromium with chromium-driver (the playground's browser test,
# tests/server/test_playground_browser.py; about 120 MB to fetch, a few minutes to install on 2 cores).
# Idempotent and quick when everything is already there.
# Needs root or passwordless sudo; without them it only reports what is missing, and the tests
# that need the package skip with a reason.
set -euo pipefail
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
else
  echo "ci-system-deps: cannot install ${missing[*]} (not root, no passwordless sudo)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-system-deps: no apt-get here; install ${missing[*]} by hand" >&2
  exit 0
fi
# Keep the package's service from starting on port 80 during installation: the tests start their
# own nginx on a free loopback port. A policy file that is already there is left as it is.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
  "${SUDO[@]}" chmod 755 "$policy"
  added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then "${SUDO[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q >/dev/null || echo "ci-system-deps: apt-get update failed" >&2
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
  echo "ci-system-deps: could not install ${missing[*]}; the tests that need them will skip" >&2
fi
