#!/usr/bin/env bash
# System packages the default build needs: MIT krb5 headers and libclang
# (bindgen) for the `kerberos` feature. Installs the missing ones with
# apt-get (as root or through sudo); does nothing when all are present.
set -euo pipefail
need=()
[ -f /usr/include/gssapi/gssapi_ext.h ] || need+=(libkrb5-dev)
compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null || need+=(libclang-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ ${#need[@]} -eq 0 ] && exit 0
echo "[build-deps] installing ${need[*]}" >&2
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
as_root apt-get update -q >&2
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
