"""`msa-eval`: held-out LM loss and long-range retrieval accuracy of a checkpoint.

    msa-eval --checkpoint runs/demo/ray/<run>/checkpoint_000060 [--shards runs/demo/heldout] [--log]
    msa-eval --checkpoint runs/demo/ray/<run>          # a run directory: its newest checkpoint

What is measured, on the first `--max-documents` documents of the held-out shards (the same
documents for every model, in shard order):

- **LM loss** over text targets, documents packed into rows as in training; also per **position
  bucket** (the position of the predicting token inside its packed segment, i.e. how much of the
  document the model can see: a document longer than a row is cut into row-sized pieces, each with
  positions from 0) and split into **image text** and **other text**. The LM loss covers text only
  (images are inputs, not targets); *image text* is a text target within IMAGE_TEXT_WINDOW tokens
  after the end of an image in the same segment: the text that can read the picture just shown
  (in the demo corpus the captions that follow their picture). Text before a picture, and answers
  about a picture shown long before, count as other text (the latter are scored by retrieval).
- **Retrieval**: every document with a scored answer (role "answer") is packed alone into a row; a
  question counts as answered when the model's greedy prediction matches every answer token
  (teacher-forced). Accuracy overall, per **distance bucket** in tokens (from the first token of
  the key item, the segment of role "key", to the first answer token; documents without a key
  segment go to bucket "unknown"), and per kind: *text_fact* (the answer is a fact stated in text)
  and *image_fact* (the answer is shown only in a picture).
- With `stats_batches`, the MSA statistics (sparsity, score recall, block recall, overall and per
  layer) averaged over the first LM batches.

Buckets are geometric in the context length L: edges 0, L/32, L/16, L/8, L/4, L/2, L.
`--log` writes the metrics into the run's MLflow run at the checkpoint's step. The training loop
calls `evaluate()` periodically too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from data_prep.reader import iter_documents
from data_prep.tokenizer import load_tokenizer
from model.batch import IGNORE_INDEX, Batch
from pipeline.checkpoint import CheckpointError, resolve_checkpoint
from pipeline.packing import DocumentError, ImageDecoder, PackSpec, Tokenizer, pack_documents, pack_pieces, \
    tokenize_document

IMAGE_TEXT_WINDOW = 32  # text targets this close after an image's end count as image text
BUCKET_FRACTIONS = (32, 16, 8, 4, 2)  # bucket edges at L/32, L/16, ... L/2 of the context L
IMAGE_QA_TYPES = ("color", "count", "shape")  # the demo's questions answered only by a picture


def bucket_edges(context: int) -> tuple[int, ...]:
    """Geometric bucket edges for distances and positions in a context of `context` tokens, the
    context itself the last (every position and in-row distance is below it)."""
    edges = sorted({0, *(max(1, context // f) for f in BUCKET_FRACTIONS), context})
    return tuple(edges)


def bucket_name(value: int, edges: tuple[int, ...]) -> str:
    """"lo-hi" of the bucket holding value (values beyond the context join the last bucket; MLflow
    metric names allow no "+")."""
    i = max(j for j, b in enumerate(edges[:-1]) if b <= value)
    return f"{edges[i]}-{edges[i + 1]}"


def bucket_sort_key(name: str) -> float:
    m = re.match(r"(\d+)", name)
    return float(m.group(1)) if m else math.inf


@dataclass
class EvalResult:
    lm_loss: float
    lm_tokens: int
    retrieval_acc: float
    questions: int
    by_bucket: dict[str, tuple[int, int]] = field(default_factory=dict)  # distance bucket -> (correct, total)
    dropped: dict[str, int] = field(default_factory=dict)
    by_position: dict[str, tuple[float, int]] = field(default_factory=dict)  # bucket -> (loss sum, targets)
    image_text: tuple[float, int] = (0.0, 0)  # (loss sum, targets) of image text
    other_text: tuple[float, int] = (0.0, 0)
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # text_fact/image_fact -> (correct, total)
    stats: dict[str, float] = field(default_factory=dict)  # MSA statistics (stats_batches > 0)
    documents: int = 0
    documents_sha256: str = ""  # of the evaluated documents' content, in order

    @staticmethod
    def _mean(pair) -> float:
        s, n = pair
        return s / n if n else float("nan")

    @property
    def lm_loss_by_position(self) -> dict[str, float]:
        return {b: self._mean(v) for b, v in sorted(self.by_position.items(), key=lambda kv: bucket_sort_key(kv[0]))}

    @property
    def retrieval_acc_by_distance(self) -> dict[str, float]:
        return {b: self._mean(v) for b, v in sorted(self.by_bucket.items(), key=lambda kv: bucket_sort_key(kv[0]))}

    @property
    def retrieval_acc_by_kind(self) -> dict[str, float]:
        return {k: self._mean(v) for k, v in sorted(self.by_kind.items())}

    def metrics(self) -> dict[str, float]:
        m = {"eval/lm_loss": self.lm_loss, "eval/retrieval_acc": self.retrieval_acc,
             "eval/lm_loss_image_text": self._mean(self.image_text),
             "eval/lm_loss_other_text": self._mean(self.other_text)}
        for b, v in self.retrieval_acc_by_distance.items():
            m[f"eval/retrieval_acc/{b}"] = v
        for k, v in self.retrieval_acc_by_kind.items():
            m[f"eval/retrieval_acc_{k}"] = v
        for b, v in self.lm_loss_by_position.items():
            m[f"eval/lm_loss/pos_{b}"] = v
        for k, v in self.stats.items():
            m[f"eval/{k}"] = v
        return m


def _batches(cols: dict, batch_size: int):
    n = len(cols["tokens"])
    for i in range(0, n, batch_size):
        yield Batch.from_dict({k: v[i:i + batch_size] for k, v in cols.items()})


def _document_digest(docs) -> str:
    h = hashlib.sha256()
    for doc in docs:
        for name, data in doc.to_sample().items():
            h.update(name.encode())
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def image_text_mask(batch: Batch, img_end_id: int, window: int = IMAGE_TEXT_WINDOW) -> torch.Tensor:
    """bool [B, T]: the target at t is text that follows an image's end token within `window`
    tokens, in the same segment (t - last_end < window, the end token itself included)."""
    B, T = batch.tokens_BT.shape
    idx_BT = torch.arange(T, device=batch.tokens_BT.device).expand(B, T)
    last_end_BT = torch.where(batch.tokens_BT == img_end_id, idx_BT, -1).cummax(dim=1).values
    seg_start_BT = idx_BT - batch.positions_BT
    near = (last_end_BT >= seg_start_BT) & (last_end_BT >= 0) & (idx_BT - last_end_BT < window)
    return near & (batch.targets_BT != IGNORE_INDEX)


def key_distance(doc, tok: Tokenizer, spec: PackSpec) -> int | None:
    """Tokens from the first token of the key segment to the first answer token (None: no key)."""
    pos, key, answer = 1, None, None  # 1: the <|doc|> token
    for seg in doc.segments:
        if seg.role == "key" and key is None:
            key = pos
        if seg.role == "answer" and answer is None:
            answer = pos
        pos += len(tok.encode(seg.text)) if seg.type == "text" else spec.image_tokens
    return None if key is None or answer is None else answer - key


def _kind(meta: dict) -> str:
    qa = meta.get("qa_type")
    return "other" if qa is None else ("image_fact" if qa in IMAGE_QA_TYPES else "text_fact")


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards_dir: str, tokenizer_path: str, seq_len: int, image_size: int,
             patch_size: int, device: torch.device, batch_size: int = 4, max_documents: int | None = None,
             autocast=None, stats_batches: int = 0) -> EvalResult:
    was_training = model.training
    model.eval()
    tok = Tokenizer(load_tokenizer(Path(tokenizer_path)))
    spec = PackSpec(seq_len, image_size, patch_size)
    decode = ImageDecoder(image_size)
    docs = list(iter_documents(Path(shards_dir), limit=max_documents))
    dropped: dict[str, int] = {}
    ctx = autocast or torch.autocast(device.type, enabled=False)
    edges = bucket_edges(seq_len)
    inner = model.module if hasattr(model, "module") else model
    has_index = bool(getattr(inner, "has_index_branch", False))

    # held-out LM loss: the documents packed as in training, loss summed over text targets
    total, n_tok = 0.0, 0
    pos_sum: dict[str, list[float]] = {}
    img = [0.0, 0]
    other = [0.0, 0]
    stat_sums: dict[str, float] = {}
    n_stat = 0
    for i, batch in enumerate(_batches(pack_documents(docs, tok, spec, decode, dropped), batch_size)):
        batch = batch.to(device)
        with_stats = has_index and i < stats_batches
        with ctx:
            out = model(batch, return_logits=True, compute_stats=with_stats, index_loss=False)
        ce_BT = F.cross_entropy(out.logits.float().transpose(1, 2), batch.targets_BT, ignore_index=IGNORE_INDEX,
                                reduction="none")
        valid_BT = batch.targets_BT != IGNORE_INDEX
        total += float(ce_BT[valid_BT].double().sum())
        n_tok += int(valid_BT.sum())
        is_img_BT = image_text_mask(batch, tok.img_end)
        img[0] += float(ce_BT[is_img_BT].double().sum())
        img[1] += int(is_img_BT.sum())
        is_other_BT = valid_BT & ~is_img_BT
        other[0] += float(ce_BT[is_other_BT].double().sum())
        other[1] += int(is_other_BT.sum())
        for lo_i, lo in enumerate(edges[:-1]):
            hi = edges[lo_i + 1] if lo_i + 2 < len(edges) else None  # the last bucket takes the rest
            in_b = valid_BT & (batch.positions_BT >= lo) & ((batch.positions_BT < hi) if hi else True)
            if in_b.any():
                acc = pos_sum.setdefault(bucket_name(lo, edges), [0.0, 0])
                acc[0] += float(ce_BT[in_b].double().sum())
                acc[1] += int(in_b.sum())
        if with_stats:
            n_stat += 1
            for k, v in out.stats.items():
                if k.endswith(("sparsity", "blocks_per_token", "score_recall", "block_recall")):
                    # model statistics are 0-dim tensors on the device; a float here, one sync per batch
                    stat_sums[k] = stat_sums.get(k, 0.0) + float(v)

    # retrieval: one question per row, so every answer is scored against its own document's meta
    rows, meta, dists = [], [], []
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
        dists.append(key_distance(doc, tok, spec))
    correct_by: dict[str, list[int]] = {}
    kind_by: dict[str, list[int]] = {}
    for i in range(0, len(rows), batch_size):
        cols = pack_pieces(rows[i:i + batch_size], spec, tok.pad, one_per_row=True)
        batch = Batch.from_dict(cols, inner.img_patch_id).to(device)
        with ctx:
            logits_BTV = model(batch, return_logits=True, index_loss=False).logits
        pred_BT = logits_BTV.argmax(-1)
        ok_B = ((pred_BT == batch.targets_BT) | ~batch.answer_mask_BT).all(-1)
        for r in range(len(ok_B)):
            d = dists[i + r]
            for table, key in ((correct_by, "unknown" if d is None else bucket_name(d, edges)),
                               (kind_by, _kind(meta[i + r]))):
                c = table.setdefault(key, [0, 0])
                c[0] += int(ok_B[r])
                c[1] += 1
    if was_training:
        model.train()
    n_q = sum(n for _, n in correct_by.values())
    acc = sum(c for c, _ in correct_by.values()) / n_q if n_q else float("nan")
    return EvalResult(lm_loss=total / n_tok if n_tok else float("nan"), lm_tokens=n_tok, retrieval_acc=acc,
                      questions=n_q, by_bucket={k: tuple(v) for k, v in correct_by.items()}, dropped=dropped,
                      by_position={k: tuple(v) for k, v in pos_sum.items()}, image_text=tuple(img),
                      other_text=tuple(other), by_kind={k: tuple(v) for k, v in kind_by.items()},
                      stats={k: v / n_stat for k, v in stat_sums.items()} if n_stat else {},
                      documents=len(docs), documents_sha256=_document_digest(docs))


def load_checkpoint_model(checkpoint: Path):
    """The model of a checkpoint directory (or of a run directory's newest checkpoint), verified,
    with the run's config (from the run's run_info.json)."""
    from pipeline.checkpoint import check_shapes, load_checkpoint
    from pipeline.config import build_model, config_from_dict

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
    if state.get("budget_match"):  # the budget parameter training had reached (msa.budget_match_topk)
        model.set_budget_param(state["budget_match"]["param"])
    return model, cfg, state, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="msa-eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a checkpoint directory (checkpoint_000120), or a run directory: its newest checkpoint")
    p.add_argument("--shards", default=None, help="held-out shards (default: data.eval_shards of the run)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--log", action="store_true", help="log the results into the run's MLflow run")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        model, cfg, state, info = load_checkpoint_model(ckpt)
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
    print(f"{ckpt}")
    print(f"step {state['step']}: eval/lm_loss {res.lm_loss:.4f} over {res.lm_tokens:,} tokens "
          f"(image text {res.metrics()['eval/lm_loss_image_text']:.4f} over {res.image_text[1]:,}, other text "
          f"{res.metrics()['eval/lm_loss_other_text']:.4f}); "
          f"eval/retrieval_acc {res.retrieval_acc:.3f} over {res.questions} questions")
    for b, (c, n) in sorted(res.by_bucket.items(), key=lambda kv: bucket_sort_key(kv[0])):
        print(f"  distance {b:>12} tokens: {c:>4}/{n:<4} = {c / n:.3f}")
    for k, (c, n) in sorted(res.by_kind.items()):
        print(f"  {k:>21}: {c:>4}/{n:<4} = {c / n:.3f}")
    for b, v in res.lm_loss_by_position.items():
        print(f"  position {b:>12}: lm_loss {v:.4f} over {res.by_position[b][1]:,} targets")
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
