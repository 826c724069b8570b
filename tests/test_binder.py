"""The demo notebooks as Binder runs them: a fresh virtual environment with only what
binder/requirements.txt installs (plus nbclient, which Binder's own environment brings),
binder/start launching the Redis, and every notebook run top to bottom under plain nbclient,
with none of the test tooling (nbval skips nothing here). Needs PyPI, like ./scripts/test."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.services import free_port, unavailable

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

RUN_ALL = textwrap.dedent('''
    import pathlib, sys
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    kernel = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert kernel.startswith(sys.prefix), f"the kernel is {kernel}, not this environment's python"
    out = pathlib.Path(sys.argv[1])
    for path in sorted(pathlib.Path("notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        finally:
            nbformat.write(notebook, out / path.name)
''')


def _run(args: list[str], log: Path, **kwargs: object) -> None:
    with open(log, "a") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{log.read_text()[-4000:]}")


def _stop_redis(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"SHUTDOWN NOSAVE\r\n")
            conn.recv(100)
    except OSError:
        pass


def _texts(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(parts)


def _panel_counts(notebook: nbformat.NotebookNode) -> list[list[str]]:
    """The summary line (queued, running, done, failed) of every panel picture, in order."""
    pictures = [o["data"]["text/html"] for cell in notebook.cells for o in cell.get("outputs", [])
                if "neonnb-snapshot" in o.get("data", {}).get("text/html", "")]
    return [re.findall(r"class='neonnb-count-\w+'[^>]*>([^<]*)<", picture) for picture in pictures]


@pytest.mark.timeout(900)
def test_every_notebook_runs_all_on_a_binder_like_environment(tmp_path: Path) -> None:
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            unavailable(f"{binary} is missing (apt-get install redis-server): binder/apt.txt installs it on Binder")
    log = tmp_path / "binder.log"
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", str(venv)], log)
    _run([str(python), "-m", "pip", "install", "-q", "-r", "binder/requirements.txt", "nbclient"], log, cwd=ROOT)
    _run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], log)
    executed = tmp_path / "executed"
    executed.mkdir()
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NEONNB_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(NEONNB_REDIS_PORT=str(port), TMPDIR=str(tmp_path), JUPYTER_PREFER_ENV_PATH="1",
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    try:
        _run(["binder/start", str(python), "-c", RUN_ALL, str(executed)], log, cwd=ROOT, env=env, timeout=800)
    finally:
        _stop_redis(port)

    for source in NOTEBOOKS:
        notebook = nbformat.read(executed / source.name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.get("execution_count") for cell in code), f"{source.name}: not every cell ran"
        errors = [o for cell in code for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{source.name}: {errors}"
        last = code[-1].get("outputs", [])
        # Run All ends showing the panel, with a picture of it for wherever widgets don't render.
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in last), source.name
        assert any("neonnb-snapshot" in o.get("data", {}).get("text/html", "") for o in last), source.name
        committed = nbformat.read(source, as_version=4)
        assert _panel_counts(committed) == _panel_counts(notebook), (
            f"{source.name}: its saved panel pictures differ from a run's; ./scripts/notebooks re-runs them")
    redis_notebook = nbformat.read(executed / "04_redis_standalone_worker.ipynb", as_version=4)
    setup = _texts(redis_notebook.cells[1])
    assert "'redis'" in setup and "SQLite" not in setup, f"the Redis notebook did not use Redis: {setup}"


def test_binder_start_refuses_a_port_another_redis_answers_on(redis_server: Any) -> None:
    """Otherwise the notebooks would write into that server's DB 0."""
    env = {**os.environ, "NEONNB_REDIS_PORT": str(redis_server.port)}
    done = subprocess.run(["bash", str(ROOT / "binder" / "start"), "true"], capture_output=True, text=True, env=env,
                          timeout=30)
    assert done.returncode == 1 and "another Redis already answers" in done.stderr
