#!/usr/bin/env bash
# Headless Chromium for the browser tests (tests/test_review_browser.py): Debian's `chromium` package, driven by
# Playwright's Python package (requirements/dev.txt) through executable_path, so no browser is downloaded by pip.
# Needs root (or sudo) and the distribution's package index; does nothing when chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
chromium --version
