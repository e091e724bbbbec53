"""``slidestream models [--json]``: the foundation-model presets (:mod:`models.zoo`) — name,
architecture, output width, µm/px, licence and gating, hub id, and whether the weights are in the
local Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``, or ``--cache-dir``; nothing is fetched).
Any preset name is accepted wherever a job takes an encoder (``--encoder uni``)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON list (every field, with sources)")
    p.add_argument(
        "--cache-dir", default=None, help="Hugging Face hub cache to look in (default: huggingface_hub's)"
    )


def table(rows: list[dict]) -> str:
    """The rows of :func:`models.zoo.model_rows` as a fixed-width text table."""
    head = ("preset", "architecture", "dim", "µm/px", "licence", "gated", "hub id", "local")
    body = [
        (
            r["preset"],
            r["arch"],
            str(r["dim"]),
            f"{r['mpp']:g}" if r["mpp"] is not None else "-",
            r["licence"],
            "gated" if r["gated"] else "open",
            r["hub_id"],
            "yes" if r["present"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in (head, *body)]
    n = sum(r["present"] for r in rows)
    lines.append(
        f"{n} of {len(rows)} presets have weights in the local cache; use one as --encoder NAME or "
        f"hf-hub:ORG/NAME (gated models: accept the licence on the hub page and `huggingface-cli login`)"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from models.zoo import model_rows

    rows = model_rows(cache_dir=args.cache_dir)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0
