"""`wm eval --tokenizer-workdir DIR`: a dynamics run moved without its tokenizer run
evaluates with the tokenizer named on the command line; a wrong DIR exits 2 naming it."""

import shutil

import yaml

from wm_jax.cli import main


def test_a_run_moved_without_its_tokenizer_evaluates_with_the_flag(tmp_path, tokenizer_run, dynamics_run, capsys):
    run = tmp_path / "dynamics"
    shutil.copytree(dynamics_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["tokenizer_workdir"] = str(tmp_path / "gone")  # where the tokenizer run was, as a copy finds it
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    tokenizer = shutil.copytree(tokenizer_run, tmp_path / "elsewhere" / "tokenizer")

    assert main(["eval", "--workdir", str(run)]) == 2
    assert f"names {tmp_path / 'gone'}, which is not a run directory" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(run), "--tokenizer-workdir", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} is not a run directory" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(run), "--tokenizer-workdir", str(run)]) == 2
    assert "is a dynamics run, not a tokenizer run" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(tokenizer), "--tokenizer-workdir", str(tokenizer)]) == 2
    assert "a tokenizer run reads no tokenizer run" in capsys.readouterr().err

    assert (
        main(["eval", "--workdir", str(run), "--tokenizer-workdir", str(tokenizer), "--out", str(tmp_path / "ev")]) == 0
    )
    assert (tmp_path / "ev" / "metrics.json").is_file()
