"""`spmdinfer plan`: where every rank of a world will run, without MPI or loading models."""

from __future__ import annotations

from .errors import WorldSizeError
from .spec import JobSpec
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
