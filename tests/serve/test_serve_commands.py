"""The `wm serve` / `wm play` entry functions and the serve bench, on the trained tiny run."""

from wm_jax.serve import commands
from wm_jax.serve.bench import bench_http, bench_serve, format_rows, main as bench_main


def test_bad_workdir_and_options_exit_2(tmp_path, capsys):
    assert commands.main(["serve", "--workdir", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert commands.main(["play", "--workdir", str(tmp_path), "--no-browser", "--max-sessions", "0"]) == 2
    assert "--max-sessions must be >= 1" in capsys.readouterr().err
    assert commands.main(["serve", "--workdir", str(tmp_path), "--max-memory-gib", "nan"]) == 2
    assert "--max-memory-gib must be > 0" in capsys.readouterr().err


def test_tokenizer_run_is_refused(tokenizer_run, capsys):
    assert commands.main(["serve", "--workdir", str(tokenizer_run)]) == 2
    assert "serving needs" in capsys.readouterr().err


def test_bench_rows(serve_model, dynamics_run, tmp_path):
    for rows in (bench_serve(serve_model, sessions=(1, 4), steps=2, rounds=1), bench_http(serve_model, (1, 4), 2, 1)):
        assert [r["sessions"] for r in rows] == [1, 4] and rows[0]["speedup"] == 1.0
        assert all(r["frames_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
        assert format_rows(rows).count("\n") == 3
    results = tmp_path / "RESULTS.md"
    assert (
        bench_main(["--workdir", str(dynamics_run), "--sessions", "1", "--steps", "2", "--results", str(results)]) == 0
    )
    assert "## serve" in results.read_text() and "| engine | 1 |" in results.read_text()
