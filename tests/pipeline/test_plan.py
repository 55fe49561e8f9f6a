"""The data plan: weighted mixing of shard sets, epochs, determinism, and the consumed-shard state."""
from collections import Counter

import pytest

from data_prep.cli import main as prep_main
from pipeline.plan import DataPlan, DataState, build_plan
from pipeline.tracking import resolve_tracking_uri


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    for name, n, seed in (("a", 160, 0), ("b", 40, 1)):
        assert prep_main(["demo", "--output", str(root / name), "--documents", str(n), "--shard-docs", "20",
                          "--seed", str(seed), "--vocab-size", "0", "--quiet"]) == 0
    return str(root / "a"), str(root / "b")


def _tokens_by_set(plan: DataPlan, epoch: int, a_dir: str) -> tuple[float, float]:
    a = b = 0
    for e in plan.entries:
        if e.epoch == epoch:
            ref = plan.shards[e.shard]
            if ref.path.startswith(a_dir):
                a += ref.est_tokens
            else:
                b += ref.est_tokens
    return a, b


def test_weights_set_the_mix_and_epochs_cover_the_tokens(two_sets):
    a_dir, b_dir = two_sets
    equal = build_plan([a_dir, b_dir], [1.0, 1.0], tokens_needed=1, image_tokens=18, seed=0)
    a, b = _tokens_by_set(equal, 0, a_dir)
    assert 0.8 < a / b < 1.25  # set b (4x smaller) is read ~4 times per epoch to match a
    skewed = build_plan([a_dir, b_dir], [3.0, 1.0], tokens_needed=1, image_tokens=18, seed=0)
    a, b = _tokens_by_set(skewed, 0, a_dir)
    assert 2.4 < a / b < 3.75
    epoch_tokens = sum(a for a in _tokens_by_set(skewed, 0, a_dir))
    big = build_plan([a_dir, b_dir], [3.0, 1.0], tokens_needed=int(3.5 * epoch_tokens), image_tokens=18, seed=0)
    assert max(e.epoch for e in big.entries) + 1 >= 4  # enough epochs (with a margin) for the tokens


def test_plan_is_deterministic_and_reshuffled_per_epoch(two_sets):
    kwargs = dict(tokens_needed=10**7, image_tokens=18, seed=5)
    p1 = build_plan(list(two_sets), [], **kwargs)
    p2 = build_plan(list(two_sets), [], **kwargs)
    assert p1.to_json() == p2.to_json()
    assert DataPlan.from_json(p1.to_json()).entries == p1.entries
    order = lambda p, ep: [e.shard for e in p.entries if e.epoch == ep]
    assert Counter(order(p1, 0)) == Counter(order(p1, 1))  # the same shards every epoch...
    assert order(p1, 0) != order(p1, 1)  # ...in another order
    assert order(build_plan(list(two_sets), [], tokens_needed=10**7, image_tokens=18, seed=6), 0) != order(p1, 0)


def test_data_state_marks_consumed_entries_and_keeps_the_ids_of_the_others(two_sets):
    plan = build_plan([two_sets[0]], [], tokens_needed=1, image_tokens=18, seed=0)
    n = len(plan.entries)
    assert plan.expected_docs() == [20] * n
    state = DataState.empty(plan)
    # two workers' consumption since the last checkpoint: entry 0 complete, entry 1 half read
    state.add(plan, [20, 7] + [0] * (n - 2), {0: {1, 2, 3}, 1: {4, 5}})
    assert state.consumed(plan)[:2] == [True, False]
    assert state.remaining_entries(plan) == list(range(1, n))
    assert state.done_ids == {1: {4, 5}}  # a consumed entry is never read again: its ids are dropped
    state.add(plan, [0, 13] + [0] * (n - 2), {1: {6}})
    assert state.remaining_entries(plan) == list(range(2, n)) and state.done_ids == {}
    again = DataState.from_json(state.to_json(plan))
    assert again.docs_done == state.docs_done and again.done_ids == state.done_ids
    assert state.to_json(plan)["consumed_entries"] == 2


def test_resumed_plan_extends_the_old_one(two_sets):
    short = build_plan(list(two_sets), [], tokens_needed=10**5, image_tokens=18, seed=2)
    long = build_plan(list(two_sets), [], tokens_needed=10**7, image_tokens=18, seed=2)
    assert len(long.entries) > len(short.entries)
    assert long.entries[:len(short.entries)] == short.entries  # more epochs after the same ones


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, "sqlite:///cfg.db") == "sqlite:///cfg.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, "sqlite:///cfg.db") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://10.0.0.1:5000", "sqlite:///cfg.db") == "http://10.0.0.1:5000"


def test_run_page_url_opens_the_model_training_view(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import run_page_url

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("page")
    run = client.create_run(exp_id)
    url = run_page_url(uri, run.info.run_id)
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert run_page_url(uri, run.info.run_id, ui_base="http://127.0.0.1:5055").startswith("http://127.0.0.1:5055/#/")


def test_git_commit_names_the_checkout_or_the_given_commit(monkeypatch):
    """The commit every run and study record carries: the checkout's HEAD here (with -dirty when the
    tree has changes), GIT_COMMIT where it is set (a copy of the tree on another machine, whose .git,
    if any, need not describe the files beside it)."""
    import subprocess

    from pipeline.study import git_state
    from pipeline.tracking import PROJECT_ROOT, git_commit

    monkeypatch.delenv("GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout of the project")
    assert git_commit().removesuffix("-dirty") == head.stdout.strip()
    monkeypatch.setenv("GIT_COMMIT", "0123abcd" * 5)
    assert git_commit() == "0123abcd" * 5 and git_state() == ("0123abcd" * 5, False)
    monkeypatch.setenv("GIT_COMMIT", "0123abcd-dirty")
    assert git_state() == ("0123abcd", True)
