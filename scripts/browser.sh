#!/usr/bin/env bash
# Make sure headless Chromium and its ChromeDriver are installed (Debian's packages), for the browser
# test of Flower (tests/integration/test_flower_browser.py). Does nothing when both are there.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "browser: $(chromium --version 2>/dev/null | head -n1) and chromedriver are installed"
  exit 0
fi

# Root installs directly; anyone else needs sudo (a machine without either cannot install packages).
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "browser: chromium or chromedriver is missing and this user can neither install packages" \
      "nor use sudo; install Debian's chromium and chromium-driver" >&2
    exit 1
  fi
  as_root=(sudo)
fi

echo "browser: installing Debian's chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
# An install cut short (a killed run) leaves dpkg half-configured, and apt refuses until it is finished.
"${as_root[@]}" dpkg --configure -a
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "browser: $(chromium --version 2>/dev/null | head -n1) and chromedriver are installed"
