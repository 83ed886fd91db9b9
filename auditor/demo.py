"""Seed a small demo prefix of real checkpoints, one of them damaged, for `make run`."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from auditor import api


def seed(root: Path, *, steps: tuple[int, ...] = (100, 200, 300), runs: tuple[str, ...] = ("run-a", "run-b")) -> Path:
    """Write sealed Hugging Face-style checkpoints under `root`, flip one bit in one; return the damaged file."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    if root.exists():
        shutil.rmtree(root)
    for run in runs:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
        for step in range(1, max(steps) + 1):
            loss = model(torch.randn(8, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step not in steps:
                continue
            d = root / run / f"checkpoint-{step}"
            d.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
            torch.save(opt.state_dict(), d / "optimizer.pt")
            torch.save(sched.state_dict(), d / "scheduler.pt")
            torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                        "cpu": torch.random.get_rng_state()}, d / "rng_state.pth")
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            api.seal(str(d))
    damaged = root / runs[-1] / f"checkpoint-{steps[1]}" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) - 17] ^= 0x10  # bit rot inside a weight tensor, size unchanged
    damaged.write_bytes(bytes(data))
    return damaged


DEMO_CONFIG = """\
# Written by `make run`: the embedded default, local storage and SQLite state.
state:
  url: sqlite:///{state}
server:
  listen: {listen}
scan:
  shallow_interval: 30s
  deep_interval: 10m
  probe_interval: 1h
  settle_time: 0s
  jobs: 2
prefixes:
  - url: {prefix}
"""


def write_config(path: Path, prefix: Path, listen: str = "127.0.0.1:9180") -> Path:
    """Write the demo daemon's config: the demo prefix, SQLite state beside it."""
    path.write_text(DEMO_CONFIG.format(state=(path.parent / "state.db").resolve(), listen=listen,
                                       prefix=prefix.resolve()))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--config-out", type=Path, default=None, help="Also write a daemon config here.")
    parser.add_argument("--listen", default="127.0.0.1:9180")
    args = parser.parse_args()
    damaged = seed(args.root)
    print(f"seeded {args.root}; damaged {damaged}")
    if args.config_out:
        write_config(args.config_out, args.root, args.listen)
        print(f"daemon config: {args.config_out}; status page at http://{args.listen}/, metrics at "
              f"http://{args.listen}/metrics")


if __name__ == "__main__":
    main()
