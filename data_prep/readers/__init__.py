"""Format readers: each turns one kind of corpus into raw input documents (`data_prep.raw.RawDoc`).

A reader is a small picklable object (it travels to worker processes and Ray tasks) with:

    describe() -> dict            what it reads, for the manifest and the resume digests
    plan(unit_docs) -> [spec]     the input split into work units, in input order; a spec is a small
                                  JSON-able dict with "n", the number of input documents it holds
    read(spec) -> iter[RawDoc]    that unit's documents, in order; never raises for bad input

Planning is cheap (listing files, reading parquet footers, scanning tar headers) and deterministic:
the same input gives the same units, whatever the number of workers.
"""
from __future__ import annotations

from typing import Iterator

from data_prep.raw import RawDoc

DEFAULT_MAX_IMAGE_BYTES = 32 * 2**20
MAX_TEXT_FILE_BYTES = 16 * 2**20  # a page, a caption file or one JSONL line


class Reader:
    name = ""
    max_image_bytes = DEFAULT_MAX_IMAGE_BYTES  # set by the converter from the normalizer's limit

    def describe(self) -> dict:
        raise NotImplementedError

    def plan(self, unit_docs: int) -> list[dict]:
        raise NotImplementedError

    def read(self, spec: dict) -> Iterator[RawDoc]:
        raise NotImplementedError


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
