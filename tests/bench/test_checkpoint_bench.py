"""`wm bench checkpoint` on a tiny state: shape of the result and a real save/restore.

No timing thresholds here: timings are noisy; the target lives in the benchmark output.
"""

import json
import math

import numpy as np
import orbax.checkpoint as ocp
import pytest

from wm_jax.bench import checkpoint as bench

KEYS = ("sync_blocking_s", "async_blocking_s", "async_total_s", "async_blocking_vs_sync")


def test_make_state_size_and_leaves():
    state = bench.make_state(4.0)
    assert abs(bench.state_megabytes(state) - 4.0) < 0.1
    assert state["params_layer0"].shape[0] == bench.ROWS
    assert all(state[k].dtype == np.float32 for k in state if k != "step")
    assert float(state["nu_layer0"].min()) >= 0.0  # second moments are non-negative


def test_run_reports_finite_positive_figures(tmp_path):
    result = bench.run(state_mb=4.0, repeats=1, workdir=str(tmp_path))
    assert result["bench"] == "checkpoint"
    assert result["repeats"] == 1
    assert result["verified"] is True  # restore of each mode's last checkpoint matched
    assert abs(result["state_mb"] - 4.0) < 0.1
    for key in KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["async_blocking_vs_sync"] == pytest.approx(result["async_blocking_s"] / result["sync_blocking_s"])
    assert list(tmp_path.iterdir()) == []  # temp checkpoint dirs cleaned up
    json.dumps(result)  # the last printed line must be serialisable


def test_verify_restore_catches_a_different_state(tmp_path):
    state = bench.make_state(0.1, seed=0)
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    try:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
        bench.verify_restore(manager, 1, state)  # round-trips
        with pytest.raises(RuntimeError, match="differs"):
            bench.verify_restore(manager, 1, bench.make_state(0.1, seed=1))
    finally:
        manager.close()


def test_main_prints_json_last_and_appends_a_row(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    args = ["--state-mb", "1", "--repeats", "1", "--workdir", str(tmp_path / "ck"), "--results", str(results)]
    assert bench.main(args) == 0
    assert bench.main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["bench"] == "checkpoint"
    lines = results.read_text().splitlines()
    assert sum(line.startswith("| date") for line in lines) == 1  # header once
    assert sum("wm bench checkpoint --state-mb 1 --repeats 1" in line for line in lines) == 2
