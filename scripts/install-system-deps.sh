#!/bin/bash
# Debian packages the tests and benchmarks use: promtool + prometheus (alert rules, e2e), rclone and openssl
# (the benchmarks' references), postgresql (the state tests start their own server: tests/pg.py),
# chromium-headless-shell (tests/test_statuspage.py renders the daemon's status page in it; Debian's full
# `chromium` serves as well).
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v rclone >/dev/null || need+=(rclone)
command -v openssl >/dev/null || need+=(openssl)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || need+=(chromium-headless-shell)
if ((${#need[@]})); then
    if [ "$(id -u)" != 0 ]; then echo "need root to apt-get install ${need[*]}" >&2; exit 1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian's package starts a prometheus service where an init system runs; tests start their own.
    (systemctl disable --now prometheus prometheus-node-exporter 2>/dev/null || service prometheus stop 2>/dev/null) || true
    # Likewise its postgresql cluster on port 5432: the tests run a throwaway server of their own.
    (systemctl disable --now postgresql 2>/dev/null || service postgresql stop 2>/dev/null) || true
fi
