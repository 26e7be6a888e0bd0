"""`spmdinfer plan`: where every rank of a world will run, without MPI or loading models."""

from __future__ import annotations

from .errors import WorldSizeError
from .spec import JobSpec, Step
from .topology import device_for, layout_for, physical_device


def plan(spec: JobSpec, world: int, per_node: int | None = None) -> list[dict]:
    """One row per world rank: its node, replica, stage, model rank, slice files and device."""
    if world < 1:
        raise WorldSizeError(f"-n must be at least 1, got {world}")
    per_node = per_node or world
    if per_node < 1:
        raise WorldSizeError(f"--per-node must be at least 1, got {per_node}")
    rows = []
    for rank in range(world):
        layout = layout_for(world, rank, spec)
        local_rank = rank % per_node
        files = spec.model.graph_paths(layout.model_rank)
        rows.append({
            "rank": rank, "node": rank // per_node, "local_rank": local_rank,
            "replica": layout.replica, "stage": layout.stage, "model_rank": layout.model_rank,
            "files": [str(p) for p in files], "exists": all(p.is_file() for p in files),
            "target": spec.device.target, "device_id": device_for(spec.device, local_rank),
        })
        rows[-1]["device"] = physical_device(spec.device.target, rows[-1]["device_id"])
    return rows


def shared_devices(rows: list[dict]) -> list[tuple[int, int]]:
    """Pairs of ranks on one node that would use the same device."""
    seen, pairs = {}, []
    for row in rows:
        if row["device"] is None:
            continue
        key = (row["node"], row["device"])
        if key in seen:
            pairs.append((seen[key], row["rank"]))
        seen.setdefault(key, row["rank"])
    return pairs


def format_plan(rows: list[dict]) -> str:
    header = ("rank", "node", "local", "replica", "stage", "model_rank", "target", "device",
              "exists", "files")
    table = [header] + [(str(r["rank"]), str(r["node"]), str(r["local_rank"]), str(r["replica"]),
                         str(r["stage"]), str(r["model_rank"]), r["target"],
                         "-" if r["device_id"] is None else str(r["device_id"]),
                         "yes" if r["exists"] else "NO", ", ".join(r["files"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in table)


def program(spec: JobSpec) -> dict:
    """What every model rank runs on a batch: the hooks, the steps and where each output
    comes from (as the job file says; the slices' own names are `validate`'s to check)."""
    steps = spec.steps or (Step(graph=0, name="step1"),)
    last = steps[-1].name
    return {
        "preprocess": spec.input.preprocess or None,
        "steps": [{"name": s.name, "graph": s.graph, "repeat": s.repeat,
                   "feed": dict(s.feed), "inputs": dict(s.inputs), "collect": s.collect,
                   "until": None if s.until is None else
                   {"output": s.until.output, "equals": s.until.equals}} for s in steps],
        "outputs": dict(spec.output.sources) or
                   {name: f"{last}.output{i}" for i, name in enumerate(spec.output_names)},
        "postprocess": spec.output.postprocess or None,
    }


def format_program(described: dict) -> str:
    lines = ["program (on every model rank; graph N is [model] files[N]):"]
    if described["preprocess"]:
        lines.append(f"  [input] preprocess {described['preprocess']} on each batch, before it is shared")
    for step in described["steps"]:
        sources = [f"{name} <- {source}" for name, source in step["inputs"].items()]
        sources += [f"{name} <- {source} of the step before" for name, source in step["feed"].items()]
        times = "once" if step["repeat"] == 1 else f"{step['repeat']} times"
        if step["until"]:
            times = (f"up to {step['repeat']} times, until every row's {step['until']['output']}"
                     f" holds {step['until']['equals']}")
        lines.append(f"  {step['name']}: graph {step['graph']} {times}"
                     + (f"; {', '.join(sources)}" if sources else "; inputs from the batch")
                     + ("; every repeat's outputs collected" if step["collect"] else ""))
    lines.append("  outputs: " + ", ".join(f"{name} <- {source}"
                                           for name, source in described["outputs"].items()))
    if described["postprocess"]:
        lines.append(f"  [output] postprocess {described['postprocess']} on each batch, before it is written")
    return "\n".join(lines)
