"""`msa-flops` reproduces the paper's 28.4x and its formula matches a brute-force sum.

    pytest -q tests/model/test_flops.py
"""
import json

from model.flops import attention_flops_per_token, main
from model.presets import get_preset


def test_paper_ratio_json(capsys):
    assert main(["--preset", "paper-109b", "--context", "1048576", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert round(r["attention_compute_ratio"], 1) == 28.4
    assert r["attention_compute_ratio_ceiling"] == 32.0
    assert round(r["params_total"] / 1e9) == 109
    assert r["params_active"] < r["params_active_with_embeddings"] < r["params_total"]
    assert r["paper"]["attention_compute_ratio"] == 28.4


def test_formula_matches_brute_force_sum():
    cfg = get_preset("tiny")
    for N in (1, 100, 128, 129, 1000):
        a = attention_flops_per_token(cfg, N)
        kB = cfg.msa.topk * cfg.msa.block_size
        Hq, dh, HI, dI = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads, cfg.msa.index_dim
        dense = sum(4 * Hq * dh * t for t in range(1, N + 1)) / N
        msa = sum(2 * HI * dI * t + 4 * Hq * dh * min(t, kB) for t in range(1, N + 1)) / N
        assert abs(a["dense"] - dense) < 1e-6 * dense and abs(a["msa"] - msa) < 1e-6 * msa


def test_table_and_errors(capsys):
    assert main(["--preset", "tiny", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "ratio dense / MSA" in out and "parameters: total" in out
    assert main(["--preset", "tiny", "--context", "0"]) == 2
