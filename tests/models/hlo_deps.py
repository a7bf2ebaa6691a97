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


_MICROBATCH_SCOPE = re.compile(r"layer(\d+)/microbatch([01])/(.*)")


def _stage(rest: str) -> str | None:
    """The DBO stage of an instruction scoped under `layerL/microbatchK/`: attention, router,
    dispatch, experts, combine, or "moe" for an all_to_all round loop (dispatch, experts and
    combine inside one while)."""
    if rest.startswith("attention/"):
        return "attention"
    for stage in ("dispatch", "experts", "combine", "router"):
        if f"{stage}/" in rest or rest.endswith(stage):
            return stage
    if "shard_map/while" in rest:
        return "moe"
    return None


def _users(instrs: dict[str, dict]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {name: [] for name in instrs}
    for name, instr in instrs.items():
        for operand in instr["operands"]:
            if operand in users:
                users[operand].append(name)
    return users


def _descendants(users: dict[str, list[str]], start: set[str]) -> set[str]:
    seen, stack = set(), list(start)
    while stack:
        for user in users.get(stack.pop(), ()):
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen


def dbo_overlap_report(hlo_text: str) -> dict:
    """Checks a compiled step with dual-batch overlap (models/dbo.py) for the data dependences
    that would stop one microbatch's collectives from overlapping the other's compute.

    Instructions of the computation holding the decoder layers are grouped by (layer,
    microbatch, stage) from their scopes; a `while` that runs collectives counts as collectives
    of its stage. Returns:
    - "groups": instruction counts per "L/K/stage";
    - "collectives": collective instructions (or loops running them) per "L/K/stage";
    - "mb0_reads_mb1": microbatch-0 instructions that read anything of microbatch 1 (must be []);
    - "coupled": the pipeline pairs meant to overlap that depend on each other, either way
      (must be []): dispatch of 0 | attention of 1, dispatch of 1 | experts of 0, combine of 0
      | experts of 1, combine of 1 | attention of 0 in the next layer;
    - "unscoped_coupling": collectives under no single microbatch (XLA merged one from each)
      that a microbatch's compute reads (must be []).
    """
    comps = parse_computations(hlo_text)
    runs_collective: dict[str, bool] = {}

    def has_collective(comp: str) -> bool:
        if comp not in runs_collective:
            runs_collective[comp] = False
            instrs = comps.get(comp, {})
            runs_collective[comp] = bool(collectives(instrs)) or any(
                has_collective(c) for i in instrs.values() for c in i["calls"])
        return runs_collective[comp]

    main = max(comps.values(), key=lambda instrs: sum(bool(_MICROBATCH_SCOPE.search(i["scope"])) for i in instrs.values()))
    groups: dict[tuple, set[str]] = {}
    comms: dict[tuple, set[str]] = {}
    merged_collectives = set()
    for name, instr in main.items():
        is_comm = any(instr["op"].startswith(c) for c in COLLECTIVES) or any(has_collective(c) for c in instr["calls"])
        merged = "microbatch0" in instr["scope"] and "microbatch1" in instr["scope"]
        m = None if merged else _MICROBATCH_SCOPE.search(instr["scope"])
        if m is None:
            if is_comm and merged:  # XLA combined one collective of each microbatch
                merged_collectives.add(name)
            continue
        stage = _stage(m.group(3))
        if stage is None:
            continue
        key = (int(m.group(1)), int(m.group(2)), stage)
        groups.setdefault(key, set()).add(name)
        if is_comm:
            comms.setdefault(key, set()).add(name)
    users = _users(main)
    mb1 = set().union(*(v for k, v in groups.items() if k[1] == 1)) if groups else set()
    after_mb1 = _descendants(users, mb1)
    mb0_reads_mb1 = sorted(n for k, v in groups.items() if k[1] == 0 for n in v if n in after_mb1)

    def stage_set(sets, layer, mb, *stages):
        return set().union(set(), *(sets.get((layer, mb, s), set()) for s in stages))

    coupled = []
    layers = sorted({k[0] for k in groups})
    for layer in layers:
        pairs = [
            ("dispatch0", stage_set(comms, layer, 0, "dispatch", "moe"), "attention1", stage_set(groups, layer, 1, "attention")),
            ("dispatch1", stage_set(comms, layer, 1, "dispatch", "moe"), "experts0", stage_set(groups, layer, 0, "experts", "moe")),
            ("combine0", stage_set(comms, layer, 0, "combine", "moe"), "experts1", stage_set(groups, layer, 1, "experts", "moe")),
            ("combine1", stage_set(comms, layer, 1, "combine", "moe"), "next_attention0",
             stage_set(groups, layer + 1, 0, "attention")),
        ]
        for name_a, a, name_b, b in pairs:
            if (a and b) and (_descendants(users, a) & b or _descendants(users, b) & a):
                coupled.append(f"layer{layer}: {name_a} | {name_b}")
    compute = set().union(set(), *groups.values())
    unscoped = sorted(n for n in merged_collectives if _descendants(users, {n}) & compute)
    return {"groups": {f"{k[0]}/{k[1]}/{k[2]}": len(v) for k, v in sorted(groups.items())},
            "collectives": {f"{k[0]}/{k[1]}/{k[2]}": len(v) for k, v in sorted(comms.items())},
            "mb0_reads_mb1": mb0_reads_mb1, "coupled": coupled, "unscoped_coupling": unscoped}
