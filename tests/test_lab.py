"""`make lab` as users meet it: JupyterLab starts (as root too), serves notebooks/ and the Lab page."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
STARTUP_TIMEOUT_S = 60  # a cold start takes a few seconds; leave room for a busy 2-core CI machine
STOP_TIMEOUT_S = 20


def _make_variables(text):
    """Simple `NAME = value` / `NAME := value` / `NAME ?= value` definitions of a Makefile."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|=)\s*(.*)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _lab_recipe(text):
    """The `lab:` recipe with the Makefile's own variables expanded (to a fixed point)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^lab\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    expanded = "\n".join(recipe)
    variables = _make_variables(text)
    for _ in range(10):
        new = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m.group(1), m.group(0)), expanded)
        if new == expanded:
            break
        expanded = new
    return expanded


def test_makefile_lab_allows_root_only_for_root():
    recipe = _lab_recipe((REPO / "Makefile").read_text())
    assert "jupyter lab" in recipe and "notebooks/" in recipe, recipe
    # --allow-root must be passed conditionally on the effective uid being 0, never unconditionally
    assert re.search(r"\$\(if\s+\$\(filter\s+0\s*,\s*\$\(shell\s+id\s+-u\)\)\s*,\s*--allow-root\s*\)", recipe), recipe


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


def _log_tail(log_path, n=4000):
    try:
        return log_path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def test_jupyter_lab_serves_the_notebooks(tmp_path):
    expected = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert expected, "no notebooks under notebooks/"

    port = _free_port()
    token = secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser",
        f"--port={port}",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={NOTEBOOKS}",
    ]
    if os.geteuid() == 0:  # the same rule as the Makefile's lab target
        cmd.append("--allow-root")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    log_path = tmp_path / "lab.log"

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        listing = None
        while listing is None:
            if proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {proc.returncode} before answering:\n{_log_tail(log_path)}")
            try:
                status, body = _get(f"{base}/api/contents?token={token}", timeout=5)
                assert status == 200, status
                listing = json.loads(body)
            except urllib.error.HTTPError as e:  # the server is up but refused: no point in waiting
                raise AssertionError(f"GET /api/contents answered {e.code}:\n{_log_tail(log_path)}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"jupyter lab did not answer on port {port} within {STARTUP_TIMEOUT_S} s:\n{_log_tail(log_path)}"
                    ) from None
                time.sleep(0.5)

        names = {item["name"] for item in listing["content"]}
        missing = [name for name in expected if name not in names]
        assert not missing, f"notebooks missing from the server's listing: {missing} (listed: {sorted(names)})"

        status, body = _get(f"{base}/lab?token={token}", timeout=30)
        assert status == 200
        assert "JupyterLab" in body, body[:500]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
    assert proc.returncode is not None
