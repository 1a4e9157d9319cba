#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every unit and
# end-to-end test of the workspace (real etcd processes, real DNS queries).
#   ./integration/test.sh            # everything
#   ./integration/test.sh -p signpost-dns   # extra args go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."
. integration/deps.sh
signpost_install_deps
# Build the binary first: the end-to-end tests start `signpost` processes.
cargo build --workspace --bins
cargo test --workspace "$@"
