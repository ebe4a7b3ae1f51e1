#!/usr/bin/env bash
# Installs what building and testing cellpay needs beyond a Rust toolchain.
# Today that is only the toolchain's own rustfmt and clippy: the gRPC schema is
# compiled in pure Rust (protox), so no system protoc is needed.
set -euo pipefail
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
