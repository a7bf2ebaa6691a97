"""examples/quickstart.ipynb: the committed file is what examples/build_quickstart.py writes
(outputs cleared), and every cell runs on the default model in a fresh kernel of this very
interpreter, with real results: generated text, a rich display, the benchmark's counts, a plot."""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"

# Appended to the notebook under test: the values its cells computed, and the kernel's python.
PROBE = """\
import json, sys
print(json.dumps({
    "executable": sys.executable,
    "generated": [out.outputs[0].text for out in outputs],
    "story": story,
    "reply": reply.outputs[0].text,
    "answer": answer.outputs[0].text,
    "sweep": {n: [r["completed"], r["output_tokens"]] for n, r in sweep.items()},
}))"""


def _generator():
    spec = importlib.util.spec_from_file_location("build_quickstart", ROOT / "examples" / "build_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_the_generators_with_outputs_cleared():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert committed == _generator().build(), "run: python examples/build_quickstart.py"
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def _kernel_manager(tmp_path):
    """A kernel on sys.executable (this virtualenv's python), whatever kernelspecs the machine has."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / "jaxserve-python")
    return AsyncKernelManager(kernel_name="jaxserve-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def _errors(cells) -> dict[str, str]:
    return {cell.id: f"{out.ename}: {out.evalue}" for cell in cells for out in cell.get("outputs", [])
            if out.output_type == "error"}


def _stdout(cell) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def _data(cell, mime: str) -> list:
    return [out.data[mime] for out in cell.outputs if out.output_type in ("execute_result", "display_data")
            and mime in out.data]


@pytest.mark.slow
@pytest.mark.default_model
def test_quickstart_runs_every_cell_with_real_results(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE, id="probe"))
    # Every cell runs even after one fails, so one report names every failing cell.
    client = NotebookClient(notebook, km=_kernel_manager(tmp_path), timeout=600, allow_errors=True,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    cells = {cell.id: cell for cell in notebook.cells}
    assert _errors(notebook.cells) == {}

    probe = json.loads(_stdout(cells["probe"]))
    assert probe["executable"] == sys.executable
    assert "Paris" in probe["generated"][0] and all(text.strip() for text in probe["generated"])
    assert probe["story"].strip() and probe["reply"].strip()
    assert probe["answer"] in ("yes", "no")
    assert probe["sweep"] == {n: [8, 64] for n in ("1", "2", "4", "8")}  # 8 requests x 8 tokens each

    (shown,) = _data(cells["generate"], "text/html")  # the RequestOutput's rich display
    assert "RequestOutput" in shown and html.escape(probe["generated"][0]) in shown and "TTFT" in shown
    assert probe["story"] == _stdout(cells["stream"])
    (png,) = _data(cells["plot"], "image/png")
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
