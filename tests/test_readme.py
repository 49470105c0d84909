"""The README's first screen is what works: its two commands run from a clean copy of the repository
(the install step skipped — this interpreter already has what pyproject declares), the test command is
the one CI runs, and `--help` names what the README names."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def first_screen() -> list[str]:
    """The commands of the README's first code block (comments stripped)."""
    block = re.search(r"## Set up and run[^\n]*\n+```bash\n(.*?)```", README, re.S)
    assert block, "README has no 'Set up and run' bash block"
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln]


def is_install(step: str) -> bool:
    words = shlex.split(step)
    return (words[:3] == ["python3", "-m", "venv"] or words[:1] in (["."], ["source"])
            or "pip" in words[:3] and "install" in words[:4])


def test_first_screen_is_two_commands_setup_then_tests():
    cmds = first_screen()
    assert len(cmds) == 2, cmds
    run_steps = [s.strip() for s in cmds[0].split("&&") if not is_install(s.strip())]
    assert run_steps == ["bash examples/quickstart.sh"], cmds[0]
    assert "-r requirements/torch.txt" in cmds[0]  # the tested torch pair, the same file CI installs


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = first_screen()[1]
    ci_cmds = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert ci_cmds[-1] == test_cmd
    assert "-r requirements/torch.txt" in ci and '-e ".[test]"' in ci and "python3 -m venv" in ci
    pins = [ln for ln in (ROOT / "requirements" / "torch.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert [p.split("==")[0] for p in pins] == ["torch", "torchvision"] and all("==" in p for p in pins)


def _clean_copy(dst: Path) -> Path:
    """The files git tracks (plus untracked, not ignored ones), as a fresh clone would have them."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    return dst


def _listing(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*") if "__pycache__" not in p.parts and ".pytest_cache" not in p.parts}


def test_first_screen_runs_from_a_clean_copy(tmp_path):
    repo = _clean_copy(tmp_path / "repo")
    before = _listing(repo)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    bindir = os.path.dirname(shutil.which("dataprune") or sys.executable)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(repo), "PATH": f"{os.path.dirname(sys.executable)}:{bindir}:"
           + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    steps = [s.strip() for s in first_screen()[0].split("&&") if not is_install(s.strip())]
    p = subprocess.run(["bash", "-c", " && ".join(steps)], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    work = re.search(r"quickstart: working in (\S+)", out).group(1)
    assert Path(work).parent == tmp  # a new temporary directory, printed
    m = re.search(r"webdataset reads back (\d+) samples from (\d+) shards", out)
    assert m and int(m.group(1)) == 800 and int(m.group(2)) >= 2, out
    assert "delete it with" in out and work in out.splitlines()[-1]
    assert _listing(repo) == before  # nothing written into the repository
    # every command ends by saying where its output went and what to run next
    assert out.count("→ ") >= 4 and "next: dataprune select" in out and "next: train on it" in out
    # the second command, collected from the clean copy (running it here would run this test again)
    t = subprocess.run([*shlex.split(first_screen()[1].replace("python3", sys.executable, 1)), "--collect-only"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=300)
    assert t.returncode == 0 and re.search(r"\d+ tests? collected", t.stdout), t.stdout[-2000:] + t.stderr[-2000:]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dataprune", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_conventions():
    bare = _cli()
    assert bare.returncode == 0 and "Commands:" in bare.stdout and "score" in bare.stdout
    short, long = _cli("-h"), _cli("--help")
    assert short.returncode == 0 and short.stdout == long.stdout
    v = _cli("--version")
    assert v.returncode == 0 and re.fullmatch(r"dataprune \S+\n", v.stdout)
    for cmd in ("score", "select", "export", "info", "manifest", "curve", "demo"):
        h = _cli(cmd, "-h")
        assert h.returncode == 0, (cmd, h.stderr)
        assert "<bool>" not in h.stdout and "{" not in h.stdout.split("\n")[0], (cmd, h.stdout[:300])
        assert not options_without_help(h.stdout), (cmd, options_without_help(h.stdout))


def options_without_help(text: str) -> list:
    """Options in a plain click help screen with no help text (same line or the wrapped next line)."""
    lines = text.split("Options:")[1].splitlines()
    bare = []
    for i, ln in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", ln)
        if not m:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if not m.group(2) and not re.match(r"^\s{6,}[^\s-]", nxt):
            bare.append(m.group(1))
    return bare


@pytest.mark.parametrize("cmd", ["score", "select", "export", "info", "manifest", "curve"])
def test_usage_writes_arguments_as_the_readme_does(cmd):
    usage = _cli(cmd, "-h").stdout.splitlines()[0]
    for arg in re.findall(r"\b[A-Z]{4,}\b", usage):
        assert arg in ("OPTIONS",) or arg in README, (cmd, arg)


def test_readme_commands_table_names_real_options():
    """Every `--option` the README's command table names exists in that command's --help."""
    table = README[README.index("| command | what it does |"):README.index("### Selecting")]
    for row in table.splitlines()[2:]:
        m = re.match(r"\| `dataprune (\w+)([^`]*)`", row)
        if not m:
            continue
        helptext = _cli(m.group(1), "-h").stdout
        for opt in re.findall(r"--[\w-]+", m.group(2)):
            assert opt in helptext, (m.group(1), opt)


def test_bad_out_is_a_usage_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for args in (["score", str(tmp_path), "--out", str(f)], ["curve", str(tmp_path), "--test", str(tmp_path), "--out", str(f)],
                 ["export", str(tmp_path), "--out", str(f)], ["select", str(tmp_path), "--frac", "0.5", "--out", str(tmp_path)],
                 ["manifest", str(tmp_path), "--out", str(tmp_path)]):
        p = _cli(*args)
        assert p.returncode == 2 and "error:" in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    assert f.read_text() == "x"
