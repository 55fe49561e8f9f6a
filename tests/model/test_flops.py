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


def test_budget_formulas_match_brute_force_sums():
    cfg = get_preset("tiny")
    B, k = cfg.msa.block_size, cfg.msa.topk
    Hq, dh = cfg.n_heads, cfg.head_dim
    cfg.msa.budget, cfg.msa.budget_ratio, cfg.msa.budget_k_min = "ratio", 0.3, 2
    for N in (1, 100, 1000):
        a = attention_flops_per_token(cfg, N)
        want = 0.0
        for t in range(1, N + 1):
            visible = -(-t // B)
            n = min(visible, max(2, min(k, -(-3 * visible // 10))))  # ceil(0.3 * visible) in integers
            want += 4 * Hq * dh * min(t, n * B)
        assert abs(a["msa_main"] - want / N) < 1e-9 * want / N
    cfg.msa.budget = "top_p"
    counts = {1: 3.0, 3: 1.0}
    a = attention_flops_per_token(cfg, 500, counts)
    want = sum(0.75 * min(t, B) + 0.25 * min(t, 3 * B) for t in range(1, 501)) / 500 * 4 * Hq * dh
    assert abs(a["msa_main"] - want) < 1e-9 * want
    # without measured counts, top_p is costed at its worst case: k blocks for every token (static)
    cfg.msa.budget = "static"
    static = attention_flops_per_token(cfg, 500)
    cfg.msa.budget = "top_p"
    assert attention_flops_per_token(cfg, 500)["msa"] == static["msa"]


def test_budget_cli_reads_measured_counts(tmp_path, capsys):
    path = tmp_path / "blocks_per_token.json"
    path.write_text(json.dumps({"hist": {"4": 30, "16": 10}}))
    assert main(["--preset", "paper-109b", "--context", "1048576", "--budget", "top_p", "--counts", str(path),
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["budget"] == "top_p" and r["budget_counts"] == "measured"
    # fewer keys than static top-16 on average, so more than its 28.4x
    assert r["attention_compute_ratio"] > r["static_attention_compute_ratio"] > 28
    assert main(["--preset", "paper-109b", "--context", "1048576", "--budget", "top_p", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["attention_compute_ratio"] == r["static_attention_compute_ratio"]
    assert "worst case" in r["budget_counts"]
    path.write_text(json.dumps({"hist": {"zero": 3}}))
    assert main(["--preset", "tiny", "--context", "1024", "--budget", "top_p", "--counts", str(path)]) == 2
    assert "not (blocks, tokens)" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--context", "1024", "--budget", "ratio", "--budget-ratio", "3"]) == 2
    assert "model.msa.budget_ratio" in capsys.readouterr().err
