"""The notebooks run top to bottom without an error, offline, in smoke mode (tiny models, short clips).

Each notebook runs once in a fresh IPython kernel on this interpreter (the project's virtual environment), with
`HF_HUB_OFFLINE=1` and `SMOKE=1` in the kernel's environment, a scratch working directory and a temp directory
(`TMPDIR`) of its own; the tests below then read the executed notebook. The notebooks hold their own assertions
(e.g. the conformance kit's differences ≤ 1e-5, logits equal to the original model's), so a failed check fails the
cell and the tests of that notebook. The committed files carry no outputs.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from audiolens_ct.plots import static_export_available

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart", "02_transformerlens_api", "03_reproduce_the_paper", "04_new_port", "05_lens_and_steering",
         "06_heads_and_time"]
WITH_FIGURES = ["01_quickstart", "02_transformerlens_api", "03_reproduce_the_paper", "05_lens_and_steering",
                "06_heads_and_time"]
KERNEL = "audiolens-ct-tests"
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"  # how a tqdm bar shows in a kernel with ipywidgets


@dataclass
class Executed:
    notebook: nbformat.NotebookNode
    tmpdir: Path  # the kernel's TMPDIR
    cwd: Path  # the kernel's working directory
    connection_file: Path  # written by the kernel manager for the kernel's lifetime


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


def execute(name: str, kernel_dirs: list[str], root: Path, **env: str | None) -> Executed:
    """Run notebook `name` top to bottom in a fresh kernel whose working and temp directories are new folders under
    `root`; `env` adds to (or, with None, removes from) the kernel's environment. Raises CellExecutionError, with
    the cell and its traceback, on the first failing cell; the kernel is shut down either way."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cwd, tmpdir = root / "cwd", root / "tmp"
    cwd.mkdir()
    tmpdir.mkdir()
    specs = KernelSpecManager(kernel_dirs=kernel_dirs)
    manager = AsyncKernelManager(kernel_spec_manager=specs, kernel_name=KERNEL)
    client = NotebookClient(notebook, km=manager, timeout=300, resources={"metadata": {"path": str(cwd)}})
    kernel_env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "SMOKE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # tiny models: one thread is fastest on a shared machine
        "TMPDIR": str(tmpdir),
        # torch creates its compile cache folder (a fixed name, `torchinductor_<user>`, empty) in the temp directory
        # when it is imported; that is torch's, not the notebooks', so it goes elsewhere here
        "TORCHINDUCTOR_CACHE_DIR": str(root / "torchinductor"),
        **env,
    }  # fmt: skip
    kernel_env = {key: value for key, value in kernel_env.items() if value is not None}
    # the client does not own `manager`, so by default it would leave the kernel (and its connection file) running
    client.execute(env=kernel_env, cleanup_kc=True)
    return Executed(notebook, tmpdir, cwd, Path(manager.connection_file))


@pytest.fixture(scope="module")
def executed(kernel_dirs: list[str], tmp_path_factory: pytest.TempPathFactory):
    """`executed(name)`: the notebook run once in smoke mode, shared by the tests of this module."""
    runs: dict[str, Executed | CellExecutionError] = {}

    def run(name: str) -> Executed:
        if name not in runs:
            try:
                runs[name] = execute(name, kernel_dirs, tmp_path_factory.mktemp(name))
            except CellExecutionError as err:
                runs[name] = err
        if isinstance(runs[name], CellExecutionError):
            raise runs[name]
        return runs[name]

    return run


def outputs(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def figures(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for output in outputs(notebook) if PLOTLY in output.get("data", {})]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_without_error(name: str, executed) -> None:
    code = [cell for cell in executed(name).notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "some code cells did not run"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_leaves_no_files_behind(name: str, executed) -> None:
    run = executed(name)
    left = sorted(str(p.relative_to(run.tmpdir.parent)) for p in [*run.tmpdir.iterdir(), *run.cwd.iterdir()])
    assert not left, f"{name}.ipynb left {left} in its temp or working directory"
    assert not run.connection_file.exists(), "the kernel's connection file outlived the kernel"


def test_notebook_02_sweeps_fewer_positions_in_smoke_mode(executed) -> None:
    """With SMOKE=1 the residual-stream sweep skips audio rows: its heatmap has fewer columns than the input has
    positions (column labels are `position:token`; the last position is always swept)."""
    notebook = executed("02_transformerlens_api").notebook
    (figure,) = [f.data[PLOTLY] for f in figures(notebook)
                 if f.data[PLOTLY]["layout"]["title"]["text"].startswith("get_act_patch_resid_pre")]  # fmt: skip
    swept = [int(label.split(":")[0]) for label in figure["data"][0]["x"]]
    assert swept == sorted(swept) and swept[0] == 0
    assert len(swept) < swept[-1] + 1, "smoke mode swept every position"


def test_notebook_02_stores_no_progress_bars(executed) -> None:
    """The patching sweeps draw tqdm bars; the notebook switches them off, so a headless run stores none (without
    ipywidgets each update of a bar would be stored as a stream output: hundreds of them)."""
    notebook = executed("02_transformerlens_api").notebook
    bars = [o for o in outputs(notebook) if WIDGET in o.get("data", {}) or "it/s]" in o.get("text", "")]
    assert not bars, f"{len(bars)} progress-bar outputs"
    streams = [o for o in outputs(notebook) if o.output_type == "stream"]
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(streams) < 2 * len(code), f"{len(streams)} stream outputs from {len(code)} code cells"


@pytest.mark.parametrize("name", WITH_FIGURES)
def test_figures_carry_a_png_exactly_when_kaleido_is_installed(name: str, executed) -> None:
    """Plotly figures are blank in static viewers (GitHub); with kaleido each figure also carries a PNG."""
    shown = figures(executed(name).notebook)
    assert shown, f"{name}.ipynb shows no figure"
    with_png = [f for f in shown if "image/png" in f.data]
    assert len(with_png) == (len(shown) if static_export_available() else 0)


def test_notebook_03_without_data_or_smoke_says_how_to_run(kernel_dirs: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no-SAKURA-here"
    with pytest.raises(CellExecutionError) as failure:
        execute("03_reproduce_the_paper", kernel_dirs, tmp_path, SMOKE=None, SAKURA_DIR=str(missing))
    message = str(failure.value)
    assert str(missing) in message, "the error does not say where it looked"
    assert "SAKURA_DIR" in message and "SMOKE=1" in message, "the error does not say how to run the notebook"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{name}.ipynb has no code cells"
    stale = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not stale, f"{name}.ipynb: code cells {stale} carry outputs; clear them before committing"
