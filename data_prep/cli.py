"""`msa-prep`: corpora -> validated, deduplicated WebDataset shards + manifest + tokenizer.

    msa-prep html PAGES_DIR --output /tmp/web                      # HTML pages with local images
    msa-prep obelics docs.parquet --image-root imgs --output /tmp/ob  # OBELICS-style records
    msa-prep pairs img2dataset_out/ --output /tmp/pairs             # image-caption pairs
    msa-prep demo --output /tmp/demo --documents 2000               # the embedded demo corpus
    msa-prep demo --output /tmp/long --doc-tokens 16384 --image-tokens 258   # documents up to a 16K context
    msa-prep tokenizer /tmp/demo --vocab-size 4096
    msa-prep inspect /tmp/demo --output /tmp/demo-preview.html

Conversions run in local processes (--workers, default: the CPU cores) or, with --ray-address
(auto, host:port, or local for a private local Ray), as Ray tasks. Re-running the same command resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from data_prep.convert import ConvertOptions, NoInput, OutputBusy, convert
from data_prep.executor import default_workers
from data_prep.normalize import NormalizeConfig
from data_prep.readers.demo import DemoReader
from data_prep.readers.html import HtmlReader
from data_prep.readers.obelics import SUFFIXES as OBELICS_SUFFIXES
from data_prep.readers.obelics import ObelicsReader
from data_prep.readers.pairs import PairsReader
from data_prep.shards import Manifest
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


def _readable_input(path: Path, want_dir: bool | None = None) -> Path:
    """The input path, resolved; FatalError when it is missing, unreadable or of the wrong kind."""
    p = Path(path).resolve()
    if not p.exists():
        raise FatalError(f"input {path} does not exist")
    if want_dir is True and not p.is_dir():
        raise FatalError(f"input {path} is not a directory")
    if want_dir is False and p.is_dir():
        raise FatalError(f"input {path} is a directory, expected a file")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise FatalError(f"input {path} is not readable")
    return p


def _check_not_inside(out: Path, inp: Path) -> None:
    inp_dir = inp if inp.is_dir() else inp.parent
    if out == inp_dir or inp_dir in out.parents:
        raise FatalError(f"output {out} is inside the input {inp_dir}: a re-run would read its own shards")


def _normalize_config(args) -> NormalizeConfig:
    try:
        return NormalizeConfig(
            max_image_side=args.max_image_side, min_image_side=args.min_image_side, max_aspect=args.max_aspect,
            max_image_pixels=args.max_image_pixels, max_image_bytes=int(args.max_image_mb * 2**20),
            min_text_chars=args.min_text_chars, image_format=args.image_format, jpeg_quality=args.jpeg_quality)
    except ValueError as e:
        raise FatalError(f"bad option: {e}") from None


def _run_conversion(args, reader, out: Path, extra: dict | None = None) -> int:
    if min(args.shard_docs, args.unit_docs, args.workers) < 1 or args.shard_size_mb <= 0:
        raise FatalError("bad option: --shard-docs, --unit-docs and --workers must be >= 1, --shard-size-mb > 0")
    if args.ray_address not in (None, "local") and args.workers_given:
        raise FatalError("bad option: --workers sizes local processes (or --ray-address local); "
                         "on a Ray cluster, Ray schedules the tasks")
    cfg = _normalize_config(args)
    opts = ConvertOptions(created_by=f"msa-prep {args.command}", shard_docs=args.shard_docs, unit_docs=args.unit_docs,
                          shard_bytes=int(args.shard_size_mb * 2**20), workers=args.workers,
                          ray_address=args.ray_address, dedup_documents=args.dedup_documents,
                          dedup_images=args.dedup_images, quiet=args.quiet, extra=extra or {})
    try:
        res = convert(reader, out, cfg, opts)
    except (NoInput, OutputBusy) as e:
        raise FatalError(str(e)) from None
    m = res.manifest
    print(f"msa-prep {args.command}: {m.inputs} inputs -> {m.documents} documents, {m.images} images in "
          f"{len(m.shards)} shards ({out})")
    if m.rejected:
        print("  rejected documents: " + ", ".join(f"{k} {v}" for k, v in m.rejected.items()))
    if m.images_rejected:
        print("  rejected images:    " + ", ".join(f"{k} {v}" for k, v in m.images_rejected.items()))
    rate = ""
    if res.units_run and res.normalize_seconds > 0:
        rate = f", normalize {m.inputs / res.normalize_seconds:,.0f} docs/s"
    print(f"  {res.seconds:.1f}s{rate}; units run {res.units_run}, skipped {res.units_skipped}; "
          f"shards written {res.shards_written}, skipped {res.shards_skipped}")
    if args.vocab_size:
        tok_path = train_tokenizer_on_shards(out, args.vocab_size)
        m.tokenizer = tok_path.name
        m.write(out)
        print(f"trained tokenizer ({args.vocab_size} tokens): {tok_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.documents < 1:
        raise FatalError("bad option: --documents must be >= 1")
    if args.doc_tokens < 0 or args.image_tokens < 1:
        raise FatalError("bad option: --doc-tokens must be >= 0 and --image-tokens >= 1")
    if args.doc_tokens and args.doc_tokens < 256:
        raise FatalError(f"bad option: --doc-tokens {args.doc_tokens} is too short for a retrieval question "
                         f"at a distance (at least 256)")
    if not 0 <= args.retrieval_frac <= 1:
        raise FatalError(f"bad option: --retrieval-frac must be in [0, 1], got {args.retrieval_frac}")
    out = _prepare_output(args.output)
    reader = DemoReader(args.documents, seed=args.seed, max_chars=args.max_chars, image_size=args.image_size,
                        doc_tokens=args.doc_tokens, image_tokens=args.image_tokens,
                        retrieval_frac=args.retrieval_frac)
    extra = {"seed": args.seed, "max_chars": args.max_chars, "image_size": args.image_size}
    if args.doc_tokens:
        extra.update(doc_tokens=args.doc_tokens, image_tokens=args.image_tokens)
    if args.retrieval_frac != 0.4:
        extra["retrieval_frac"] = args.retrieval_frac
    return _run_conversion(args, reader, out, extra=extra)


def cmd_html(args: argparse.Namespace) -> int:
    inp = _readable_input(args.input_dir, want_dir=True)
    out = _prepare_output(args.output)
    _check_not_inside(out, inp)
    return _run_conversion(args, HtmlReader(str(inp)), out)


def cmd_obelics(args: argparse.Namespace) -> int:
    inp = _readable_input(args.input)
    if inp.is_file() and not inp.name.lower().endswith(OBELICS_SUFFIXES):
        raise FatalError(f"input {args.input} is not a .parquet or .jsonl file")
    root = _readable_input(args.image_root, want_dir=True) if args.image_root else None
    out = _prepare_output(args.output)
    _check_not_inside(out, inp)
    return _run_conversion(args, ObelicsReader(str(inp), str(root) if root else None), out)


def cmd_pairs(args: argparse.Namespace) -> int:
    inp = _readable_input(args.input)
    if inp.is_file() and not inp.name.lower().endswith(".tar"):
        raise FatalError(f"input {args.input} is neither a directory nor a .tar file")
    out = _prepare_output(args.output)
    _check_not_inside(out, inp)
    return _run_conversion(args, PairsReader(str(inp)), out)


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


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspection import inspect_shards

    shards = Path(args.shards_dir).resolve()
    if not shards.is_dir():
        raise FatalError(f"{shards} is not a directory")
    if args.output is not None and args.output.suffix.lower() not in (".html", ".htm"):
        raise FatalError(f"{args.output}: the preview is an HTML file; give a .html path")
    return inspect_shards(shards, args.output, args.documents)


class _WorkersAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.workers_given = True


def _add_conversion_args(p: argparse.ArgumentParser, min_image_side: int = 32, dedup_images: bool = True,
                         vocab_size: int = 0) -> None:
    p.add_argument("--output", required=True, type=Path, help="the shard directory to write (resumable)")
    p.add_argument("--shard-size-mb", type=float, default=8.0, help="target shard size")
    p.add_argument("--shard-docs", type=int, default=500, help="at most this many documents per shard")
    p.add_argument("--unit-docs", type=int, default=100,
                   help="input documents per task: the grain of parallelism and of resume (output does not change)")
    p.add_argument("--workers", type=int, default=default_workers(), action=_WorkersAction,
                   help="local worker processes (default: the CPU cores)")
    p.add_argument("--ray-address", "--address", dest="ray_address", default=None,
                   help="run as Ray tasks: auto, host:port, ray://host:port, or local (a private local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--vocab-size", type=int, default=vocab_size, help="then train a tokenizer of this size (0: none)")
    g = p.add_argument_group("normalization and filters")
    g.add_argument("--max-image-side", type=int, default=512, help="resize so the long side is at most this")
    g.add_argument("--min-image-side", type=int, default=min_image_side, help="drop images with a shorter side")
    g.add_argument("--max-aspect", type=float, default=3.0, help="drop images with long/short side above this")
    g.add_argument("--max-image-pixels", type=int, default=64 * 2**20, help="decompression bomb guard")
    g.add_argument("--max-image-mb", type=float, default=32.0, help="drop image files larger than this")
    g.add_argument("--min-text-chars", type=int, default=10, help="drop documents with less text")
    g.add_argument("--image-format", choices=("auto", "jpg", "png"), default="auto",
                   help="re-encoding: auto = JPEG for JPEG/WebP sources, PNG otherwise")
    g.add_argument("--jpeg-quality", type=int, default=90)
    g.add_argument("--dedup-documents", action=argparse.BooleanOptionalAction, default=True,
                   help="drop documents whose content was seen earlier")
    g.add_argument("--dedup-images", action=argparse.BooleanOptionalAction, default=dedup_images,
                   help="drop images whose normalized bytes were seen earlier")
    p.set_defaults(workers_given=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa-prep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("html", help="a folder tree of HTML pages with their images stored locally")
    h.add_argument("input_dir", type=Path)
    _add_conversion_args(h)
    h.set_defaults(func=cmd_html)

    o = sub.add_parser("obelics", help="OBELICS-style parquet/JSONL records with texts[] and images[]")
    o.add_argument("input", type=Path, help="a .parquet or .jsonl file, or a directory of them")
    o.add_argument("--image-root", type=Path, default=None,
                   help="image paths are relative to this (default: the input's directory)")
    _add_conversion_args(o)
    o.set_defaults(func=cmd_obelics)

    q = sub.add_parser("pairs", help="image-caption pairs in the img2dataset layout (tars or folders)")
    q.add_argument("input", type=Path, help="a directory of .tar shards and/or key.jpg/key.txt files, or a .tar")
    _add_conversion_args(q)
    q.set_defaults(func=cmd_pairs)

    d = sub.add_parser("demo", help="write the embedded demo corpus as shards (+ tokenizer)")
    d.add_argument("--documents", type=int, default=2000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-chars", type=int, default=3000, help="length budget of long documents")
    d.add_argument("--image-size", type=int, default=64, help="side of the drawn pictures, pixels")
    d.add_argument("--doc-tokens", type=int, default=0,
                   help="size documents in estimated tokens instead of --max-chars: stories up to this long, "
                        "retrieval questions at distances spread up to it (e.g. the study's context)")
    d.add_argument("--image-tokens", type=int, default=18,
                   help="tokens one image takes in the model's sequence, for --doc-tokens "
                        "((image_size/patch_size)^2 + 2: 18 for tiny, 258 for small)")
    d.add_argument("--retrieval-frac", type=float, default=0.4, help="share of retrieval documents")
    # the demo draws from a small space of pictures, so identical pictures in different documents are
    # expected (and a retrieval question needs its key picture): no image dedup unless asked
    _add_conversion_args(d, min_image_side=8, dedup_images=False, vocab_size=4096)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on a shard directory")
    t.add_argument("shards_dir", type=Path)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--max-documents", type=int, default=None)
    t.add_argument("--output", type=Path, default=None, help="default: SHARDS_DIR/tokenizer.json")
    t.set_defaults(func=cmd_tokenizer)

    i = sub.add_parser("inspect", help="print a shard directory's stats and write an HTML preview")
    i.add_argument("shards_dir", type=Path)
    i.add_argument("--output", type=Path, default=None, help="preview file (default: SHARDS_DIR/preview.html)")
    i.add_argument("--documents", type=int, default=8, help="how many documents to render")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FatalError, FileNotFoundError, PermissionError) as e:
        print(f"msa-prep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msa-prep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print("msa-prep: error: a worker process died (out of memory?); run the same command again to resume",
              file=sys.stderr)
        return 2
    except Exception as e:
        ray_exc = sys.modules.get("ray.exceptions")
        if ray_exc is not None and isinstance(e, ray_exc.RayError):
            print(f"msa-prep: error: a Ray task failed: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
