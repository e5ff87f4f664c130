"""The README's Python blocks run as written, in order, on the shipped demo model."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_python_block_of_the_readme_runs_as_written(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # the first block writes clip.wav in the working directory
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    model, inp, res, grid = (namespace[name] for name in ("model", "inp", "res", "grid"))
    assert grid.shape == (model.cfg.n_layers, inp.shape[1])
    assert res.clean_prediction == "female" and not res.excluded  # the demo model hears the synthetic voice
    assert res.layer_rr.shape == (model.cfg.n_layers,) and np.isfinite(res.token_rr).all()
    assert res.audit["max_abs_diff"] <= 1e-5
