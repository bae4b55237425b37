#!/usr/bin/env bash
# System packages the default build needs: MIT krb5 headers (libgssapi-sys
# compiles against gssapi_ext.h and links libgssapi_krb5), libclang with
# clang's own headers (bindgen loads libclang.so at build time), pkg-config.
# Installs the missing ones with apt-get (as root or through sudo); does
# nothing when all are present.
#
# The checks ask for exactly what the build uses. A glob such as
# /usr/lib/llvm-*/lib/libclang*.so* also matches libclang-cpp.so (the C++
# interface, which base images ship without libclang), and then bindgen
# fails with "Unable to find libclang".
set -euo pipefail

installed() { # dpkg package name
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# The file clang-sys (bindgen's loader) opens: libclang.so, libclang-N.so or
# libclang.so.N, never libclang-cpp. LIBCLANG_PATH overrides, as for bindgen.
libclang_present() {
  local dirs=("${LIBCLANG_PATH:-}" /usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib)
  local d f
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang.so.[0-9]* "$d"/libclang-[0-9]*.so "$d"/libclang-[0-9]*.so.[0-9]*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

need=()
if command -v dpkg-query >/dev/null; then
  # Debian/Ubuntu: the packages themselves (libclang-dev brings libclang1-N
  # and libclang-common-N-dev, whose stddef.h bindgen needs too)
  for p in libkrb5-dev libclang-dev pkg-config; do
    installed "$p" || need+=("$p")
  done
else
  [ -f /usr/include/gssapi/gssapi_ext.h ] || need+=(libkrb5-dev)
  libclang_present || need+=(libclang-dev)
  command -v pkg-config >/dev/null || need+=(pkg-config)
fi
[ ${#need[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || {
  echo "[build-deps] missing: ${need[*]} (install them, or build with --no-default-features to leave Kerberos out)" >&2
  exit 1
}
echo "[build-deps] installing ${need[*]}" >&2
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
as_root apt-get update -q >&2
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
