"""What each command prints: rich tables and one-line summaries of a command's result (a dict).

Library code never prints; the CLI calls one function here per command.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def console(stderr: bool = False):
    """A rich console on stdout (or stderr); a closed pipe raises BrokenPipeError, which the CLI turns
    into a quiet exit 0 (rich's own handler would exit 1)."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError

    return _Console(stderr=stderr, highlight=False, soft_wrap=True)


def err_console():
    return console(stderr=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _problems(r: dict) -> str:
    """`` · skipped a=1, b=2 · N damaged shard(s): …`` for a result with skips and shard errors."""
    msg = ""
    if r["skipped"]:
        msg += " · skipped " + ", ".join(f"{k}={v}" for k, v in r["skipped"].items())
    if r.get("shard_errors"):
        msg += f" · {len(r['shard_errors'])} damaged shard(s): " + "; ".join(e["error"] for e in r["shard_errors"][:3])
    return msg


def info(r: dict) -> None:
    from rich.table import Table

    c = console()
    t = Table("dataset", r["path"], title=None)
    t.add_row("format", r["format"])
    t.add_row("shards", str(r["shards"]))
    t.add_row("samples", f"{r['samples']} ({r['ok']} ok, {r['skipped']} with problems)")
    t.add_row("bytes", human(r["bytes"]))
    t.add_row("classes", str(len(r["classes"])) + (f" (+{r['unlabelled']} unlabelled)" if r["unlabelled"] else ""))
    if r.get("documents"):
        t.add_row("documents", f"{r['documents']} (text; each read as UTF-8)")
    if r.get("documents") != r["ok"] or not r["ok"]:  # images to decode
        t.add_row("decoded", "every image" if r["checked"] else "no (use --check)")
    if r.get("unread_documents"):
        t.add_row("text", f"{r['unread_documents']} sample(s) without an image hold a .txt/.json document: "
                          "add --text-column text to read them as text")
    c.print(t)
    if r["classes"]:
        ct = Table("label", "class", "count")
        for row in r["classes"][:50]:
            ct.add_row(str(row["label"]), row["name"] or "", str(row["count"]))
        if len(r["classes"]) > 50:
            ct.add_row("…", f"{len(r['classes']) - 50} more", "")
        c.print(ct)
    if r["problems"]:
        pt = Table("reason", "count", title="problems")
        for k, v in r["problems"].items():
            pt.add_row(k, str(v))
        c.print(pt)
    if r["problems"] or r.get("shard_errors"):
        from rich.markup import escape

        for e in [s["error"] for s in r.get("shard_errors", [])][:5] + r["problem_examples"][:5]:
            c.print(f"  [dim]{escape(e)}[/]", markup=True)


def manifest(r: dict, out) -> None:
    msg = f"wrote {r['rows']} rows to {out}"
    if r["keys_missing"]:
        msg += f" ({r['keys_missing']} listed keys not found)"
    console().print(msg + _problems(r), markup=False)


def export(r: dict, out, to: str) -> None:
    secs = r["seconds"]["total"]
    msg = (f"exported {r['samples']} samples ({human(r['bytes'])}) to {out}/ as {to}: {len(r['files'])} file(s), "
           f"{r['samples'] / max(secs, 1e-9):.0f} samples/s" + (f" ({r['processes']} processes)" if r.get("processes", 1) > 1 else ""))
    console().print(msg + _problems(r), markup=False)


def score(r: dict, out) -> None:
    """The run's summary; every rate is that phase's samples over that phase's own time."""
    t, ph = r["timings"], r.get("phase_seconds") or {}
    secs = ph.get("score", r["seconds"])
    msg = (f"scored {r['scored']} of {r['seen']} samples ({', '.join(r['metrics'])}) in {secs:.1f}s"
           + (f" ({r['seen'] / secs:.0f} samples/s)" if secs > 0 and r["seen"] else "")
           + f"  [wait for data {t['read']:.1f}s · compute {t['compute']:.1f}s · write {t['write']:.1f}s]")
    tr = r.get("train")
    if tr and tr.get("epochs_trained"):
        msg += (f" · trained {tr['runs']} run(s) × {tr['epochs_trained']} epoch(s) × {tr['samples_per_epoch']} samples in "
                f"{tr['seconds']:.1f}s ({tr['samples'] / max(tr['seconds'], 1e-9):.0f} samples/s)")
    if ph.get("embed") and (r.get("phase_samples") or {}).get("embed"):
        msg += f" · embedded {r['phase_samples']['embed']} in {ph['embed']:.1f}s"
    text = r.get("text") or {}
    if ph.get("global"):
        msg += f" · {'global step' if text else 'clustering'} {ph['global']:.1f}s"
    if text.get("text_dedup"):
        d = text["text_dedup"]
        msg += (f" · text-dedup: {d['bands']} bands × {d['rows']} rows of {d['num_perm']} MinHash values (threshold "
                f"{d['threshold']}), {d.get('similar_pairs', 0)} of {d.get('candidate_pairs', 0)} candidate pairs similar, "
                f"{d.get('duplicates', 0)} duplicates")
    msg += f" · total {r['seconds']:.1f}s"
    if r["shards_done_before"]:
        msg += f" · {r['shards_done_before']} shard(s) were already done"
    if r["reasons"]:
        msg += " · skipped " + ", ".join(f"{k}={v}" for k, v in sorted(r["reasons"].items()))
    if r.get("reliability"):
        msg += " · reliability (Spearman, half vs half of runs): " + ", ".join(f"{k}={v}" for k, v in r["reliability"].items())
    console().print(msg, markup=False)
    kept = r.get("artifacts") or []
    if kept:
        what = ", ".join(f"{os.path.relpath(a['path'], str(out))} ({human(a['bytes'])}, {a['kind']})" for a in kept)
        console().print(f"kept beside the table: {what} — reusable; delete with rm when no longer needed", markup=False)


def score_where(r: dict, out) -> str:
    """Where a score run's table is and how to read it (the table's parts directory when it has one)."""
    from .scoretable import parts_dir

    return f"score table {parts_dir(str(out))}/ (parquet; e.g. polars.scan_parquet of that directory)"


def export_next(r: dict, out, to: str) -> str:
    """How the exported set is used next, by format."""
    files = sorted(f["name"] if isinstance(f, dict) else str(f) for f in r.get("files") or [])
    if to == "wds" and files:
        pattern = files[0] if len(files) == 1 else _brace(files)
        return f"train on it: webdataset.WebDataset({os.path.join(str(out), pattern)!r})"
    if to == "folder":
        return f"train on it: torchvision.datasets.ImageFolder({str(out)!r}, allow_empty=True)"
    if to == "parquet":
        return f"train on it: datasets.load_dataset('parquet', data_dir={str(out)!r})"
    return None


def _brace(files: list) -> str:
    """``pruned-{000000..000015}.tar`` for a run of numbered names, else the first name and a glob."""
    import re

    m = [re.fullmatch(r"(.*?)(\d+)(\.[^/]+)", os.path.basename(f)) for f in files]
    if all(m) and len({(x.group(1), x.group(3), len(x.group(2))) for x in m}) == 1:
        nums = sorted(int(x.group(2)) for x in m)
        if nums == list(range(nums[0], nums[0] + len(nums))):
            w = len(m[0].group(2))
            return f"{m[0].group(1)}{{{nums[0]:0{w}d}..{nums[-1]:0{w}d}}}{m[0].group(3)}"
    return os.path.basename(files[0]).rsplit("-", 1)[0] + "-*"


def select(r: dict, default_out: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    c, s, cfg = console(), r["summary"], r["config"]
    c.print("inputs: " + ", ".join(f"{escape(i['path'])} ({i['kind']})" for i in r["inputs"]) + f" · {s['rows']:,} rows")
    parts = s.get("parts")
    if parts and parts["shards"] > parts["finished"]:
        c.print(f"[yellow]note:[/] the score table is unfinished: {parts['finished']} of {parts['shards']} shards scored")
    for j in s["joins"]:
        if j["missing"] or j["extra"]:
            c.print(f"[yellow]join:[/] {escape(j['input'])} (on {j['on']}): {j['missing']:,} selectable rows have no row there, "
                    f"{j['extra']:,} of its {j['rows']:,} rows are not in the table")
    left = ", ".join(f"{escape(k)}={v:,}" for k, v in s["excluded"].items())
    c.print(f"candidates: {s['candidates']:,}" + (f" (left out: {left})" if left else ""))
    how = "ccs" if cfg["strategy"] == "ccs" else f"keep {cfg['keep']}"
    if cfg["strategy"] == "ccs":
        how += f" ({cfg['ccs_strata']} strata, β={cfg['ccs_beta']})"
    if s["by"]:
        how += f" by {s['score']}" + (f" (mean rank of {', '.join(s['by'])})" if len(s["by"]) > 1 else "")
    if cfg["class_balanced"]:
        how += f", class-balanced ({cfg['class_quota']})"
    if s["dropped_hardest"]:
        how += f", hardest {s['dropped_hardest']:,} dropped first"
    pct = 100.0 * s["kept"] / max(s["candidates"], 1)
    c.print(f"selection: {how} → keep {s['kept']:,} of {s['candidates']:,} ({pct:.1f}%)"
            + (f" · out of core, {r['passes']} passes over the table" if r.get("mode") == "stream" else ""))
    if s.get("score_range"):
        (a, b), (ka, kb) = s["score_range"]["candidates"], s["score_range"]["kept"]
        c.print(f"score kept: [{ka:.4g}, {kb:.4g}] of [{a:.4g}, {b:.4g}]")
    pc_ = s.get("per_class")
    if pc_ and len(pc_["label"]) > 1:
        t = Table("label", "class", "rows", "kept", "dropped", "kept %", "kept scores", title="per class")
        shown = 20
        for i in range(min(shown, len(pc_["label"]))):
            n, k = pc_["candidates"][i], pc_["kept"][i]
            rng = ""
            if pc_.get("kept_min") and pc_["kept_min"][i] is not None:
                rng = f"{pc_['kept_min'][i]:.4g} … {pc_['kept_max'][i]:.4g}"
            lab = "-" if pc_["label"][i] is None else str(pc_["label"][i])
            t.add_row(lab, escape(pc_["name"][i] or ""), f"{n:,}", f"{k:,}", f"{n - k:,}", f"{100.0 * k / n:.1f}", rng)
        if len(pc_["label"]) > shown:
            t.add_row("…", f"{len(pc_['label']) - shown} more (--json)", "", "", "", "", "")
        c.print(t)
    if s.get("strata"):
        t = Table("stratum", "scores", "rows", "kept", "kept %", title="CCS strata")
        for st in s["strata"]:
            rng = f"{st['lo']:.4g} … {st['hi']:.4g}" if "lo" in st else ""
            frac = "" if st["fraction"] is None else f"{100.0 * st['fraction']:.1f}"
            t.add_row(str(st["stratum"]), rng, f"{st['rows']:,}", f"{st['kept']:,}", frac)
        c.print(t)
    for w in r.get("warnings", []):  # on stderr, where CI logs look for them
        err_console().print(f"[yellow]warning:[/] {escape(w)}")
    if r["dry_run"]:
        c.print("dry run: nothing written")
    else:
        nxt = "dataprune export" if default_out else f"dataprune export {r['out']}"
        c.print(f"wrote {s['kept']:,} rows to {escape(r['out'])} in {r['seconds']:.1f}s · next: {escape(nxt)}")


def curve(r: dict, out) -> None:
    from rich.table import Table

    t = Table("strategy", "fraction", "repeat", "kept", "epochs", "test error", "train s", title=f"pruning curve → {out}/curve.csv")
    for d in r["results"]:
        t.add_row(d["strategy"], f"{d['fraction']:g}", str(d["repeat"]), str(d["kept"]), str(d["epochs"]),
                  f"{100 * d['test_error']:.2f}%", f"{d['train_seconds']:.0f}")
    console().print(t)
    if r["plot"]:
        console().print(f"plot: {r['plot']}")
