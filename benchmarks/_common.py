"""Helpers shared by the benchmark scripts (not a benchmark itself).

Every benchmark prints exactly one JSON line on stdout (its figures) and a human summary on stderr.
Figures are ratios against a reference measured in the same process or command, so they compare
across machines; absolute rates are reported too, for context.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MiB = 2**20
GiB = 2**30
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": MiB, "MB": 10**6, "MIB": MiB,
          "G": GiB, "GB": 10**9, "GIB": GiB, "T": 2**40, "TB": 10**12, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Parse `512M`, `2G`, `1.5GiB`, `1000000` (binary units for K/M/G, decimal for KB/MB/GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M, 2G or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def auditor_cmd() -> list[str]:
    """The console script beside this interpreter (what a user runs), else `python -m auditor`.

    The package's bytecode is compiled first, as `pip install` does: an editable install under
    PYTHONDONTWRITEBYTECODE (set on the project's machine) would otherwise compile every module from
    source on every start, ~90 ms of each command's wall time that no installed copy pays.
    """
    import compileall  # only the benchmarks need it

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "auditor"), quiet=1)
    script = Path(sys.executable).parent / "auditor"
    return [str(script)] if script.exists() else [sys.executable, "-m", "auditor"]


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def mb_per_s(nbytes: int, seconds: float) -> float:
    """Decimal megabytes per second (what `dd`, fio and cloud vendors print)."""
    return nbytes / 1e6 / seconds if seconds > 0 else float("inf")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent folder for the temporary data (default: the system temp dir, e.g. /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated data (prints where)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, one round: proves the benchmark runs end to end (its figures mean nothing)")
    return p


def parse_args(parser: argparse.ArgumentParser, **smoke: Any) -> argparse.Namespace:
    """Parse the command line; with --smoke, options left at their defaults take the `smoke` values.

    An option given explicitly wins over its smoke value, so `--smoke --size 64M` still works. Smoke
    sizes keep every code path a benchmark measures (servers, child processes, reference tools) and
    cut only the sizes and the number of rounds.
    """
    args = parser.parse_args()
    if args.smoke:
        for key, value in smoke.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        log(f"smoke run: {', '.join(f'{k}={v}' for k, v in smoke.items())} (figures are not meaningful)")
    return args


def skipped_tool(tool: str) -> str | None:
    """None when the reference tool `tool` is on PATH, else the reason the part using it is skipped."""
    if shutil.which(tool) is not None:
        return None
    reason = f"skipped: {tool} not installed"
    log(reason)
    return reason


@contextlib.contextmanager
def workdir(parent: Path | None, keep: bool, prefix: str) -> Iterator[Path]:
    """A fresh temporary folder, removed afterwards unless `keep`."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    # A SIGTERM (run_all's timeout, a CI cancel) should still clean up: turn it into SystemExit.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield path
    finally:
        if keep:
            log(f"kept data in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "sha_ni": "sha_ni" in flags,
        # Other work on the box skews the parallel (jobs=2) figures most: keep the context.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def check(name: str, value: float, op: str, target: float, unit: str = "") -> dict[str, Any]:
    """One figure with a target, for the run_all table."""
    compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, ">": float.__gt__, "==": float.__eq__}
    ok = compare[op](float(value), float(target))
    return {"name": name, "value": value, "target": f"{op} {target}{(' ' + unit) if unit else ''}", "unit": unit,
            "ok": bool(ok)}


# Starts a command and reports its exact peak RSS (wait4's ru_maxrss). A launcher, not this process:
# Linux carries the parent's peak into a child's ru_maxrss across fork + exec, so a child spawned
# straight from a benchmark that holds data could never report less than the benchmark's own peak.
LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kib": ru.ru_maxrss}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def peak_rss_mib(cmd: list[str], usage: Path) -> float:
    """Run `cmd` (cmd[0] a full path) under the launcher; return its peak RSS in MiB, or fail loudly."""
    import subprocess

    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} gave exit {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(usage.read_text())["maxrss_kib"] / 1024


def emit(doc: dict[str, Any]) -> None:
    """Print the one JSON line of figures on stdout."""
    doc.setdefault("machine", machine())
    doc.setdefault("timestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    sys.stdout.write(json.dumps(doc, sort_keys=False) + "\n")
    sys.stdout.flush()


def drop_logging_noise() -> None:
    """Keep the library's INFO logs off stderr so the summary stays readable."""
    import logging

    logging.getLogger("auditor").setLevel(logging.WARNING)


# ------------------------------------------------------------------ checkpoint builders

def write_safetensors(path: Path, sizes: list[int], data: Any, first_layer: int = 0,
                      rows: int = 1024) -> list[tuple[str, tuple[int, ...]]]:
    """Write a valid safetensors file of F32 tensors of the given byte sizes; `data(n)` returns n bytes.

    Written directly (8-byte length, JSON header padded to 8, data) so that tensors can come from a
    repeated random block without holding a whole shard in memory. Returns (name, shape) per tensor.
    """
    import json

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    out: list[tuple[str, tuple[int, ...]]] = []
    for i, n in enumerate(sizes):
        count = n // 4
        shape = (rows, count // rows) if count % rows == 0 else (count,)
        name = f"model.layers.{first_layer + i}.weight"
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + count * 4]}
        out.append((name, shape))
        offset += count * 4
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in sizes:
            f.write(data(n - n % 4))
    return out


def write_training_state(folder: Path, step: int, shapes: list[tuple[int, ...]], fill: Any = None) -> None:
    """Write what a Hugging Face Trainer saves beside the weights, with real torch objects.

    optimizer.pt: an AdamW state_dict with `exp_avg` and `exp_avg_sq` of each shape in `shapes`
    (so it weighs twice the weights); `fill(t)` fills each tensor in place (default: zeros + step).
    scheduler.pt: a real LambdaLR state_dict at `step`; rng_state.pth: python, numpy and torch CPU RNG
    states; trainer_state.json with `global_step`.
    """
    import json
    import random

    import numpy as np
    import torch

    state = {}
    for i, shape in enumerate(shapes):
        avg, sq = torch.empty(shape), torch.empty(shape)
        for t in (avg, sq):
            if fill is None:
                t.fill_(i * 1e-3)
            else:
                fill(t)
        state[i] = {"step": torch.tensor(float(step)), "exp_avg": avg, "exp_avg_sq": sq}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
               "foreach": None, "maximize": False, "capturable": False, "differentiable": False, "fused": None,
               "params": list(range(len(shapes)))}]
    torch.save({"state": state, "param_groups": groups}, folder / "optimizer.pt")
    del state
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([dummy], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched_state = sched.state_dict()
    sched_state.pop("lr_lambdas", None)
    sched_state["last_epoch"] = step
    sched_state["_step_count"] = step + 1
    torch.save(sched_state, folder / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def tensor_sizes(total: int, max_tensor: int) -> list[int]:
    """Split `total` bytes into tensors of at most `max_tensor` bytes (multiples of 4)."""
    sizes = []
    left = total - total % 4
    while left > 0:
        n = min(max_tensor, left)
        sizes.append(n)
        left -= n
    return sizes
