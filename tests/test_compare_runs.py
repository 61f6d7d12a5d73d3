"""benchmark/compare_runs.py on real TensorBoard event files with known curves."""

import csv

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmark import compare_runs


def write_run(path, returns, sps=1000.0):
    writer = SummaryWriter(str(path))
    for step, value in returns:
        writer.add_scalar("charts/episodic_return", value, step)
    writer.add_scalar("charts/SPS", sps, returns[-1][0])
    writer.close()


def test_groups_by_experiment_and_reports_threshold_steps(tmp_path):
    # "fast": return = step / 10 (seed 1) and step / 10 + 20 (seed 2); "slow": step / 20. Window 1, threshold 50.
    write_run(tmp_path / "CartPole-v1__fast__1__100", [(s, s / 10) for s in range(0, 1001, 100)], sps=1000)
    write_run(tmp_path / "CartPole-v1__fast__2__101", [(s, s / 10 + 20) for s in range(0, 1001, 100)], sps=3000)
    write_run(tmp_path / "CartPole-v1__slow__1__102", [(s, s / 20) for s in range(0, 1001, 100)])
    out = tmp_path / "cmp.png"
    rows = compare_runs.main([str(tmp_path / "*"), "--threshold", "50", "--window", "1", "--smooth", "1",
                              "--out", str(out)])
    by_group = {row["group"]: row for row in rows}
    assert set(by_group) == {"CartPole-v1__fast", "CartPole-v1__slow"}
    fast, slow = by_group["CartPole-v1__fast"], by_group["CartPole-v1__slow"]
    assert fast["runs"] == 2 and slow["runs"] == 1
    assert fast["final_mean"] == pytest.approx(110) and fast["final_std"] == pytest.approx(10)
    assert fast["sps"] == pytest.approx(2000)
    assert sorted(fast["steps_to_threshold"]) == [300, 500]   # 30 + 20 >= 50 at 300; 50 at 500
    assert slow["steps_to_threshold"] == [1000] and slow["reached"] == 1

    assert out.stat().st_size > 10_000
    with open(tmp_path / "cmp.csv") as f:
        table = list(csv.DictReader(f))
    fast_rows = [r for r in table if r["group"] == "CartPole-v1__fast"]
    assert float(fast_rows[-1]["mean"]) == pytest.approx(110) and float(fast_rows[-1]["std"]) == pytest.approx(10)


def test_regex_groups_and_no_runs_is_a_clear_error(tmp_path):
    write_run(tmp_path / "a_lr1e-3_s1", [(0, 1.0), (10, 2.0)])
    write_run(tmp_path / "b_lr1e-3_s2", [(0, 3.0), (10, 4.0)])
    rows = compare_runs.main([str(tmp_path / "*"), "--group", r"lr([0-9.e-]+)", "--window", "1",
                              "--out", str(tmp_path / "x.png")])
    assert [(row["group"], row["runs"], row["final_mean"]) for row in rows] == [("1e-3", 2, 3.0)]
    with pytest.raises(SystemExit, match="no TensorBoard event files"):
        compare_runs.main([str(tmp_path / "nothing-here")])


def test_values_at_steps_average_the_last_points_logged_by_each_step(tmp_path, capsys):
    # Returns equal to step / 100 every 100 steps: the last 3 points by step 450 are 2, 3, 4 (mean 3); seed 2 adds 10.
    write_run(tmp_path / "ALE-Breakout-v5__ours__1__100", [(s, s / 100) for s in range(0, 1001, 100)])
    write_run(tmp_path / "ALE-Breakout-v5__ours__2__101", [(s, s / 100 + 10) for s in range(0, 1001, 100)])
    compare_runs.main([str(tmp_path / "*"), "--at-steps", "450", "1000", "2000", "--window", "3",
                       "--out", str(tmp_path / "x.png")])
    assert "| ALE-Breakout-v5__ours | 8.0 ± 5.0 | 14.0 ± 5.0 | - |" in capsys.readouterr().out
