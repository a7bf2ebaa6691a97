"""Read the data dependences of a compiled HLO module (text) — used to check that dual-batch
overlap's two microbatch chains are independent (tests) without a multi-GPU profile."""

from __future__ import annotations

import re

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")


def parse_computations(hlo_text: str) -> dict[str, dict[str, dict]]:
    """computation name -> instruction name -> {"op", "operands", "scope", "calls"}."""
    comps: dict[str, dict[str, dict]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = comps.setdefault(header.group(1), {})
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, _, op, rest = m.groups()
        args = rest.split("),", 1)[0]
        scope = re.search(r'op_name="([^"]*)"', line)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
        current[name] = {"op": op, "operands": re.findall(r"%([\w.\-]+)", args),
                         "scope": scope.group(1) if scope else "", "calls": calls}
    return comps


# Instructions that read no data (the device's id, literals, inputs): shared by both chains.
SOURCES = ("partition-id", "replica-id", "constant", "parameter", "iota")


def ancestors(instrs: dict[str, dict], name: str) -> set[str]:
    """Every data-carrying instruction `name` transitively reads, within one computation."""
    seen, stack = set(), [name]
    while stack:
        for operand in instrs.get(stack.pop(), {}).get("operands", ()):
            if operand not in seen and instrs.get(operand, {}).get("op") not in SOURCES:
                seen.add(operand)
                stack.append(operand)
    return seen


def collectives(instrs: dict[str, dict]) -> list[str]:
    return [n for n, i in instrs.items() if any(i["op"].startswith(c) for c in COLLECTIVES)]
