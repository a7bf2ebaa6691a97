"""The GPU check's results as markdown (results.md, and the tables BENCHMARKS.md takes from a run's
results file). Plain Python: the driver that writes it never imports jax."""

from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows, head, cells) -> list[str]:
    """Markdown rows: `head(r)` leads every row, then `cells(r)`, or the error of a row that failed."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rest = [f"failed: {r['error'][:100]}"] + [""] * (len(header) - len(head(r)) - 1) if "error" in r else cells(r)
        lines.append("| " + " | ".join(map(str, head(r) + rest)) + " |")
    return lines


def decode_table(rows) -> list[str]:
    return _table(
        ["kernel", "KV", "batch", "context", "splits", "ms", "GB/s", "of copy BW", "fp8 speed-up", "reference ms",
         "jax paged ms"], rows,
        lambda r: [r["kernel"] + (f" ({r['variant']})" if r.get("variant") else ""), r["kv_dtype"], r["batch"],
                   r["context"], r["kv_splits"]],
        lambda r: [f"{r['pallas_ms']:.3f}", f"{r['gb_s']:.0f}", f"{r['frac_copy']:.0%}", _fmt(r.get("fp8_speedup"), ".2f"),
                   _fmt(r.get("reference_ms"), ".3f"), _fmt(r.get("jax_paged_ms"), ".3f")])


def sinks_table(rows) -> list[str]:
    return _table(
        ["kernel", "batch", "context", "window", "ms without sinks", "ms with sinks", "slow-down", "GB/s", "of copy BW"],
        rows, lambda r: [r["kernel"], r["batch"], r["context"], r["window"] or "none"],
        lambda r: [f"{r['plain_ms']:.3f}", f"{r['sinks_ms']:.3f}", f"{r['slowdown'] - 1:+.1%}", f"{r['gb_s']:.0f}",
                   f"{r['frac_copy']:.0%}"])


def mxfp4_table(rows) -> list[str]:
    def cell(r, method):
        return (f"failed: {r[method + '_error'][:60]}" if method + "_error" in r
                else _fmt(r.get(method + "_ms"), ".3f"))

    return _table(
        ["tokens", "MXFP4 Triton ms", "bf16 Triton ms", "MXFP4 speed of bf16"], rows, lambda r: [r["tokens"]],
        lambda r: [cell(r, "mxfp4_triton"), cell(r, "bf16_triton"), _fmt(r.get("mxfp4_speed_of_bf16"), ".2f")])


def moe_table(rows) -> list[str]:
    return _table(
        ["MoE shape", "kernel", "tokens", "ms", "TFLOP/s", "of dense bf16", "of roofline", "ragged_dot ms (of dense)",
         "rel err"], rows,
        lambda r: [r["shape"], r["kernel"], r["tokens"]],
        lambda r: [f"{r['pallas_ms']:.3f}", f"{r['tflop_s']:.1f}", f"{r['frac_dense']:.0%}",
                   _fmt(r.get("frac_roofline"), ".0%"), f"{r['ragged_dot_ms']:.3f} ({r['ragged_dot_frac_dense']:.0%})",
                   f"{r['rel_err']:.1e}"])


def mla_table(rows) -> list[str]:
    return _table(
        ["MLA kernel", "latent cache", "batch", "context", "options", "ms", "GB/s", "of copy BW"], rows,
        lambda r: [r["kernel"], r["kv_dtype"], r["batch"], r["context"],
                   ", ".join(f"{k}={v}" for k, v in r.items()
                             if k not in ("kernel", "kv_dtype", "batch", "context", "ms", "gb_s", "frac_copy", "error"))
                   or "default"],
        lambda r: [f"{r['ms']:.3f}", f"{r['gb_s']:.0f}", f"{r['frac_copy']:.0%}"])


def fp8_matmul_table(rows) -> list[str]:
    def method(r, name):
        if f"{name}_error" in r:
            return f"failed: {r[f'{name}_error'][:60]}"
        if f"{name}_ms" not in r:
            return "-"
        return f"{r[f'{name}_ms']:.3f} ({r[f'{name}_frac_fp8']:.0%} fp8, {r[f'{name}_rel_err']:.0e})"

    return _table(
        ["linear", "tokens", "K x N", "bf16 weights ms", "fp8: dequantize then bf16 ms", "fp8: block-scaled dot ms",
         "fp8: Pallas kernel ms", "fp8: Pallas kernel, weight [N, K] ms"],
        rows, lambda r: [r["shape"], r["tokens"], f"{r['k']} x {r['n']}"],
        lambda r: [method(r, "bf16"), method(r, "dequantize"), method(r, "scaled"), method(r, "pallas"),
                   method(r, "pallas_nk")])


# The methods a kept fp8 layer can run (models.quantization.MATMUL_METHODS): the target judges these.
FP8_MODEL_METHODS = ("dequantize", "scaled", "pallas")


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met?) for the issue's GPU targets; None where unmeasured."""
    parts = {name: p.get("result", {}) for name, p in results.get("parts", {}).items()}
    out = []
    decode = [r for r in parts.get("decode", {}).get("rows", []) if "error" not in r and not r.get("variant")]
    for kernel in sorted({r["kernel"] for r in decode}):
        rows = [r for r in decode if r["kernel"] == kernel and r["batch"] >= 32 and r["context"] >= 4096]
        if rows:
            worst = min(r["frac_copy"] for r in rows)
            out.append((f"{kernel} decode attention >= 80% of copy bandwidth (batch >= 32, context >= 4k)",
                        f"{worst:.0%} to {max(r['frac_copy'] for r in rows):.0%} over {len(rows)} rows", worst >= 0.8))
        speedups = [r["fp8_speedup"] for r in rows if r.get("fp8_speedup")]
        if speedups:
            out.append((f"{kernel} fp8 KV >= 1.6x bf16 there", f"{min(speedups):.2f}x to {max(speedups):.2f}x",
                        min(speedups) >= 1.6))
    sinks = [r for r in parts.get("sinks", {}).get("rows", []) if "error" not in r]
    for kernel in sorted({r["kernel"] for r in sinks}):
        slowdowns = [r["slowdown"] for r in sinks if r["kernel"] == kernel]
        out.append((f"{kernel} attention with sinks <= 5% slower than without (gpt-oss-120b decode, 4k)",
                    f"{min(slowdowns) - 1:+.1%} to {max(slowdowns) - 1:+.1%} over {len(slowdowns)} rows",
                    max(slowdowns) <= 1.05))
    for r in parts.get("moe", {}).get("rows", []):
        if r.get("shape") == "qwen3-30b-a3b" and "error" not in r:
            roofline = r.get("frac_roofline")
            out.append((f"{r['kernel']} grouped matmul >= 60% of dense bf16 (Qwen3-MoE shape)",
                        f"{r['frac_dense']:.0%} (of the roofline, memory-bound here: {_fmt(roofline, '.0%')})",
                        r["frac_dense"] >= 0.6))
    mla = [r for r in parts.get("mla", {}).get("rows", []) if "error" not in r and set(r) >= {"frac_copy"}
           and not set(r) - {"kernel", "kv_dtype", "batch", "context", "ms", "gb_s", "frac_copy"}]
    for kernel in sorted({r["kernel"] for r in mla}):
        rows = [r for r in mla if r["kernel"] == kernel]
        worst = min(r["frac_copy"] for r in rows)
        out.append((f"{kernel} MLA decode >= 70% of copy bandwidth (DeepSeek-V3, batch 64, 4k and 32k)",
                    f"{worst:.0%} to {max(r['frac_copy'] for r in rows):.0%} over {len(rows)} rows", worst >= 0.7))
    fp8 = [r for r in parts.get("fp8_matmul", {}).get("rows", []) if any(f"{m}_frac_fp8" in r for m in FP8_MODEL_METHODS)]
    if fp8:
        best = [max(r.get(f"{m}_frac_fp8", 0) for m in FP8_MODEL_METHODS) for r in fp8 if r["tokens"] >= 1024]
        if best:
            out.append(("block-FP8 matmul >= 60% of the dense fp8 rate (DeepSeek-V3 shapes, >= 1024 tokens)",
                        f"{min(best):.0%} to {max(best):.0%} over {len(best)} rows (best method per row)",
                        min(best) >= 0.6))
    mxfp4 = [r["mxfp4_speed_of_bf16"] for r in parts.get("mxfp4_moe", {}).get("rows", []) if "mxfp4_speed_of_bf16" in r]
    if mxfp4:
        out.append(("MXFP4 grouped matmul >= 60% of the bf16 grouped matmul's speed (gpt-oss-120b experts)",
                    f"{min(mxfp4):.2f}x to {max(mxfp4):.2f}x over {len(mxfp4)} token counts", min(mxfp4) >= 0.6))
    batch1 = parts.get("e2e", {}).get("batch1")
    out.append(("8B batch-1 decode >= 85% of the HBM floor",
                f"{batch1['fraction_of_hbm_floor']:.0%} (TPOT {batch1['tpot_ms']:.2f} ms, floor {batch1['hbm_floor_ms']:.2f} ms)"
                if batch1 else "unmeasured", None if not batch1 else batch1["fraction_of_hbm_floor"] >= 0.85))
    ours = parts.get("e2e", {}).get("throughput", {}).get("output_tok_s")
    peer = parts.get("e2e_peer", {}).get("throughput", {}).get("output_tok_s")
    out.append(("offline throughput >= 5x transformers generate",
                f"{ours:.0f} vs {peer:.0f} tok/s: {ours / peer:.2f}x" if ours and peer else
                f"jaxserve {_fmt(ours, '.0f')} tok/s, transformers {_fmt(peer, '.0f')} tok/s",
                None if not (ours and peer) else ours / peer >= 5))
    return out


def markdown(results: dict) -> str:
    parts = results.get("parts", {})
    get = lambda name: parts.get(name, {}).get("result", {})  # noqa: E731
    versions = get("versions")
    smi = versions.get("nvidia_smi", {})
    lines = [f"# GPU check, {results.get('started', '?')}", "",
             f"Device: {smi.get('name') or versions.get('device_kind', '?')} (driver {smi.get('driver_version', '?')}, "
             f"compute capability {versions.get('compute_capability', '?')}); jax {versions.get('packages', {}).get('jax', '?')}, "
             f"jaxlib {versions.get('packages', {}).get('jaxlib', '?')}, triton {versions.get('packages', {}).get('triton', '-')}; "
             f"budget {results.get('budget_s')} s{' (tiny)' if results.get('tiny') else ''}", "",
             "| part | status | seconds |", "|---|---|---|"]
    for name in results.get("plan", parts):
        p = parts.get(name, {"status": "pending", "seconds": 0})
        lines.append(f"| {name} | {p['status']} | {p['seconds']} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in targets(results):
        lines.append(f"| {target} | {measured} | {'-' if met is None else 'yes' if met else 'NO'} |")
    smoke = get("smoke")
    if smoke:
        lines += ["", "## Smoke test (each kernel against its reference)", ""]
        for kernel, rows in smoke.items():
            cells = ", ".join(f"{case}: " + ("skipped (" + r["skipped"] + ")" if "skipped" in r else
                                            "ERROR " + r["error"][:120] if "error" in r else
                                            f"{'ok' if r['passed'] else 'WRONG'} {r['rel_err']:.1e}")
                              for case, r in rows.items() if isinstance(r, dict))
            lines.append(f"- {kernel} ({rows.get('verdict', 'unfinished')}): {cells}")
    ceilings = get("ceilings")
    if ceilings:
        lines += ["", f"Ceilings: copy {_fmt(ceilings.get('copy_gb_s'), '.0f')} GB/s (read + write), streaming read "
                  f"{_fmt(ceilings.get('read_gb_s'), '.0f')} GB/s, bf16 matmul {_fmt(ceilings.get('bf16_tflop_s'), '.0f')} TFLOP/s"]
    if get("decode").get("rows"):
        lines += ["", "## Decode attention (Llama-8B heads: 32 q, 8 kv, head_dim 128, block 16)", ""]
        lines += decode_table(get("decode")["rows"])
    if get("sinks").get("rows"):
        check = ", ".join(f"{k}: {'ok' if c['passed'] else 'WRONG'} {c['rel_err']:.1e}"
                          for k, c in get("sinks").get("check", {}).items())
        lines += ["", f"## Attention sinks (gpt-oss-120b: 64 q, 8 kv, head_dim 64, block 16, bf16 KV; check with "
                  f"sinks and a window against the reference: {check or '-'})", ""] + sinks_table(get("sinks")["rows"])
    if get("moe").get("rows"):
        lines += ["", "## MoE grouped matmul (fused gate/up + down, 1024 tokens)", ""] + moe_table(get("moe")["rows"])
    if get("mla").get("rows"):
        check = ", ".join(f"{k}: {'ok' if c['passed'] else 'WRONG'} {c['rel_err']:.1e}"
                          for k, c in get("mla").get("check", {}).items())
        lines += ["", f"## MLA decode (DeepSeek-V3: 128 heads, 512 + 64 latent; check against the reference: "
                  f"{check or '-'})", ""] + mla_table(get("mla")["rows"])
    if get("fp8_matmul").get("rows"):
        r = get("fp8_matmul")
        lines += ["", f"## Block-FP8 linears (128 x 128 blocks; dense fp8 {_fmt(r.get('dense_fp8_tflop_s'), '.0f')} "
                  f"TFLOP/s, bf16 {_fmt(r.get('dense_bf16_tflop_s'), '.0f')} TFLOP/s)", ""]
        lines += fp8_matmul_table(r["rows"])
    if get("mxfp4_moe").get("rows"):
        lines += ["", "## MXFP4 grouped matmul (gpt-oss-120b experts: 128 x 2880 x 2880, top-4)", ""]
        lines += mxfp4_table(get("mxfp4_moe")["rows"])
    cases = get("engine").get("cases", [])
    if cases:
        lines += ["", "## Engine agreement (Pallas engine against the reference engine, greedy)", "",
                  "| case | backend | kernels | positions | agree | max logprob diff (tolerance) | passed |",
                  "|---|---|---|---|---|---|---|"]
        for c in cases:
            if "error" in c:
                lines.append(f"| {c['case']} | {c['backend']} | - | - | - | {c['error'][:100]} | NO |")
                continue
            kernels = ", ".join(f"{k}: {v['backend']}" for k, v in c.get("kernels", {}).items())
            lines.append(f"| {c['case']} | {c['backend']} | {kernels} | {c['positions']} | {c['agreement']:.1%} | "
                         f"{c['max_logprob_diff']:.2e} ({c['tolerance']:.0e}) | {'yes' if c['passed'] else 'NO'} |")
    e2e, peer = get("e2e"), get("e2e_peer")
    if e2e:
        lines += ["", f"## End to end: {e2e.get('model', '?')}", "",
                  f"Start-up (compiling every bucket) {_fmt(e2e.get('startup_s'), '.1f')} s; kernels: "
                  + ", ".join(f"{k} {v['backend']} ({v['reason']})" for k, v in e2e.get("kernels", {}).items())]
        b1 = e2e.get("batch1")
        if b1:
            lines.append(f"- batch-1 decode: TPOT {b1['tpot_ms']:.2f} ms against an HBM floor of {b1['hbm_floor_ms']:.2f} ms "
                         f"({b1['fraction_of_hbm_floor']:.0%}); transformers TPOT "
                         f"{_fmt(peer.get('batch1', {}).get('tpot_ms'), '.2f')} ms")
        t = e2e.get("throughput")
        if t:
            roof = t.get("roofline", {})
            lines.append(f"- offline: {t['output_tok_s']:.0f} output tok/s ({t.get('num_requests')} requests, "
                         f"{_fmt(t.get('duration_s'), '.1f')} s, {t.get('compilations_during_run')} compilations while "
                         f"serving); decode {_fmt(roof.get('decode_fraction_of_roofline'), '.0%')} of its roofline; "
                         f"transformers generate {_fmt(peer.get('throughput', {}).get('output_tok_s'), '.0f')} tok/s")
    if peer.get("skipped") or peer.get("error"):
        lines.append(f"- transformers peer: {peer.get('skipped') or peer.get('error')}")
    summary = get("sweep").get("summary")
    if summary:
        lines += ["", f"## Kernel sweep: {summary['passed']}/{summary['run']} passed ({summary['total']} cases, "
                  f"{summary['skipped']} skipped as unsupported, max rel err {summary['max_rel_err']:.1e}, "
                  f"{summary['seconds']:.0f} s)"]
        lines += [f"- FAIL {f['kernel']} {f['kind']} {f['case']}: {f.get('error') or format(f.get('rel_err', 0), '.2e')}"
                  for f in summary.get("failures", [])]
    for name, p in parts.items():
        if p.get("log_tail"):
            lines += ["", f"### {name}: {p['status']}, last lines", "", "```", *p["log_tail"][-12:], "```"]
    return "\n".join(lines) + "\n"
