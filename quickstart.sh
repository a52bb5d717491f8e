#!/usr/bin/env bash
# Sets Offsite up on a fresh machine and runs its first real backup: the arc
# script archiving a sample directory, the way `tar czf name.$(date).tgz dir`
# would, but sandboxed.
set -euo pipefail
cd "$(dirname "$0")"

rustup target add wasm32-wasip2
# The same build the tests and the Debian package use (see Cargo.toml's
# profiles), so `cargo test --workspace --release` afterwards compiles
# nothing again.
cargo test --workspace --release --no-run --quiet
(cd scripts && cargo build --release)

demo=demo
mkdir -p "$demo/beoserver"
printf 'customer ledger\n' > "$demo/beoserver/bookl.dat"
printf 'off\n' > "$demo/beoserver/beoserver_ab_off"
printf 'on\n' > "$demo/beoserver/beoserver_ab_on"

offsite=$PWD/target/release/offsite
arc=$PWD/scripts/target/wasm32-wasip2/release/arc.wasm
cd "$demo"
"$offsite" run "$arc" --param path=beoserver
archive=$(ls -t beoserver.*.tgz | head -n 1)
echo "stored $demo/$archive; GNU tar lists:"
tar -tzvf "$archive"
