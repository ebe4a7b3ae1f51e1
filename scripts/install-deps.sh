#!/usr/bin/env bash
# Installs what building and testing cellpay needs beyond a Rust toolchain:
# - the toolchain's rustfmt and clippy;
# - protoc (Debian's protobuf-compiler): the `raft` crate's build script
#   compiles its protobuf schema with it. (cellpay's own gRPC schema is
#   compiled in pure Rust by protox.)
set -euo pipefail
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
if ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler
  fi
fi
