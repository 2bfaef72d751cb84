#!/usr/bin/env bash
# The test command (README quickstart, and what CI runs): fetch the real models the tests
# read, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch-models.sh
cargo test --workspace --release "$@"
