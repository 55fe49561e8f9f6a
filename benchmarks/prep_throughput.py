"""Throughput of the conversion: images/s per CPU core, on the demo corpus and on 1-2 MP photos.

    python -m benchmarks.prep_throughput      # prints a Markdown table (about two minutes on 2 cores)
    python -m benchmarks.prep_throughput --photos 64 --demo-docs 1000 --repeat 1   # a quick look

Nothing is downloaded. The "photos" are synthetic photo-like JPEGs of 1.2-2 MP (smooth gradients,
overlapping soft shapes, sensor-like noise, saved at quality 90), so that the benchmark needs no
download. When scikit-learn is installed, its two sample photos (0.27 MP) are measured too, as they
are and tiled 2x2 (1.09 MP of real photo pixels). Rows:

- end to end: the real command (`msa-prep demo` / `msa-prep pairs`) through `convert`, all passes
  (read, decode, validate, resize, re-encode, hash, spill, dedup, shard writing), with 1 worker and
  with every core; images/s per core = images / seconds / workers.
- normalizer only: `normalize_image` in a loop on bytes already in memory, one core.

Each row is the fastest of --repeat runs: on a shared machine the slower runs measure the neighbours.
The header says how well two processes of a plain CPU-bound loop scaled just before and after.

The conversion is checked before it is timed: every input must come out as a document.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from data_prep.convert import ConvertOptions, convert
from data_prep.executor import default_workers
from data_prep.normalize import NormalizeConfig, normalize_image
from data_prep.readers.demo import DemoReader
from data_prep.readers.pairs import PairsReader

REAL_PHOTOS = ("sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg")


def photo_like_jpeg(seed: int, megapixels: float) -> bytes:
    rng = random.Random(seed)
    w = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = int(w * 3 / 4)
    small = Image.new("RGB", (64, 48))
    px = small.load()
    c0 = [rng.randrange(256) for _ in range(3)]
    c1 = [rng.randrange(256) for _ in range(3)]
    for y in range(48):
        for x in range(64):
            t = (x / 63 + y / 47) / 2
            px[x, y] = tuple(int(a + (b - a) * t) for a, b in zip(c0, c1))
    im = small.resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(40):
        x, y = rng.randrange(w), rng.randrange(h)
        r = rng.randrange(w // 40, w // 6)
        box = (x - r, y - rng.randrange(r // 2, 2 * r), x + r, y + rng.randrange(r // 2, 2 * r))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.6 else d.rectangle)(box, fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise((w, h), 24).convert("RGB")
    im = Image.blend(im, noise, 0.12)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def real_photo_mosaics(paths: list[Path], n: int) -> list[bytes]:
    """2x2 mosaics of real photos (mirrored and in different orders, so they differ), JPEG q90."""
    photos = [Image.open(p).convert("RGB") for p in paths]
    w, h = photos[0].size
    out = []
    for i in range(n):
        canvas = Image.new("RGB", (2 * w, 2 * h))
        for k in range(4):
            im = photos[(i + k) % len(photos)].resize((w, h))
            if (i >> k) & 1:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(im, ((k % 2) * w, (k // 2) * h))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _pairs_dir(root: Path, images: list[bytes]) -> Path:
    for i, data in enumerate(images):
        (root / f"{i:06d}.jpg").write_bytes(data)
        (root / f"{i:06d}.txt").write_text(f"photo number {i} of the throughput benchmark")
    return root


def best_of(repeat: int, measure) -> tuple[int, float]:
    """The fastest of `repeat` runs: on shared cores the slower ones measure the neighbours."""
    runs = [measure(k) for k in range(repeat)]
    return min(runs, key=lambda r: r[1])


def _end_to_end(reader, workers: int, out: Path, expect_docs: int, unit_docs: int) -> tuple[int, float]:
    opts = ConvertOptions(created_by="bench", workers=workers, quiet=True, dedup_images=False, unit_docs=unit_docs)
    cfg = NormalizeConfig(min_image_side=8)
    t0 = time.perf_counter()
    res = convert(reader, out, cfg, opts)
    dt = time.perf_counter() - t0
    m = res.manifest
    if m.documents != expect_docs or m.rejected:
        raise RuntimeError(f"benchmark conversion lost documents: {m.documents}/{expect_docs}, {m.rejected}")
    return m.images, dt


def _normalizer_only(images: list[bytes], repeat: int = 1) -> tuple[int, float]:
    cfg = NormalizeConfig(min_image_side=8)
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for data in images:
            normalize_image(data, cfg)
            n += 1
    return n, time.perf_counter() - t0


def _busy_loop(n: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(n):
        s += i
    return time.perf_counter() - t0


def cpu_scaling(workers: int, n: int = 20_000_000) -> float:
    """How much faster `workers` processes finish `workers` copies of a pure-Python loop than one does
    one copy, right now: the shared cores of a CI machine rarely give `workers` x."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    one = _busy_loop(n)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_busy_loop, [1000] * workers))  # start the workers outside the timing
        t0 = time.perf_counter()
        list(pool.map(_busy_loop, [n] * workers))
        many = time.perf_counter() - t0
    return workers * one / many


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=256, help="synthetic 1.2-2 MP JPEGs to convert")
    ap.add_argument("--demo-docs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeat", type=int, default=3, help="report the fastest of this many runs of each row")
    args = ap.parse_args(argv)
    rows = []
    scaling_before = cpu_scaling(args.workers) if args.workers > 1 else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for w in sorted({1, args.workers}):
            n, dt = best_of(args.repeat, lambda k: _end_to_end(
                DemoReader(args.demo_docs, seed=0, max_chars=2000), w, tmp / f"demo{w}-{k}", args.demo_docs, 100))
            rows.append(("demo corpus, 64x64 PNG (drawn, then normalized), end to end", n, w, dt))
        photos = [photo_like_jpeg(i, 1.2 + 0.8 * i / max(1, args.photos - 1)) for i in range(args.photos)]
        mp = sum(Image.open(io.BytesIO(p)).size[0] * Image.open(io.BytesIO(p)).size[1] for p in photos) / len(photos)
        src = _pairs_dir(Path(tempfile.mkdtemp(dir=tmp)), photos)
        for w in sorted({1, args.workers}):
            n, dt = best_of(args.repeat, lambda k: _end_to_end(
                PairsReader(str(src)), w, tmp / f"photos{w}-{k}", args.photos, 8))
            rows.append((f"synthetic photo-like JPEG q90, 1.2-2 MP (mean {mp / 1e6:.2f} MP), `pairs`, end to end",
                         n, w, dt))
        n, dt = best_of(args.repeat, lambda k: _normalizer_only(photos))
        rows.append(("synthetic photo-like JPEG 1.2-2 MP, normalizer only", n, 1, dt))
        demo_images = [b for d in DemoReader(200).read({"start": 0, "stop": 200, "n": 200})
                       for b in (p.data for p in d.parts if hasattr(p, "data"))]
        n, dt = best_of(args.repeat, lambda k: _normalizer_only(demo_images))
        rows.append(("demo 64x64 PNG, normalizer only", n, 1, dt))
        site = Path(os.__file__).parent / "site-packages"
        real = [p for p in (Path(site, r) for r in REAL_PHOTOS) if p.exists()]
        if not real:
            import site as site_mod

            real = [Path(s, r) for s in site_mod.getsitepackages() for r in REAL_PHOTOS if Path(s, r).exists()]
        if real:
            data = [p.read_bytes() for p in real]
            n, dt = best_of(args.repeat, lambda k: _normalizer_only(data, repeat=max(1, 100 // len(data))))
            sizes = ", ".join(f"{p.name} {Image.open(p).size[0]}x{Image.open(p).size[1]}" for p in real)
            rows.append((f"real photos ({sizes}; 0.27 MP), normalizer only", n, 1, dt))
            tiles = real_photo_mosaics(real, 32)
            w, h = Image.open(io.BytesIO(tiles[0])).size
            n, dt = best_of(args.repeat, lambda k: _normalizer_only(tiles))
            rows.append((f"real photo pixels tiled 2x2 to {w}x{h} ({w * h / 1e6:.2f} MP), JPEG q90, normalizer only",
                         n, 1, dt))
    scaling_after = cpu_scaling(args.workers) if args.workers > 1 else 1.0
    print(f"{datetime.date.today()} | {_cpu_name()}, {os.cpu_count()} CPUs | Pillow {Image.__version__} | "
          f"max side 512, JPEG q90 out | {args.workers} processes of a CPU-bound loop ran "
          f"{scaling_before:.2f}x / {scaling_after:.2f}x one (before / after)\n")
    print("| input | images | workers | seconds | images/s | images/s per core |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, w, dt in rows:
        print(f"| {name} | {n} | {w} | {dt:.2f} | {n / dt:,.1f} | {n / dt / w:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
