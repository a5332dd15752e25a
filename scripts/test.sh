#!/usr/bin/env bash
# Installs Kiln with its test dependencies and runs the whole test suite (README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[test]"
python -m pytest -p no:cacheprovider
