"""Progress through Python logging (sepconv.deploy.logs, issue 26): an embedding program routes or silences it; the
commands print the `[  1.2s] stage: message` lines at INFO, warnings with -q, the item-counting lines with -v."""

import logging
import subprocess
import sys
import time

import pytest

from sepconv.deploy import logs

DETAIL = ["[3/9] block_3_bn", "[2/3] conv: refined", "[1/2] c: skipped: shared by several calls",
          "round 6: 1,035,311 timed runs so far; 13 of 58 case(s) still measuring",
          "pi4: device: round 3: 1,200 timed runs so far; 1 of 2 case(s) still measuring"]  # relayed by deploy-model
INFO = ["[1/7] stem_conv: drop in points K=1 +73.78", "budget: chosen", "6 of 6 conv layers separated",
        "[1/2] model.tflite: loaded"]


@pytest.mark.parametrize("message", DETAIL)
def test_lines_that_only_count_items_are_debug(message):
    assert logs.level_of("refine", message) == logging.DEBUG and logs.is_detail("-", message)


@pytest.mark.parametrize("message", INFO)
def test_lines_that_measure_or_decide_are_info(message):
    assert logs.level_of("sensitivity", message) == logging.INFO


def test_warnings_are_warnings():
    assert logs.level_of("warning", "[1/2] x") == logging.WARNING


def test_an_embedding_program_receives_records_with_their_stage(caplog):
    progress = logs.to_log("convert")
    with caplog.at_level(logging.DEBUG, logger="sepconv"):
        progress("budget", "chosen: {'c': 1}")
        progress("refine", "[1/1] c: refined")
        progress("warning", "nothing was separated")
    assert [(r.name, r.levelname, r.stage, r.getMessage()) for r in caplog.records] == [
        ("sepconv.convert", "INFO", "budget", "chosen: {'c': 1}"),
        ("sepconv.convert", "DEBUG", "refine", "[1/1] c: refined"),
        ("sepconv.convert", "WARNING", "warning", "nothing was separated")]


@pytest.mark.parametrize("level, shown", [
    (logging.WARNING, ["warning: careful"]),
    (logging.INFO, ["budget: chosen", "warning: careful", "bench line"]),
    (logging.DEBUG, ["budget: chosen", "refine: [1/1] c: refined", "warning: careful", "bench line"]),
], ids=["-q", "default", "-v"])
def test_cli_handler_prints_the_levels_asked(capsys, level, shown):
    convert, bench = logs.to_log("convert"), logs.to_log_plain("bench", "-")
    with logs.cli_handler(time.perf_counter(), level):
        convert("budget", "chosen")
        convert("refine", "[1/1] c: refined")
        convert("warning", "careful")
        bench("bench line")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == shown, lines
    assert all(line.startswith("[") and line[1:8].strip() == "0.0s" for line in lines), lines
    assert not logging.getLogger("sepconv").handlers, "the handler is removed after the command"


def test_unconfigured_logging_shows_warnings_only():
    code = ("from sepconv.deploy import logs; p = logs.to_log('convert'); p('budget', 'an info line'); "
            "p('warning', 'a warning line')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "a warning line" in done.stderr and "an info line" not in done.stderr, done.stderr


def test_bench_model_verbose_shows_timing_rounds(small_artifacts):
    bench = [sys.executable, "-m", "sepconv.deploy.cli"]
    args = [str(small_artifacts["tflite"]), "--min-time", "2.5", "--threads", "1", "--min-runs", "10",
            "--warmup-runs", "2", "--warmup-time", "0"]  # a round line every 2 s

    def run(*flags):
        return subprocess.run([*bench, *args, *flags], capture_output=True, text=True, timeout=300)

    default, verbose, quiet = run(), run("-v"), run("-q")
    assert default.returncode == verbose.returncode == quiet.returncode == 0, (default.stderr, verbose.stderr)
    assert "timed runs so far" in verbose.stderr and "timed runs so far" not in default.stderr
    assert default.stderr.strip() and not quiet.stderr.strip(), (default.stderr, quiet.stderr)
