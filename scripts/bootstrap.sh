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
