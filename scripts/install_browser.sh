#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium and its WebDriver for the `browser` tests
# (tests/test_report_browser.py). Idempotent: does nothing when both binaries already exist.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "chromium and chromedriver already installed"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "installed: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) / $(/usr/bin/chromedriver --version 2>/dev/null | head -1)"
