#!/bin/sh
# Make sure this machine can build Baton's virtual environment.
# A fresh Debian has python3 but not always the venv module (package python3-venv).
set -eu
PY="${PY:-python3}"
if ! "$PY" -c "import venv, ensurepip" >/dev/null 2>&1; then
    echo "bootstrap: installing python3-venv (needed for the project's virtual environment)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
# The dashboard's browser tests (tests/browser) drive Debian's own headless Chromium through
# Playwright's executable_path: the distribution's package, never `playwright install`.
# Only `make test` asks for it (`--browser`); `make run` does not need a browser.
if [ "${1:-}" = "--browser" ] && [ ! -x /usr/bin/chromium ]; then
    echo "bootstrap: installing chromium (for the dashboard's browser tests)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
