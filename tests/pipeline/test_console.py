"""What msa-train's console shows: rank 0's progress lines, whole, and Ray's known-harmless lines gone."""
import io
import sys
import time

from pipeline.console import KNOWN_HARMLESS_LINES, LineFilter, ProgressLog, ProgressTail, without_known_harmless_lines

# the line as Ray's core worker writes it, forwarded with the actor's prefix
HARMLESS = ("(TrainController pid=22353) [2026-11-29 21:41:48,301 E 22353 22386] core_worker.cc:2465: Actor with "
            "class name: 'PreemptionWatcher' and ID: '763f8a09bb' has constructor arguments in the object store "
            "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
            "restart will fail.")


def test_line_filter_drops_only_known_harmless_whole_lines():
    assert any(d in HARMLESS for d in KNOWN_HARMLESS_LINES)
    out = io.StringIO()
    f = LineFilter(out)
    # written in pieces, as a log thread does: a line is judged once its newline is there
    f.write("(SplitCoordinator pid=1) Starting execution of Dataset train_0\n" + HARMLESS[:40])
    assert out.getvalue() == "(SplitCoordinator pid=1) Starting execution of Dataset train_0\n"
    f.write(HARMLESS[40:] + "\n")
    f.write("RuntimeError: a real error\nTraceback (most recent")
    assert out.getvalue().splitlines() == ["(SplitCoordinator pid=1) Starting execution of Dataset train_0",
                                           "RuntimeError: a real error"]
    f.close()  # an unfinished line is not lost
    assert out.getvalue().endswith("RuntimeError: a real error\nTraceback (most recent")


def test_stderr_is_filtered_only_while_the_run_trains(capsys):
    with without_known_harmless_lines():
        print(HARMLESS, file=sys.stderr)
        print("a warning worth reading", file=sys.stderr)
    print(HARMLESS, file=sys.stderr)  # outside: untouched
    err = capsys.readouterr().err
    assert err.count("max_restarts > 0") == 1 and "a warning worth reading" in err


def test_progress_tail_prints_rank0_lines_whole_and_only_new_ones(tmp_path):
    log = ProgressLog(tmp_path)
    log.say("[train] before this driver started")  # a resumed run's old lines are not printed again
    out = io.StringIO()
    tail = ProgressTail(tmp_path, out=out, poll_s=0.01)
    with tail:
        log.say("[train] step 5/20  loss 7.1")
        with open(tmp_path / "progress.log", "a") as f:
            f.write("[train] step 10/20 ")  # a line still being written is held back
        deadline = time.monotonic() + 10
        while not out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # a few more polls: the unfinished line must still be held back
        assert out.getvalue() == "[train] step 5/20  loss 7.1\n"
        with open(tmp_path / "progress.log", "a") as f:
            f.write(" loss 6.5\n")
    assert out.getvalue() == "[train] step 5/20  loss 7.1\n[train] step 10/20  loss 6.5\n"
