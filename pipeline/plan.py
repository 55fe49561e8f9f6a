"""The data plan: which shards are read, in which order, epoch after epoch — and what was consumed.

A plan is a list of entries `(epoch, shard)`; the Ray Data stream reads them in this order. Every
packed row carries its entry's index (`plan_idx`), the number of documents it completes
(`docs_done`) and the ids of the pieces in it (`piece_ids`), so the loop can count, per entry,
documents consumed across all workers. An entry whose count reaches its shard's document count is
*consumed*; a resumed run (after a worker failure or `msa-train --resume`) reads only the entries not
yet consumed, and drops from them the pieces that were trained on already (DataState).

Weighted mixing works at shard granularity: each epoch takes from every shard set a number of shards
proportional to its weight (by estimated tokens), cycling through a set's shards in a seeded order
when it needs more than it has; the epoch's shards are then shuffled with (seed, epoch).
Same config + same manifests -> same plan.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
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
    """Enough epochs to cover `tokens_needed` (with a margin and a spare epoch), mixing the shard
    sets by weight."""
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
    # the estimate does not know the packing's padding nor the documents the ingest will drop: one
    # spare epoch beyond a 10% margin (an entry costs nothing until it is read)
    n_epochs = math.ceil(1.1 * tokens_needed / max(epoch_tokens, 1)) + 1

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
    """The data position, saved in every checkpoint: per plan entry, the documents consumed (summed
    over all workers) and, for entries not yet consumed, the ids of the row pieces already trained on.

    A resumed stream (after a worker failure or `msa-train --resume`) reads only the entries not yet
    consumed and drops the pieces whose ids it lists before packing (pipeline/data.py), so no document
    is trained on twice in an epoch and none is skipped: the rows that were read ahead but not
    trained on when the run stopped are packed again.
    """

    docs_done: list[int]
    done_ids: dict[int, set[int]] = field(default_factory=dict)  # entry -> piece ids consumed

    @classmethod
    def empty(cls, plan: DataPlan) -> "DataState":
        return cls([0] * len(plan.entries))

    def consumed(self, plan: DataPlan) -> list[bool]:
        return [d >= e for d, e in zip(self.docs_done, plan.expected_docs())]

    def remaining_entries(self, plan: DataPlan) -> list[int]:
        return [i for i, c in enumerate(self.consumed(plan)) if not c]

    def add(self, plan: DataPlan, docs_delta: list[int], ids: dict[int, set[int]]) -> None:
        """Fold in what all workers consumed since the last checkpoint."""
        self.docs_done = [a + int(b) for a, b in zip(self.docs_done, docs_delta)]
        for entry, new in ids.items():
            self.done_ids.setdefault(int(entry), set()).update(new)
        consumed = self.consumed(plan)
        # a consumed entry is never read again: its ids are no longer needed
        self.done_ids = {e: s for e, s in self.done_ids.items() if not consumed[e]}

    def to_json(self, plan: DataPlan | None = None) -> dict:
        body = {"docs_done": self.docs_done,
                "done_ids": {str(e): sorted(s) for e, s in sorted(self.done_ids.items())}}
        if plan is not None:  # for a reader of the checkpoint: which shard reads are behind us
            consumed = self.consumed(plan)
            body["consumed_entries"] = sum(consumed)
            body["consumed_shards"] = sorted({f"{plan.shards[plan.entries[i].shard].path}#epoch{plan.entries[i].epoch}"
                                              for i, c in enumerate(consumed) if c})
        return body

    @classmethod
    def from_json(cls, d: dict) -> "DataState":
        return cls([int(x) for x in d["docs_done"]], {int(e): set(v) for e, v in d.get("done_ids", {}).items()})
