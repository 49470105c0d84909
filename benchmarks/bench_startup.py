"""Fixed cost of one `dataprune score`: time to the first batch, and its parts.

    python benchmarks/bench_startup.py [--repeats 7] [--model resnet18]

On the built-in demo data (`dataprune demo`, 1000 CIFAR-like 32-px images) and a randomly
initialised checkpoint saved as safetensors, runs

    dataprune score DEMO --metric loss --epochs 0 --checkpoint X.safetensors --out OUT

as a fresh process, `--repeats` times (each into a new OUT, so no cache of an earlier run helps),
alternating with the limit measured in the same run: a bare `python -c "import torch, timm"` (spawn
to the end of the import; the exit of a process holding torch, ~0.5 s, is left out of both). The
child times its phases with perf_counter around the functions that do them (wrapped here, not in
the library) and the first batch's arrival at the model and its forward pass. Prints the median of
each part, and the time to the first batch beside the bare import: dataprune's own fixed cost is
the difference (target < 1 s; torch + timm's import — timm imports torchvision, which imports
torch._dynamo — is the floor no change here can lower).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median  # noqa: E402

PHASES = [  # (label, module, function) wrapped in the child; seconds are summed per label
    ("list shards", "dataprune.sources.webdataset", "WebDatasetSource.list_shards"),
    ("checkpoint header", "dataprune.models", "checkpoint_shapes"),
    ("checkpoint hash", "dataprune.models", "file_sha256"),
    ("checkpoint hash", "dataprune.models", "checkpoint_sha256"),
    ("peek image size", "dataprune.engine.planning", "peek_shape"),
    ("model + weights (meta model of the plan, scoring model)", "dataprune.models", "create_model"),
    ("plan (all of it)", "dataprune.engine.scoring", "plan"),
    ("device", "dataprune.engine.scoring", "_setup_device"),
    ("output checks + metadata", "dataprune.engine.scoring", "check_out"),
    ("output checks + metadata", "dataprune.engine.scoring", "init_out"),
    ("scoring model", "dataprune.engine.scoring", "_models"),
]


def _wrap(rec: dict, label: str, mod: str, qual: str) -> None:
    import importlib

    try:
        owner = importlib.import_module(mod)
    except ImportError:
        return
    *path, name = qual.split(".")
    for p in path:
        owner = getattr(owner, p, None)
        if owner is None:
            return
    fn = getattr(owner, name, None)
    if fn is None:
        return

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            rec[label] = rec.get(label, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)


def child(argv: list[str], t_spawn: float) -> None:
    """Run the CLI in this process with timers around its phases; print them as JSON on stderr's last line."""
    rec: dict[str, float] = {"python start": time.time() - t_spawn}
    t = time.perf_counter()
    from dataprune.cli import main as cli_main  # what the console script imports first

    rec["import dataprune.cli"] = time.perf_counter() - t
    t = time.perf_counter()
    import timm  # noqa: F401  (imported by the command anyway; timed apart so the rest is dataprune's own)
    import torch  # noqa: F401

    rec["import torch, timm"] = time.perf_counter() - t
    t = time.perf_counter()
    import dataprune.engine.scoring as scoring

    rec["import dataprune.engine"] = time.perf_counter() - t
    for label, mod, qual in PHASES:
        _wrap(rec, label, mod, qual)
    made = scoring._batch_values
    t_main = time.perf_counter()
    marks: dict[str, float] = {}

    def batch_values(*a, **k):
        compute = made(*a, **k)
        marks.setdefault("stream start", time.perf_counter())

        def first(batch):
            marks.setdefault("first batch in", time.perf_counter())
            out = compute(batch)
            marks.setdefault("first batch out", time.perf_counter())
            return out

        return first

    scoring._batch_values = batch_values
    sys.argv = ["dataprune", *argv]
    try:
        cli_main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    t_end = time.perf_counter()
    rec["until stream start"] = marks["stream start"] - t_main
    rec["first batch: wait for data"] = marks["first batch in"] - marks["stream start"]
    rec["first batch: forward"] = marks["first batch out"] - marks["first batch in"]
    rec["total to first batch"] = rec["python start"] + (marks["first batch in"] - t_main) + sum(
        rec[k] for k in ("import dataprune.cli", "import torch, timm", "import dataprune.engine"))
    rec["whole command"] = rec["python start"] + (t_end - t_main) + sum(
        rec[k] for k in ("import dataprune.cli", "import torch, timm", "import dataprune.engine"))
    print("\n" + json.dumps(rec), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        return child(a.child[1:], float(a.child[0]))

    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.demo import make_demo

    tmp = tempfile.mkdtemp(prefix="bench-startup-")
    data = os.path.join(tmp, "demo")
    make_demo(data)
    ck = os.path.join(tmp, f"{a.model}.safetensors")
    torch.manual_seed(0)
    m = timm.create_model(a.model, num_classes=10)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, ck)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {a.model} checkpoint {os.path.getsize(ck) / 2**20:.0f} MiB; demo data")

    def bare() -> float:
        """Spawn to the end of `import torch, timm` (the process's exit, ~0.5 s with torch loaded, is
        left out, as it is from the time to the first batch)."""
        t = time.time()
        r = subprocess.run([sys.executable, "-c", "import time, torch, timm; print(repr(time.time()))"], check=True,
                           capture_output=True, text=True)
        return float(r.stdout) - t

    def one(out: str) -> dict:
        cmd = [sys.executable, __file__, "--child", repr(time.time()), "score", data, "--metric", "loss", "--epochs", "0",
               "--checkpoint", ck, "--model", a.model, "--device", "cpu", "--out", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        return json.loads(r.stderr.strip().splitlines()[-1])

    bare(), one(os.path.join(tmp, "warm-up"))  # page cache, .pyc files
    runs, imports = [], []
    for i in range(a.repeats):
        imports.append(bare())
        out = os.path.join(tmp, f"out-{i}")
        runs.append(one(out))
        print(f"  run {i + 1}/{a.repeats}: first batch after {runs[-1]['total to first batch']:.2f}s; bare import "
              f"{imports[-1]:.2f}s", flush=True)
    keys = list(runs[0])
    print(f"\n{'part (median of ' + str(a.repeats) + ' runs)':40s} seconds")
    for k in keys:
        if k in ("total to first batch", "whole command"):
            continue
        print(f"  {k:38s} {median([r.get(k, 0.0) for r in runs]):6.3f}")
    first = median([r["total to first batch"] for r in runs])
    imp = median(imports)
    own = median([r["total to first batch"] - b for r, b in zip(runs, imports)])
    print(f"time to first batch:            {first:6.2f} s (median; whole command {median([r['whole command'] for r in runs]):.2f} s)")
    print(f"bare `python -c 'import torch, timm'`: {imp:6.2f} s (the limit, same run)")
    print(f"dataprune's own fixed cost:     {own:6.2f} s (median of per-run differences; target < 1 s)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
