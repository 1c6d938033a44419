"""The documentation works: its runnable commands run, README links resolve, the site builds strictly.

A shell block in README.md or docs/*.md is *runnable* when the line directly above its
```` ```bash ```` fence is ``<!-- runs in seconds -->``. Each runnable block runs here as a
user would paste it: with ``bash -e -o pipefail``, in a fresh temporary directory that holds a
copy of the repository's ``sweeps/`` (so ``kdexp sweep sweeps/smoke.yaml`` resolves, and
``outputs/`` lands in that directory), with this interpreter's ``bin/`` (the project's
``.venv/bin``) first on ``PATH``, ``KDEXP_CACHE_DIR`` and W&B's folders in the temporary
directory, ``WANDB_MODE=offline`` and ``WANDB_SILENT=true``. A block that needs another file of
the repository reads it through ``$KDEXP_REPO`` (the repository root), and never writes there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runs in seconds -->"
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_TIMEOUT_S = 300  # a runnable block takes seconds; this only turns a hang into a failure


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    script: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_blocks(path: Path) -> list[Block]:
    """The bash blocks of ``path`` marked runnable; a marker on anything else is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        if fence.strip() not in ("```bash", "```sh", "```shell"):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: {MARKER} is not directly above a ```bash fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 2}: the marked block is never closed")
        blocks.append(Block(path, i + 2, "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


BLOCKS = [block for path in DOC_FILES for block in runnable_blocks(path)]


def block_env(tmp: Path) -> dict[str, str]:
    """A user's shell after `make setup`: the project's bin first, caches and W&B in ``tmp``, W&B offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDEXP_", "WANDB_", "HYDRA_"))}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "KDEXP_CACHE_DIR": str(tmp / "cache"),
        "KDEXP_REPO": str(ROOT),
        "WANDB_DIR": str(tmp / "wandb"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    })
    return env


def test_the_docs_have_runnable_blocks():
    where = {block.path.name for block in BLOCKS}
    assert "README.md" in where and "index.md" in where, f"runnable blocks found only in {sorted(where)}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_a_runnable_block_runs(block, tmp_path):
    shutil.copytree(ROOT / "sweeps", tmp_path / "sweeps")
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.script], cwd=tmp_path,
                              env=block_env(tmp_path), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{block.where}: the block ran over {BLOCK_TIMEOUT_S} s\n{block.script}\n"
                    f"--- stderr (tail) ---\n{(err.stderr or b'')[-3000:]!r}")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"{block.where}: the block exited {proc.returncode} after {seconds:.1f} s\n{block.script}"
        f"--- stderr (tail) ---\n{proc.stderr[-3000:]}\n--- stdout (tail) ---\n{proc.stdout[-1000:]}")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link in ``path`` that is not a URL or an in-page anchor."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        found.append((text.count("\n", 0, match.start()) + 1, target))
    return found


@pytest.mark.parametrize("readme", ["README.md", "sweeps/README.md"])
def test_every_relative_link_of_a_readme_points_to_a_file(readme):
    path = ROOT / readme
    broken = [f"{readme}:{line}: {target}" for line, target in relative_links(path)
              if not (path.parent / target.split("#")[0]).exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)
    if readme == "README.md":
        assert len(relative_links(path)) >= 10  # the parser still finds the README's links


def test_the_sweeps_readme_lists_every_sweep_file_once():
    text = (ROOT / "sweeps" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if re.match(r"\|\s*`[\w.-]+\.yaml`", line)]
    listed = [name for row in rows for name in re.findall(r"`([\w.-]+\.yaml)`", row.split("|")[1])]
    files = sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml"))
    assert sorted(listed) == files, f"table lists {sorted(listed)}, sweeps/ holds {files}"
    table = [i for i, line in enumerate(text.splitlines()) if line in rows]
    assert table == list(range(table[0], table[0] + len(table))), "the sweep-file table is broken by other lines"


def test_the_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed here (pip install -e '.[docs]', or make setup)")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{output[-5000:]}"
    assert "WARNING" not in output, output[-5000:]
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
