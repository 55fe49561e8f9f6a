"""`msa-prep`: corpora -> validated WebDataset shards + manifest + tokenizer.

    msa-prep demo --output /tmp/demo --documents 2000
    msa-prep tokenizer /tmp/demo --vocab-size 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep.demo_corpus import generate_corpus
from data_prep.schema import FORMAT_VERSION
from data_prep.shards import Manifest, write_shards
from data_prep.tokenizer import train_tokenizer_on_shards


class FatalError(Exception):
    """A problem that stops the whole command (bad input path, unwritable output)."""


def _prepare_output(path: Path) -> Path:
    path = Path(path).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FatalError(f"output directory {path} is not writable: {e.strerror or e}") from None
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    out = _prepare_output(args.output)
    t0 = time.perf_counter()
    docs = generate_corpus(args.seed, args.documents, max_chars=args.max_chars, image_size=args.image_size)
    infos = write_shards(docs, out, target_bytes=int(args.shard_size_mb * 2**20), max_docs=args.shard_docs)
    manifest = Manifest(format_version=FORMAT_VERSION, created_by="msa-prep demo", inputs=args.documents,
                        extra={"seed": args.seed, "max_chars": args.max_chars, "image_size": args.image_size})
    for info in infos:
        manifest.add_shard(info)
    manifest.write(out)
    dt = time.perf_counter() - t0
    print(f"wrote {manifest.documents} documents, {manifest.images} images in {len(infos)} shards to {out} "
          f"({dt:.1f}s)")
    if args.vocab_size:
        tok_path = train_tokenizer_on_shards(out, args.vocab_size)
        manifest.tokenizer = tok_path.name
        manifest.write(out)
        print(f"trained tokenizer ({args.vocab_size} tokens): {tok_path}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    shards = Path(args.shards_dir).resolve()
    if not shards.is_dir():
        raise FatalError(f"{shards} is not a directory")
    manifest = Manifest.read(shards)
    path = train_tokenizer_on_shards(shards, args.vocab_size, args.output, max_documents=args.max_documents)
    if args.output is None:
        manifest.tokenizer = path.name
        manifest.write(shards)
    print(f"trained tokenizer ({args.vocab_size} tokens): {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-prep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="write the embedded demo corpus as shards (+ tokenizer)")
    d.add_argument("--output", required=True, type=Path)
    d.add_argument("--documents", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-chars", type=int, default=3000, help="length budget of long documents")
    d.add_argument("--image-size", type=int, default=64, help="side of the drawn pictures, pixels")
    d.add_argument("--shard-size-mb", type=float, default=8.0)
    d.add_argument("--shard-docs", type=int, default=500, help="at most this many documents per shard")
    d.add_argument("--vocab-size", type=int, default=4096, help="train a tokenizer of this size (0: none)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on a shard directory")
    t.add_argument("shards_dir", type=Path)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-documents", type=int, default=None)
    t.add_argument("--output", type=Path, default=None, help="default: SHARDS_DIR/tokenizer.json")
    t.set_defaults(func=cmd_tokenizer)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FatalError, FileNotFoundError) as e:
        print(f"msa-prep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
