#!/usr/bin/env bash
# Installs what building and testing cellpay needs beyond a Rust toolchain:
# - the toolchain's rustfmt and clippy;
# - protoc (Debian's protobuf-compiler): the `raft` crate's build script
#   compiles its protobuf schema with it. (cellpay's own gRPC schema is
#   compiled in pure Rust by protox.)
# - chromium and chromedriver (Debian's chromium and chromium-driver): the
#   dashboard's browser test (crates/cellpay/tests/e2e_dashboard.rs) drives
#   headless Chromium over WebDriver.
# - make and a C compiler (Debian's make and gcc): the `tikv-jemalloc-sys`
#   crate builds jemalloc, the binary's allocator, from its C sources.
set -euo pipefail
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
packages=()
command -v protoc >/dev/null 2>&1 || packages+=(protobuf-compiler)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
command -v make >/dev/null 2>&1 || packages+=(make)
command -v cc >/dev/null 2>&1 || packages+=(gcc)
if [ "${#packages[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
