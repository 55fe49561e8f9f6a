"""The data plan: which shards are read, in which order, epoch after epoch — and what was consumed.

A plan is a list of entries `(epoch, shard)`; the Ray Data stream reads them in this order. Every
packed row carries its entry's index (`plan_idx`) and the number of documents it completes
(`docs_done`), so the loop can count, per entry, documents consumed across all workers. An entry
whose count reaches its shard's document count is *consumed*; a resumed run (after a worker failure
or `msa-train --resume`) reads only the entries not yet consumed. Rows of shards that were in flight
at the checkpoint are read again (at most a few blocks per worker).

Weighted mixing works at shard granularity: each epoch takes from every shard set a number of shards
proportional to its weight (by estimated tokens), cycling through a set's shards in a seeded order
when it needs more than it has; the epoch's shards are then shuffled with (seed, epoch).
Same config + same manifests -> same plan.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.shards import Manifest, shard_paths


@dataclass(frozen=True)
class ShardRef:
    path: str
    documents: int
    est_tokens: int  # text + image tokens, estimated from the manifest


@dataclass(frozen=True)
class PlanEntry:
    epoch: int
    shard: int  # index into DataPlan.shards


@dataclass
class DataPlan:
    shards: list[ShardRef]
    entries: list[PlanEntry]

    def expected_docs(self) -> list[int]:
        return [self.shards[e.shard].documents for e in self.entries]

    def to_json(self) -> dict:
        return {"shards": [asdict(s) for s in self.shards], "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> "DataPlan":
        return cls([ShardRef(**s) for s in d["shards"]], [PlanEntry(**e) for e in d["entries"]])


def _shard_refs(shards_dir: str, image_tokens: int) -> list[ShardRef]:
    manifest = Manifest.read(Path(shards_dir))
    paths = shard_paths(Path(shards_dir))
    return [ShardRef(str(p), s["documents"], s["est_tokens"] + s["images"] * image_tokens)
            for p, s in zip(paths, manifest.shards)]


def build_plan(shard_dirs: list[str], weights: list[float], tokens_needed: int, image_tokens: int,
               seed: int) -> DataPlan:
    """Enough epochs to cover `tokens_needed` (with a margin), mixing the shard sets by weight."""
    sets = [_shard_refs(d, image_tokens) for d in shard_dirs]
    for d, refs in zip(shard_dirs, sets):
        if not refs:
            raise ValueError(f"data.shards: {d} lists no shards in its manifest")
    weights = weights or [1.0] * len(sets)
    shards = [r for refs in sets for r in refs]
    offsets = [sum(len(s) for s in sets[:i]) for i in range(len(sets))]
    set_tokens = [sum(r.est_tokens for r in refs) for refs in sets]
    # one epoch: every set contributes in proportion to its weight, the largest relative to its size
    # reading all of its shards once
    scale = max(t / w for t, w in zip(set_tokens, weights))
    per_epoch = [max(1, round(len(refs) * (scale * w / t))) for refs, w, t in zip(sets, weights, set_tokens)]
    epoch_tokens = sum(n * t / len(refs) for n, t, refs in zip(per_epoch, set_tokens, sets))
    n_epochs = max(1, math.ceil(1.1 * tokens_needed / max(epoch_tokens, 1)))

    cursors = [0] * len(sets)
    orders = [list(range(len(refs))) for refs in sets]
    for i, o in enumerate(orders):
        random.Random(f"{seed}/set{i}/cycle0").shuffle(o)
    cycles = [0] * len(sets)
    entries: list[PlanEntry] = []
    for epoch in range(n_epochs):
        chosen = []
        for i, refs in enumerate(sets):
            for _ in range(per_epoch[i]):
                if cursors[i] == len(refs):  # start a new pass over this set, in a new order
                    cycles[i] += 1
                    orders[i] = list(range(len(refs)))
                    random.Random(f"{seed}/set{i}/cycle{cycles[i]}").shuffle(orders[i])
                    cursors[i] = 0
                chosen.append(offsets[i] + orders[i][cursors[i]])
                cursors[i] += 1
        random.Random(f"{seed}/epoch{epoch}").shuffle(chosen)
        entries += [PlanEntry(epoch, s) for s in chosen]
    return DataPlan(shards, entries)


@dataclass
class DataState:
    """Documents consumed per plan entry, summed over all workers (saved in every checkpoint)."""

    docs_done: list[int]

    def consumed(self, plan: DataPlan) -> list[bool]:
        return [d >= e for d, e in zip(self.docs_done, plan.expected_docs())]

    def remaining_entries(self, plan: DataPlan) -> list[int]:
        return [i for i, c in enumerate(self.consumed(plan)) if not c]

    def restart(self, plan: DataPlan) -> "DataState":
        """After a restart, entries not consumed are read from their start again: their counts reset."""
        return DataState([d if c else 0 for d, c in zip(self.docs_done, self.consumed(plan))])

    def to_json(self) -> dict:
        return {"docs_done": self.docs_done}


DATA_STATE_FILE = "data_state.json"


def write_data_state(directory: Path, plan: DataPlan, state: DataState, step: int) -> None:
    consumed = state.consumed(plan)
    body = {"step": step, **state.to_json(), "consumed_entries": sum(consumed),
            "consumed_shards": sorted({plan.shards[plan.entries[i].shard].path + f"#epoch{plan.entries[i].epoch}"
                                       for i, c in enumerate(consumed) if c})}
    (Path(directory) / DATA_STATE_FILE).write_text(json.dumps(body))


def latest_data_state(run_dir: Path) -> tuple[int, DataState] | None:
    """The data state of the newest checkpoint of a Ray Train run directory (by step), if any."""
    best = None
    for f in Path(run_dir).glob(f"checkpoint_*/{DATA_STATE_FILE}"):
        try:
            body = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or deleted right now
        if best is None or body["step"] > best[0]:
            best = (body["step"], DataState(body["docs_done"]))
    return best
