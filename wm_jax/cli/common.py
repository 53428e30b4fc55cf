"""What several commands share: exit codes and the evaluation headline."""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_NUMERICS = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


def print_headline(result: dict) -> None:
    """The evaluation's headline figures (`evaluate.headline`) as a two-column table."""
    from wm_jax.eval.evaluate import headline

    rows = [("step", str(result["step"])), *headline(result)]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
