"""The notebooks run top to bottom without an error, offline, in smoke mode (tiny models, short clips).

Each notebook runs in a fresh IPython kernel on this interpreter (the project's virtual environment), with
`HF_HUB_OFFLINE=1` and `SMOKE=1` in the kernel's environment and a scratch working directory. The notebooks hold
their own assertions (e.g. the conformance kit's differences ≤ 1e-5, logits equal to the original model's), so a
failed check fails the cell and this test. The committed files carry no outputs.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_transformerlens_api", "03_reproduce_the_paper", "04_new_port"]
KERNEL = "audiolens-ct-tests"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A kernel spec that starts `sys.executable`, so the kernel sees the same installed packages as pytest."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": KERNEL, "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    return [str(root)]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_error(name: str, kernel_dirs: list[str], tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    specs = KernelSpecManager(kernel_dirs=kernel_dirs)
    manager = AsyncKernelManager(kernel_spec_manager=specs, kernel_name=KERNEL)
    client = NotebookClient(notebook, km=manager, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "SMOKE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # tiny models: one thread is fastest on a shared machine
    }  # fmt: skip
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "some code cells did not run"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name}.ipynb has no code cells"
    stale = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not stale, f"{name}.ipynb: code cells {stale} carry outputs; clear them before committing"
