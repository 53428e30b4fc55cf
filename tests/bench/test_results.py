"""RESULTS.md: one table per bench, rows appended under the right one."""

from wm_jax.bench import results


def test_rows_land_under_their_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.append_row("checkpoint", ["a", "b"], ["1", "2"], path)
    results.append_row("train", ["x"], ["9"], path)
    results.append_row("checkpoint", ["a", "b"], ["3", "4"], path)
    text = path.read_text()
    checkpoint, train = text.split("## train")
    assert checkpoint.count("| date | a | b |") == 1 and train.count("| date | x |") == 1
    rows = [line for line in checkpoint.splitlines() if line.startswith("| 20")]
    assert [r.split(" | ")[1:] for r in rows] == [["1", "2 |"], ["3", "4 |"]]
    assert "| 9 |" in train


def test_rows_go_to_the_checkout_file_only_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an installed package, run elsewhere: print only
    assert results.default_path() is None
    assert results.append_row("train", ["x"], ["9"], None).endswith("| 9 |")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("# Benchmark results\n")
    assert results.default_path() == results.CHECKOUT_RESULTS
