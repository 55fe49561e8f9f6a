"""`msa-eval`: held-out LM loss and long-range retrieval accuracy of a checkpoint.

    msa-eval --checkpoint runs/demo/ray/<run>[/checkpoint_000120] [--shards runs/demo/heldout] [--log]

Retrieval: every held-out document with a scored answer (the demo corpus's questions) is packed alone
into a row; a question counts as answered when the model's greedy prediction matches every answer
token (teacher-forced). Accuracy is reported overall and per distance bucket (characters of text
between the key item and the question), so long-range retrieval can be told apart from short-range.
`--log` writes `eval/lm_loss` and `eval/retrieval_acc` (and the per-bucket figures) into the run's
MLflow run at the checkpoint's step. The training loop calls `evaluate()` periodically too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.reader import iter_documents
from data_prep.tokenizer import load_tokenizer
from model.batch import Batch
from pipeline.checkpoint import CheckpointError
from pipeline.packing import DocumentError, ImageDecoder, PackSpec, Tokenizer, pack_documents, pack_pieces, \
    tokenize_document

DISTANCE_BUCKETS = (0, 500, 1000, 2000)  # characters; the last bucket is open-ended


def bucket_name(distance: int) -> str:
    lo = max(b for b in DISTANCE_BUCKETS if b <= distance)
    i = DISTANCE_BUCKETS.index(lo)
    hi = DISTANCE_BUCKETS[i + 1] if i + 1 < len(DISTANCE_BUCKETS) else None
    return f"{lo}-{hi}" if hi else f"{lo}+"


@dataclass
class EvalResult:
    lm_loss: float
    lm_tokens: int
    retrieval_acc: float
    questions: int
    by_bucket: dict[str, tuple[int, int]] = field(default_factory=dict)  # bucket -> (correct, total)
    dropped: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        m = {"eval/lm_loss": self.lm_loss, "eval/retrieval_acc": self.retrieval_acc}
        for b, (c, n) in sorted(self.by_bucket.items()):
            m[f"eval/retrieval_acc/{b}"] = c / n if n else float("nan")
        return m


def _batches(cols: dict, batch_size: int):
    n = len(cols["tokens"])
    for i in range(0, n, batch_size):
        yield Batch.from_dict({k: v[i:i + batch_size] for k, v in cols.items()})


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards_dir: str, tokenizer_path: str, seq_len: int, image_size: int,
             patch_size: int, device: torch.device, batch_size: int = 4, max_documents: int | None = None,
             autocast=None) -> EvalResult:
    was_training = model.training
    model.eval()
    tok = Tokenizer(load_tokenizer(Path(tokenizer_path)))
    spec = PackSpec(seq_len, image_size, patch_size)
    decode = ImageDecoder(image_size)
    docs = list(iter_documents(Path(shards_dir), limit=max_documents))
    dropped: dict[str, int] = {}
    ctx = autocast or torch.autocast(device.type, enabled=False)

    # held-out LM loss: the documents packed as in training, loss summed over text targets
    total, n_tok = 0.0, 0
    for batch in _batches(pack_documents(docs, tok, spec, decode, dropped), batch_size):
        batch = batch.to(device)
        with ctx:
            out = model(batch)
        n = batch.n_text_targets
        total += float(out.losses["lm"]) * n
        n_tok += n

    # retrieval: one question per row, so every answer is scored against its own document's meta
    rows, meta = [], []
    for doc in docs:
        if not any(s.role == "answer" for s in doc.segments):
            continue
        try:
            pieces = tokenize_document(doc, tok, spec, decode)
        except DocumentError as e:
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
            continue
        if len(pieces) != 1:  # longer than a row: the question would be cut from its key item
            dropped["question_longer_than_row"] = dropped.get("question_longer_than_row", 0) + 1
            continue
        rows.append(pieces[0])
        meta.append(doc.meta)
    correct_by: dict[str, list[int]] = {}
    for i in range(0, len(rows), batch_size):
        cols = pack_pieces(rows[i:i + batch_size], spec, tok.pad, one_per_row=True)
        batch = Batch.from_dict(cols).to(device)
        with ctx:
            logits_BTV = model(batch, return_logits=True).logits
        pred_BT = logits_BTV.argmax(-1)
        ok_B = ((pred_BT == batch.targets_BT) | ~batch.answer_mask_BT).all(-1)
        for r in range(len(ok_B)):
            c = correct_by.setdefault(bucket_name(int(meta[i + r].get("distance_chars", 0))), [0, 0])
            c[0] += int(ok_B[r])
            c[1] += 1
    if was_training:
        model.train()
    n_q = sum(n for _, n in correct_by.values())
    acc = sum(c for c, _ in correct_by.values()) / n_q if n_q else float("nan")
    return EvalResult(lm_loss=total / n_tok if n_tok else float("nan"), lm_tokens=n_tok, retrieval_acc=acc,
                      questions=n_q, by_bucket={k: tuple(v) for k, v in correct_by.items()}, dropped=dropped)


def load_checkpoint_model(checkpoint: Path):
    """The model of a checkpoint directory (or of a run directory's newest checkpoint), verified,
    with the run's config (from the run's run_info.json)."""
    from pipeline.checkpoint import check_shapes, load_checkpoint, resolve_checkpoint
    from pipeline.config import config_from_dict
    from pipeline.loop import build_model

    checkpoint = resolve_checkpoint(Path(checkpoint))
    info_path = checkpoint.resolve().parent / "run_info.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path}: the checkpoint's run has no run_info.json")
    info = json.loads(info_path.read_text())
    cfg = config_from_dict(info["config"])
    state, _, manifest = load_checkpoint(checkpoint)
    model = build_model(cfg)
    check_shapes(manifest, model.state_dict(), checkpoint)
    model.load_state_dict(state["model"])
    return model, cfg, state, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="msa-eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--shards", default=None, help="held-out shards (default: data.eval_shards of the run)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--log", action="store_true", help="log the results into the run's MLflow run")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    try:
        model, cfg, state, info = load_checkpoint_model(args.checkpoint)
        shards = args.shards or cfg.data.eval_shards
        if not shards:
            raise FileNotFoundError("no held-out shards: pass --shards or set data.eval_shards in the config")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        res = evaluate(model, shards, cfg.tokenizer_path, cfg.seq_len, cfg.model.image_size, cfg.model.patch_size, device,
                       args.batch_size, args.max_documents)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"msa-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"step {state['step']}: eval/lm_loss {res.lm_loss:.4f} over {res.lm_tokens:,} tokens; "
          f"eval/retrieval_acc {res.retrieval_acc:.3f} over {res.questions} questions")
    for b, (c, n) in sorted(res.by_bucket.items(), key=lambda kv: int(kv[0].split("-")[0].rstrip("+"))):
        print(f"  distance {b:>10} chars: {c:>4}/{n:<4} = {c / n:.3f}")
    if res.dropped:
        print(f"  skipped: {json.dumps(res.dropped)}")
    if args.log:
        from pipeline.tracking import MlflowTracker, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri, info["tracking_uri"])
        metrics = {k: v for k, v in res.metrics().items() if not math.isnan(v)}
        tracker = MlflowTracker(uri, info["mlflow_run_id"], progress_key="eval/lm_loss")
        if tracker.logged_through >= state["step"]:
            print(f"MLflow run {info['mlflow_run_id']} has eval metrics at step {state['step']} already; "
                  f"not logged again")
        else:
            tracker.log_metrics(metrics, state["step"])
            print(f"logged to MLflow run {info['mlflow_run_id']} at step {state['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
