#!/usr/bin/env python
"""Probe tier on a ~100 M-parameter model: time and peak RSS of the probe child against plain PyTorch.

A GPT-2 built from a transformers config (n_layer=9, n_embd=768: ~103 M parameters, float32, random
weights; nothing downloaded) is saved with safetensors as one file, `model.safetensors`, and sealed
with a probe (auditor.api.seal(..., model_factory="bench_probe_model:build", probe_batch=16 x --seq-len
token ids; the outputs are the logits, 16 x seq-len x 50257 float32)). The factory lives in a small
module written to the work folder, which is put on PYTHONPATH so that the probe child
(`python -m auditor.probe.child`) can import it.

Then, in a driver process that never imports torch, --repeats alternating rounds of:

  probe      auditor.probe.Prober(...).check(reader, checkpoint, manifest): the probe step alone (no digests):
             start the child, build, load strictly, run the batch, digest and sample the outputs, compare.
             As verification does: the factory's parameters on the meta device, the safetensors file
             mapped in as the weights, the batch in the micro-batches the seal recorded (one sample
             each here), each one's logits hashed and sampled as they come.
  reference  a fresh interpreter started the same way as the child (same environment: no GPU,
             OMP_NUM_THREADS and torch.set_num_threads = the probe's thread count, deterministic
             algorithms): import torch, build the model with the same factory, safetensors.torch.load_file,
             load_state_dict, eval, the same batch under inference_mode.

ratio = probe seconds / reference seconds (medians), target <= 1.5. Cross-check: `verify --tier probe`
minus `verify --tier content` of the same checkpoint ("digests excluded"), timed in the same rounds.

Peak RSS: each child (probe and reference) is started through a tiny launcher (`python -S`) that reaps
it with wait4(), whose ru_maxrss is that child's exact peak (no polling). Figure: probe child peak RSS /
weights bytes on disk, target <= 2. RSS counts the pages of the memory-mapped weights file that the
child touched, as the kernel does.

    python benchmarks/bench_probe.py                       # ~103 M parameters, 16 x 64 tokens
    python benchmarks/bench_probe.py --seq-len 128         # full size: 16 x 128 tokens (logits 393 MiB)
    python benchmarks/bench_probe.py --layers 12           # GPT-2 small (124 M)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    MiB,
    base_parser,
    check,
    drop_logging_noise,
    emit,
    human_bytes,
    log,
    parse_args,
    workdir,
)

TARGET_TIME_RATIO = 1.5
TARGET_RSS_RATIO = 2.0
FACTORY = "bench_probe_model:build"

MODEL_MODULE = '''"""Model factory for bench_probe.py: a GPT-2 from a config, random weights, nothing downloaded."""


def build(n_layer=9, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, use_cache=False)
    return GPT2LMHeadModel(config)
'''

# What a user would write to run the batch: the reference. Started exactly like the probe child.
REFERENCE = r'''
import importlib, json, sys, time
started = time.perf_counter()
marks = []
def mark(label):
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    mib = lambda key: round(int(status[key].split()[0]) / 1024, 1)
    marks.append({"step": label, "t": round(time.perf_counter() - started, 3), "rss_mib": mib("VmRSS"),
                  "hwm_mib": mib("VmHWM"), "anon_mib": mib("RssAnon"), "file_mib": mib("RssFile")})
req = json.loads(sys.stdin.read())
import torch
from safetensors.torch import load_file
torch.set_num_threads(int(req["threads"]))
torch.use_deterministic_algorithms(True, warn_only=True)
torch.manual_seed(0)
module, _, name = req["factory"].partition(":")
factory = getattr(importlib.import_module(module), name)
mark("imports")
model = factory(**req["kwargs"])
mark("model built")
state = load_file(req["weights"])
mark("load_file")
missing, unexpected = model.load_state_dict(state, strict=False)
mark("load_state_dict")
by_ptr = {}
for k, v in model.state_dict().items():
    by_ptr.setdefault(v.data_ptr(), []).append(k)
tied = {k for names in by_ptr.values() if len(names) > 1 for k in names}  # saved once by save_model
assert not unexpected and set(missing) <= tied, (missing, unexpected)
model.eval()
batch = load_file(req["batch"])
with torch.inference_mode():
    out = model(**batch)
logits = out.logits if hasattr(out, "logits") else out
mark("forward")
print(json.dumps({"shape": list(logits.shape), "seconds": time.perf_counter() - started, "marks": marks}))
'''

# The probe child's own code, run once more with marks at its steps (time, VmRSS, VmHWM, anonymous
# and file-backed resident memory) to say where its time and memory go. Diagnostic only: it wraps
# auditor.probe.child internals (_build, _load_weights, _fill, _run_batch) and reports nothing if
# they moved. It runs the request of the probe step's last child (the meta build, when it matched).
BREAKDOWN = r'''
import json, sys, time
started = time.perf_counter()
marks = []
def mark(label):
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    mib = lambda key: round(int(status[key].split()[0]) / 1024, 1)
    marks.append({"step": label, "t": round(time.perf_counter() - started, 3), "rss_mib": mib("VmRSS"),
                  "hwm_mib": mib("VmHWM"), "anon_mib": mib("RssAnon"), "file_mib": mib("RssFile")})
req = json.loads(sys.stdin.read())
import auditor.probe.child as P
import safetensors.torch as st
import torch
mark("imports (torch, auditor.probe.child)")
def marked(name, label):
    inner = getattr(P, name)
    def wrapper(*a, **k):
        out = inner(*a, **k)
        mark(label(a, out) if callable(label) else label)
        return out
    setattr(P, name, wrapper)
resolve = P.resolve_factory
def resolve_factory(spec, allowed):
    factory = resolve(spec, allowed)
    def build(**kw):
        mark("factory imported")
        return factory(**kw)
    return build
P.resolve_factory = resolve_factory
marked("_build", lambda a, out: f"model built (factory, {'meta' if a[2] else 'real'} parameters)")
marked("_load_weights", "safe_open + header + copy-on-write map")
marked("_fill", lambda a, out: f"weights in ({'mapped' if a[2] else 'copied'})")
marked("_run_batch", lambda a, out: f"forward + sha256 + sample, micro-batches {out[1] or 'none (whole batch)'}")
save = st.save_file
def save_file(*a, **k):
    save(*a, **k)
    mark("save reference values")
st.save_file = save_file
result = P.forward(req)
mark("done")
print(json.dumps({"marks": marks, "sha256": result.get("sha256")}))
'''

# Starts the measured command and reports its exact peak RSS and wall time (wait4).
LAUNCHER = """
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kib": ru.ru_maxrss, "seconds": seconds, "majflt": ru.ru_majflt,
               "launcher_hwm_kib": int(next(line.split()[1] for line in open("/proc/self/status")
                                            if line.startswith("VmHWM:")))}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


# ------------------------------------------------------------------ prepare (a child: torch stays out of here)


def prepare(folder: Path, kwargs: dict[str, Any], seq_len: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import save_model

    import auditor.api

    torch.manual_seed(0)
    from bench_probe_model import build

    t0 = time.perf_counter()
    model = build(**kwargs)
    params = sum(p.numel() for p in model.parameters())
    weights = folder / "model.safetensors"
    save_model(model, str(weights))  # the tied lm_head is stored once
    del model
    built = time.perf_counter() - t0
    batch = {"input_ids": torch.randint(0, kwargs.get("vocab_size", 50257), (16, seq_len),
                                        generator=torch.Generator().manual_seed(1))}
    t1 = time.perf_counter()
    manifest = auditor.api.seal(str(weights), step=1000, model_factory=FACTORY, model_kwargs=kwargs, probe_batch=batch)
    sealed = time.perf_counter() - t1
    assert manifest.probe is not None
    return {"parameters": params, "weights_bytes": weights.stat().st_size, "build_save_seconds": round(built, 2),
            "seal_seconds": round(sealed, 2), "output_shape": manifest.probe.outputs.shape,
            "threads": int(getattr(manifest.probe, "threads", None) or 4)}


# ------------------------------------------------------------------ driver (a child that never imports torch)


def driver(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess as sp

    import auditor.api
    from auditor import probe
    from auditor.storage import Reader, open_url
    from auditor.verify import load_manifest, locate

    tmp = Path(spec["tmp"])
    url = spec["url"]
    counter = iter(range(10**6))
    last: dict[str, Any] = {}

    def launched(cmd: list[str], name: str) -> list[str]:
        usage = tmp / f"{name}-{next(counter)}.rusage"
        last["usage"] = usage
        return [sys.executable, "-S", "-c", LAUNCHER, str(usage), *cmd]

    class Subprocess:
        """auditor.probe.runner's view of `subprocess`: the same run(), with the child started by the launcher."""

        TimeoutExpired = sp.TimeoutExpired
        CalledProcessError = sp.CalledProcessError
        DEVNULL = sp.DEVNULL

        @staticmethod
        def Popen(cmd: list[str], **kw: Any) -> Any:  # noqa: N802 - stands in for subprocess.Popen
            # The sandboxed child reads its request from the file named last on its command line.
            last["request"], last["env"] = Path(cmd[-1]).read_text(), kw.get("env")
            return sp.Popen(launched(list(cmd), "probe"), **kw)

    probe.runner.subprocess = Subprocess  # type: ignore[attr-defined, assignment]

    def usage() -> dict[str, Any]:
        return json.loads(Path(last.pop("usage")).read_text())

    fs, path = open_url(url)
    reader = Reader(fs)
    ck = locate(reader, path, url)
    manifest = load_manifest(reader, ck)
    assert manifest.probe is not None
    threads = int(getattr(manifest.probe, "threads", None) or probe.DEFAULT_THREADS)
    hook = probe.Prober.allowing([manifest.probe.model.factory]).check  # the benchmark's own factory
    root = os.path.dirname(path)
    request = json.dumps({"factory": manifest.probe.model.factory, "kwargs": manifest.probe.model.kwargs,
                          "weights": os.path.join(root, ck.name), "threads": threads,
                          "batch": os.path.join(root, manifest.probe.batch.path)})

    def reference(n_threads: int) -> dict[str, Any]:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(n_threads)}
        req = json.loads(request)
        req["threads"] = n_threads
        started = time.perf_counter()
        proc = sp.run(launched([sys.executable, "-c", REFERENCE], "reference"), input=json.dumps(req),
                      capture_output=True, text=True, env=env, check=False)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench_probe: the reference failed: {proc.stderr[-2000:]}")
        ru = usage()
        inner = json.loads(proc.stdout)
        return {"seconds": seconds, "child_seconds": ru["seconds"], "peak_rss_mib": ru["maxrss_kib"] / 1024,
                "launcher_rss_mib": ru["launcher_hwm_kib"] / 1024, "inner_seconds": inner["seconds"],
                "marks": inner["marks"]}

    def probe_step() -> dict[str, Any]:
        started = time.perf_counter()
        findings = hook(reader, ck, manifest)
        seconds = time.perf_counter() - started
        if any(f.severity == "error" for f in findings):
            raise SystemExit(f"bench_probe: probe gave {[f.to_dict() for f in findings]}")
        ru = usage()
        return {"seconds": seconds, "child_seconds": ru["seconds"], "peak_rss_mib": ru["maxrss_kib"] / 1024,
                "findings": [f.code for f in findings]}

    def verify(tier: str) -> float:
        started = time.perf_counter()
        result = auditor.api.verify_url(url, tier=tier, allow_factories=[FACTORY])
        seconds = time.perf_counter() - started
        v = result.verdicts[0]
        if v.status != "ok":
            raise SystemExit(f"bench_probe: verify --tier {tier} gave {v.status}: {v.to_dict()['findings']}")
        if tier == "probe":
            usage()
        return seconds

    rounds: list[dict[str, Any]] = []
    if not spec["smoke"]:  # a smoke run measures nothing, so it skips the warm-up (one torch child less)
        reference(threads)  # warm the page cache and the imports' files; not counted
    for r in range(spec["repeats"]):
        row: dict[str, Any] = {}
        if r % 2 == 0:
            row["reference"] = reference(threads)
            row["probe"] = probe_step()
        else:
            row["probe"] = probe_step()
            row["reference"] = reference(threads)
        row["verify_probe"] = verify("probe")
        row["verify_content"] = verify("content")
        if spec["reference_all_cores"] and threads != os.cpu_count():
            row["reference_cores"] = reference(os.cpu_count() or 1)
        rounds.append(row)
        log(f"round {r + 1}: probe step {row['probe']['seconds']:.2f}s (child {row['probe']['child_seconds']:.2f}s, "
            f"{row['probe']['peak_rss_mib']:.0f} MiB) | reference {row['reference']['seconds']:.2f}s "
            f"({row['reference']['peak_rss_mib']:.0f} MiB) | verify probe {row['verify_probe']:.2f}s - content "
            f"{row['verify_content']:.2f}s = {row['verify_probe'] - row['verify_content']:.2f}s"
            + (f" | reference at {os.cpu_count()} threads {row['reference_cores']['seconds']:.2f}s"
               if "reference_cores" in row else ""))
    # The import floor: what the child holds before any model exists (interpreter, torch, transformers'
    # GPT-2 classes, auditor.probe.child). Peak minus floor is what the probe itself adds.
    floor_code = ("import torch, auditor.probe.child, bench_probe_model; "
                  "from transformers import GPT2Config, GPT2LMHeadModel")
    proc = sp.run(launched([sys.executable, "-c", floor_code], "floor"), env=last["env"], capture_output=True,
                  text=True, check=False)
    floor_mib = usage()["maxrss_kib"] / 1024 if proc.returncode == 0 else None
    breakdown = None
    try:
        request = json.loads(last["request"])
        request["out"] = str(tmp / "breakdown-values.safetensors")  # the hook's own out folder is gone
        proc = sp.run([sys.executable, "-c", BREAKDOWN], input=json.dumps(request), env=last["env"],
                      capture_output=True, text=True, check=False)
        breakdown = json.loads(proc.stdout)["marks"] if proc.returncode == 0 else None
        if breakdown is None:
            log(f"(no breakdown: {proc.stderr[-500:]})")
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        log(f"(no breakdown: {type(e).__name__}: {e})")
    return {"threads": threads, "rounds": rounds, "breakdown": breakdown, "import_floor_mib": floor_mib}


# ------------------------------------------------------------------ main


def run_json(cmd: list[str], env: dict[str, str], what: str, stdin: str | None = None) -> dict[str, Any]:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench_probe: {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("_prepare", "_driver"):
        drop_logging_noise()
        spec = json.loads(sys.stdin.read())
        sys.path.insert(0, spec["tmp"])
        if sys.argv[1] == "_prepare":
            doc = prepare(Path(spec["tmp"]) / "ckpt", spec["kwargs"], spec["seq_len"])
        else:
            doc = driver(spec)
        print(json.dumps(doc))
        return
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=9, help="GPT-2 n_layer (default 9: ~103 M parameters)")
    p.add_argument("--embd", type=int, default=768, help="GPT-2 n_embd (default 768)")
    p.add_argument("--seq-len", type=int, default=64,
                   help="tokens per probe sample (default 64; full size 128); 16 samples")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians are reported")
    p.add_argument("--no-reference-all-cores", dest="reference_all_cores", action="store_false",
                   help="skip the extra reference run at os.cpu_count() threads")
    # Smoke: a one-layer, 64-wide GPT-2 (still a 50k vocabulary: the logits path the RSS figure is about).
    args = parse_args(p, layers=1, embd=64, seq_len=8, repeats=1, reference_all_cores=False)
    kwargs = {"n_layer": args.layers, "n_embd": args.embd, "n_head": max(1, args.embd // 64)}
    with workdir(args.workdir, args.keep, "bench-probe-") as tmp:
        (tmp / "bench_probe_model.py").write_text(MODEL_MODULE)
        (tmp / "ckpt").mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}
        spec = {"tmp": str(tmp), "kwargs": kwargs, "seq_len": args.seq_len, "repeats": args.repeats,
                "url": str(tmp / "ckpt" / "model.safetensors"), "reference_all_cores": args.reference_all_cores,
                "smoke": args.smoke}
        script = [sys.executable, str(Path(__file__).resolve())]
        t0 = time.perf_counter()
        prep = run_json(script + ["_prepare"], env, "building and sealing the model", json.dumps(spec))
        log(f"built a GPT-2 of {prep['parameters'] / 1e6:.1f} M parameters ({human_bytes(prep['weights_bytes'])} "
            f"safetensors) in {prep['build_save_seconds']:.1f}s and sealed it with a probe of 16 x {args.seq_len} "
            f"tokens (outputs {prep['output_shape']}) in {prep['seal_seconds']:.1f}s")
        res = run_json(script + ["_driver"], env, "the measurements", json.dumps(spec))
        setup = time.perf_counter() - t0
    rounds = res["rounds"]

    def med(get: Any) -> float:
        return statistics.median(get(r) for r in rounds)

    probe_s = med(lambda r: r["probe"]["seconds"])
    ref_s = med(lambda r: r["reference"]["seconds"])
    probe_child = med(lambda r: r["probe"]["child_seconds"])
    ref_child = med(lambda r: r["reference"]["child_seconds"])
    diff_s = med(lambda r: r["verify_probe"] - r["verify_content"])
    probe_rss = max(r["probe"]["peak_rss_mib"] for r in rounds)
    ref_rss = max(r["reference"]["peak_rss_mib"] for r in rounds)
    weights_mib = prep["weights_bytes"] / MiB
    ratio = probe_s / ref_s
    rss_ratio = probe_rss / weights_mib
    doc: dict[str, Any] = {
        "benchmark": "probe",
        "loadavg_end": os.getloadavg(),
        "parameters": prep["parameters"],
        "weights_bytes": prep["weights_bytes"],
        "probe_batch": [16, args.seq_len],
        "output_shape": prep["output_shape"],
        "threads": res["threads"],
        "repeats": args.repeats,
        "probe_seconds": round(probe_s, 3),
        "reference_seconds": round(ref_s, 3),
        "ratio_probe_vs_reference": round(ratio, 3),
        "probe_child_seconds": round(probe_child, 3),
        "reference_child_seconds": round(ref_child, 3),
        "ratio_child_only": round(probe_child / ref_child, 3),
        "verify_probe_minus_content_seconds": round(diff_s, 3),
        "ratio_digests_excluded_vs_reference": round(diff_s / ref_s, 3),
        "verify_content_seconds": round(med(lambda r: r["verify_content"]), 3),
        "probe_child_peak_rss_mib": round(probe_rss, 1),
        "reference_peak_rss_mib": round(ref_rss, 1),
        "ratio_probe_rss_vs_weights": round(rss_ratio, 3),
        "ratio_reference_rss_vs_weights": round(ref_rss / weights_mib, 3),
        "ratio_probe_rss_vs_reference": round(probe_rss / ref_rss, 3),
        "import_floor_rss_mib": round(res["import_floor_mib"], 1) if res.get("import_floor_mib") else None,
        "ratio_probe_rss_above_floor_vs_weights": round((probe_rss - res["import_floor_mib"]) / weights_mib, 3)
        if res.get("import_floor_mib") else None,
        "ratio_reference_rss_above_floor_vs_weights": round((ref_rss - res["import_floor_mib"]) / weights_mib, 3)
        if res.get("import_floor_mib") else None,
        "seal_seconds": prep["seal_seconds"],
        "setup_seconds": round(setup, 1),
        "rounds": rounds,
        "checks": [
            check("probe step time / plain PyTorch load+forward", round(ratio, 3), "<=", TARGET_TIME_RATIO),
            check("probe child peak RSS / weights on disk", round(rss_ratio, 3), "<=", TARGET_RSS_RATIO),
        ],
    }
    doc["probe_child_steps"] = res.get("breakdown")
    doc["reference_steps"] = rounds[-1]["reference"].get("marks")
    if "reference_cores" in rounds[0]:
        doc["reference_all_cores_seconds"] = round(med(lambda r: r["reference_cores"]["seconds"]), 3)
    log(f"probe tier, GPT-2 {prep['parameters'] / 1e6:.1f} M parameters, {human_bytes(prep['weights_bytes'])} "
        f"weights, batch 16 x {args.seq_len}, {res['threads']} threads, median of {args.repeats}:\n"
        f"  probe step (hook: child + compare)   {probe_s:6.2f}s   (child alone {probe_child:.2f}s)\n"
        f"  reference (torch load + forward)    {ref_s:6.2f}s   (child alone {ref_child:.2f}s)\n"
        f"  ratio {ratio:.2f} (target <= {TARGET_TIME_RATIO}) {'OK' if ratio <= TARGET_TIME_RATIO else 'MISSED'}; "
        f"digests excluded (verify probe - verify content) {diff_s:.2f}s -> {diff_s / ref_s:.2f}\n"
        + (f"  reference at {os.cpu_count()} threads: {doc['reference_all_cores_seconds']:.2f}s\n"
           if "reference_all_cores_seconds" in doc else "")
        + f"  peak RSS: probe child {probe_rss:.0f} MiB = {rss_ratio:.2f} x weights (target <= {TARGET_RSS_RATIO}) "
        f"{'OK' if rss_ratio <= TARGET_RSS_RATIO else 'MISSED'}; reference {ref_rss:.0f} MiB = "
        f"{ref_rss / weights_mib:.2f} x weights"
        + (f"\n  above the import floor ({doc['import_floor_rss_mib']:.0f} MiB: python, torch, transformers' GPT-2, "
           f"auditor.probe.child): probe {doc['ratio_probe_rss_above_floor_vs_weights']:.2f} x weights, reference "
           f"{doc['ratio_reference_rss_above_floor_vs_weights']:.2f} x" if doc.get("import_floor_rss_mib") else ""))
    for title, steps in (("probe child (python -m auditor.probe.child), instrumented run", doc["probe_child_steps"]),
                         ("reference", doc["reference_steps"])):
        if not steps:
            continue
        rows = [f"  where the {title}'s time and memory go (MiB; hwm = peak so far; anon / file-backed resident):"]
        prev = 0.0
        for m in steps:
            rows.append(f"    {m['t']:7.2f}s (+{m['t'] - prev:5.2f}s)  "
                        f"rss {m['rss_mib']:7.0f}  hwm {m['hwm_mib']:7.0f}  "
                        f"anon {m['anon_mib']:7.0f}  file {m['file_mib']:6.0f}  {m['step']}")
            prev = m["t"]
        log("\n".join(rows))
    emit(doc)


if __name__ == "__main__":
    main()
