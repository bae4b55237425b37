#!/usr/bin/env bash
# Installs Debian's haproxy (the L4 baseline of `cargo bench --bench proxy`)
# when it is missing. Nothing is started: the harness runs its own instance
# on 127.0.0.1 and stops it by PID.
set -euo pipefail
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] && exit 0
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
as_root apt-get update -q >&2
as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends haproxy >&2
