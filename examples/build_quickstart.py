"""Writes examples/quickstart.ipynb (outputs cleared) from the cells below: edit them here, then

    python examples/build_quickstart.py

tests/test_notebook.py checks that the committed notebook matches, and runs it."""

from __future__ import annotations

import pathlib

import nbformat

PATH = pathlib.Path(__file__).with_name("quickstart.ipynb")

CELLS = [
    ("markdown", "intro", """\
# jaxserve quickstart

The default model (SmolLM2-135M-Instruct) through the Python API: `generate`, `stream`, `chat`, a
structured output, then a small serving benchmark with latency plotted against throughput.
About a minute on a laptop CPU once the caches under `~/.cache/jaxserve` are warm (the first run
converts the weights and compiles, a few minutes more)."""),
    ("code", "load", """\
from jaxserve import LLM, SamplingParams, StructuredOutputsParams

# Small batch and context limits (fewer step shapes to compile) keep the start short on a CPU;
# `LLM(model="smollm2-135m-instruct")` alone serves 64 requests at a time, up to 8192 tokens.
llm = LLM(model="smollm2-135m-instruct", max_model_len=1024, max_num_seqs=16,
          max_num_batched_tokens=256, token_buckets=(32, 128), request_buckets=(4, 16))"""),
    ("markdown", "generate-md", """\
## generate

A batch of prompts, run to completion; greedy with `temperature=0`. A `RequestOutput` shows its
prompt, completions, finish reasons, token counts and latency."""),
    ("code", "generate", """\
greedy = SamplingParams(max_tokens=16, temperature=0)
outputs = llm.generate(["The capital of France is", "The three primary colors are"], greedy)
outputs[0]"""),
    ("code", "generate-text", """\
for out in outputs:
    print(repr(out.prompt), "->", repr(out.outputs[0].text))"""),
    ("markdown", "stream-md", """\
## stream

The new text of one request as it is produced."""),
    ("code", "stream", """\
story = ""
for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=24, temperature=0)):
    print(delta.text, end="", flush=True)
    story += delta.text"""),
    ("markdown", "chat-md", """\
## chat

Messages rendered with the model's chat template."""),
    ("code", "chat", """\
(reply,) = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(max_tokens=16, temperature=0))
reply"""),
    ("markdown", "structured-md", """\
## Structured output

The completion is constrained to one of the choices (also: `json=` a schema, `regex=`,
`grammar=`, `json_object=True`)."""),
    ("code", "structured", """\
yes_or_no = SamplingParams(max_tokens=4, temperature=0,
                           structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
(answer,) = llm.chat([{"role": "user", "content": "Is Paris the capital of France?"}], yes_or_no)
assert answer.outputs[0].text in ("yes", "no"), answer.outputs[0].text
answer.outputs[0].text"""),
    ("markdown", "bench-md", """\
## A small serving benchmark

The same engine driven from asyncio (`AsyncLLM`), as a server drives it: 8 requests of 32 random
prompt tokens and 8 output tokens, 1 to 8 in flight at once. `jaxserve bench serve` measures the
same way over gRPC, HTTP or in process (`--backend`)."""),
    ("code", "bench", """\
from jaxserve import AsyncLLM
from jaxserve.benchmarks.throughput import make_prompts
from server.bench import run_load, summarize
from server.bench_backends import PythonBackend

prompts = make_prompts(8, 32, 32, llm.tokenizer.vocab_size, seed=0)
sweep = {}
async with AsyncLLM(engine=llm.engine) as engine:
    backend = PythonBackend(llm=engine)
    for in_flight in (1, 2, 4, 8):
        results, duration = await run_load(backend, prompts, 8, float("inf"), in_flight, seed=0)
        sweep[in_flight] = summarize(results, duration, slos={})

print("in flight  output tok/s  TTFT p50 (ms)  TPOT p50 (ms)")
for in_flight, r in sweep.items():
    print(f"{in_flight:9}  {r['output_tok_s']:12.1f}  {r['ttft_ms']['p50']:13.1f}  {r['tpot_ms']['p50']:13.1f}")"""),
    ("code", "plot", """\
import matplotlib.pyplot as plt

throughput = [r["output_tok_s"] for r in sweep.values()]
fig, ax = plt.subplots(figsize=(6, 4))
for metric in ("ttft_ms", "tpot_ms"):
    ax.plot(throughput, [r[metric]["p50"] for r in sweep.values()], marker="o", label=metric[:4].upper() + " p50")
for in_flight, x, r in zip(sweep, throughput, sweep.values()):
    ax.annotate(f"{in_flight} in flight", (x, r["tpot_ms"]["p50"]), xytext=(4, -12), textcoords="offset points",
                fontsize=8)
ax.set_xlabel("output tokens/s")
ax.set_ylabel("latency (ms)")
ax.set_title("SmolLM2-135M: latency against throughput")
ax.legend()
plt.show()"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, outputs cleared; cell ids are fixed so a rebuild changes nothing."""
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    notebook = nbformat.v4.new_notebook(cells=[make[kind](source, id=cell_id) for kind, cell_id, source in CELLS])
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                         "language_info": {"name": "python"}}
    return notebook


def main() -> None:
    notebook = build()
    nbformat.validate(notebook)
    nbformat.write(notebook, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()
