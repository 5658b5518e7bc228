"""The HTML report: --report / --report-dir on convert-model and bench-model, sepconv-report on saved JSON, the
renderer on JSON that a real (tiny) conversion and benchmark wrote, and every bad input as one line."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import write_file

BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST_BENCH = ["--min-runs", "10", "--min-time", "0.05", "--warmup-runs", "2", "--warmup-time", "0", "--quiet"]
CONVERT_CHARTS = {"convert1_sensitivity", "convert1_layers", "convert1_stages", "convert1_artifacts", "tradeoff_size"}
BENCH_CHARTS = {"latency", "speedup", "tradeoff_latency", "memory"}


def run(tool, *args, timeout=600):
    return subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_png_drawn(path: Path):
    """A PNG that decodes and is not one flat colour."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, f"{path.name}: {pixels.shape}"
    assert pixels.std() > 10, f"{path.name} is blank (pixel std {pixels.std():.2f})"


def assert_self_contained(page: str):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower(), "no script: the page is static"
    for attribute in ("src=", "@import", "url(http", 'href="http', "href='http"):
        assert attribute not in page, f"the page loads something from outside ({attribute})"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert-model on a tiny CNN with --data (budget, refine, fine-tune, int8 TFLite and ONNX), --json, --report,
    --report-dir: the JSON the other tests render is what the tool wrote."""
    folder = tmp_path_factory.mktemp("converted")
    keras.utils.set_random_seed(0)
    x_in = keras.Input((12, 12, 3), name="pixels")
    x = keras.layers.Conv2D(16, 3, activation="relu", name="c1")(x_in)
    x = keras.layers.Conv2D(16, 3, strides=2, name="c2")(x)
    keras.Model(x_in, keras.layers.Dense(5, activation="softmax")(keras.layers.Flatten()(x))).save(folder / "small.h5")
    x = np.random.default_rng(3).random((160, 12, 12, 3)).astype(np.float32)
    np.savez(folder / "data.npz", x=x)
    np.savez(folder / "labelled.npz", x=x[:40], y=np.random.default_rng(0).integers(0, 5, 40))
    # a loose budget and agreement: a random network's figures are not the point here, the report of them is
    done = run("convert-model", folder / "small.h5", folder / "m.tflite", folder / "m.onnx", "--data",
               folder / "data.npz", "--max-accuracy-drop", "50", "--epochs", "1", "--min-agreement", "0.3",
               "--json", folder / "convert.json", "--report", folder / "convert.html", "--report-dir",
               folder / "convert-charts")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def benched(converted):
    folder = converted
    done = run("bench-model", folder / "m.tflite", folder / "m.onnx", "--threads", "1,2", "--input",
               folder / "labelled.npz", *FAST_BENCH, "--json", folder / "bench.json", "--report", folder / "bench.html",
               "--report-dir", folder / "bench-charts")
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_convert_model_report_and_pngs(converted):
    page = (converted / "convert.html").read_text()
    assert_self_contained(page)
    summary = json.loads((converted / "convert.json").read_text())
    for name in CONVERT_CHARTS:
        assert f'<figure id="{name}">' in page, name
        assert_png_drawn(converted / "convert-charts" / f"{name}.png")
    assert {p.stem for p in (converted / "convert-charts").iterdir()} == CONVERT_CHARTS
    for layer in summary["recovery"]["budget"]["layers"]:  # the heat map's cells are the measured drops
        for candidate in layer["candidates"]:
            if candidate["rank"]:
                assert f"{candidate['drop']:+.2f}" in page, (layer["path"], candidate)
    for artifact in summary["artifacts"]:
        assert f"<td>{Path(artifact['path']).name}</td>" in page
        speed = artifact["speed"]  # timed against the original by default: the speed-up is in the report
        assert speed is None or f"{speed['speedup']:.2f}x ({speed['speedup_ci95'][0]:.2f}-" in page, speed
    if not any(artifact["speed"] for artifact in summary["artifacts"]):
        assert "not timed" in page and not summary["separation"]["totals"]["separated"], "only nothing separated"
    assert "(chosen by --quantize auto because data was given)" in page and "refine True" not in page, \
        "the summary in words, not Python values"
    assert "K per layer within a 50-point accuracy budget" in page and "fine-tuning, up to 1 epoch;" in page
    # issue 26: the page answers first - per artifact how much smaller, how much faster, and what it cost
    answer = page[page.index("<h2>The answer</h2>"):page.index("</section>", page.index("<h2>The answer</h2>"))]
    assert page.index("<h2>The answer</h2>") < page.index("<h2>convert-model"), "the headline comes first"
    source = summary["source"]
    assert source["bytes"] == (converted / "small.h5").stat().st_size
    for artifact in summary["artifacts"]:
        assert f"<b>{Path(artifact['path']).name}</b>" in answer
        assert f"{source['bytes'] / artifact['bytes']:.1f}x smaller than the original file" in answer, answer
        speed = artifact["speed"]
        if speed:
            assert f"{speed['speedup']:.2f}x as fast as the original ({speed['speedup_ci95'][0]:.2f}-" in answer
        check = artifact["verification"]  # agreement with the original: when something was separated
        assert check["original_agreement"] is None or \
            f"the same top-1 answer as the original on {check['original_agreement']:.2%}" in answer, answer
        assert ("verification passed" if check["passed"] else "verification FAILED") in answer


def test_bench_model_report_and_pngs(benched):
    page = (benched / "bench.html").read_text()
    assert_self_contained(page)
    for name in BENCH_CHARTS:
        assert f'<figure id="{name}">' in page, name
        assert_png_drawn(benched / "bench-charts" / f"{name}.png")
    report = json.loads((benched / "bench.json").read_text())
    assert f"<td>{report['context']['os']}</td>" in page, "the device context is shown"
    case = report["cases"][0]
    assert "<h2>The answer</h2>" in page and f"p50 {case['latency_ms']['p50']:.3f} ms" in page, "the headline"


def test_renderer_on_saved_json(benched):
    from sepconv.deploy.report import charts
    from sepconv.deploy.report.html import load_runs, render

    runs = load_runs([benched / "convert.json", benched / "bench.json"])
    page = render(runs, title="two runs")
    assert {chart.name for chart in page.charts} == CONVERT_CHARTS | BENCH_CHARTS
    assert all(chart.svg.startswith("<svg") and chart.png.startswith(b"\x89PNG") for chart in page.charts)
    assert page.html.count("<svg") == len(page.charts)
    budget = json.loads((benched / "convert.json").read_text())["recovery"]["budget"]
    points = charts.tradeoff_points(budget)
    keep = next(p for p in points if p[0] == "keep")
    assert keep[1] == budget["params_before"] and keep[2] == pytest.approx(budget["baseline"]), \
        "keeping every layer is the original: its parameters, its score"
    k1 = next(p for p in points if p[0] == "K=1")
    expected = sum(c["params"] for layer in budget["layers"] for c in layer["candidates"] if c["rank"] == 1)
    assert k1[1] == expected and k1[2] == pytest.approx(
        budget["baseline"] - sum(c["drop"] for layer in budget["layers"] for c in layer["candidates"] if c["rank"] == 1))
    assert [p[1] for p in points] == sorted(p[1] for p in points)


def test_layers_kept_in_float_are_listed_when_the_json_has_them(converted):
    """An int8 artifact whose repair kept layers in float (issue 11) names them in the artifact table."""
    from sepconv.deploy.report.html import classify, render

    summary = json.loads((converted / "convert.json").read_text())
    assert "<td>none</td>" in render(classify(summary)).html, "nothing recorded: none"
    summary["artifacts"][0]["quantization"] = {"float_layers": [  # as convert-model records them (quantization.py)
        {"layer": "c2", "op": "CONV_2D", "reason": "largest quantization error", "bytes": 1024}]}
    assert "<td>c2</td>" in render(classify(summary)).html


def test_hosts_side_by_side_and_a_failed_host(benched):
    """deploy-model's --json shape ({host: report}), built from the real bench report, with one failed host."""
    from sepconv.deploy.report.html import classify, render

    bench = json.loads((benched / "bench.json").read_text())
    fleet = {"pi-a": {"host": "pi-a", "device": {"machine": "aarch64", "pi_model": "Raspberry Pi 5"}, "benchmark": bench},
             "pi-b": {"host": "pi-b", "device": {"machine": "aarch64", "emulated": True}, "benchmark": bench},
             "pi-c": {"host": "pi-c", "error": {"type": "HostUnreachableError", "message": "pi-c: unreachable"}}}
    runs = classify(fleet, "fleet")
    assert [label for label, _, _ in runs.benches] == ["pi-a", "pi-b"] and runs.failed == [("pi-c", "pi-c: unreachable")]
    page = render(runs)
    latency = next(chart for chart in page.charts if chart.name == "latency")
    assert latency.svg.count("pi-a") >= 1 and latency.svg.count("pi-b") >= 1, "one panel per host"
    assert "Raspberry Pi 5" in page.html and "timings are meaningless" in page.html
    assert "<td>pi-c</td><td>pi-c: unreachable</td>" in page.html


def test_sepconv_report_renders_saved_json_side_by_side(benched, tmp_path):
    done = run("sepconv-report", benched / "convert.json", benched / "bench.json", benched / "bench.json", "-o",
               tmp_path / "r.html", "--report-dir", tmp_path / "png", "--title", "Two runs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'r.html'}") and done.stderr == ""
    page = (tmp_path / "r.html").read_text()
    assert "<title>Two runs</title>" in page and page.count("<td>bench</td>") >= 2, "both bench runs are shown"
    assert {p.stem for p in (tmp_path / "png").iterdir()} == CONVERT_CHARTS | BENCH_CHARTS
    again = run("sepconv-report", benched / "bench.json", "-o", tmp_path / "r.html")
    assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr
    assert run("sepconv-report", benched / "bench.json", "-o", tmp_path / "r.html", "--overwrite").returncode == 0


@pytest.mark.parametrize("make, phrase", [
    (lambda t, b: [t / "nope.json"], "no such file"),
    (lambda t, b: [t / "no\nsuch.json"], "no\\nsuch.json: no such file"),  # a newline in a path stays one line
    (lambda t, b: [write_file(t / "cut.json", (b / "bench.json").read_bytes()[:500])], "is not valid JSON"),
    (lambda t, b: [write_file(t / "odd.json", b'{"hello": [1, 2]}')], "unknown kind"),
    (lambda t, b: [write_file(t / "list.json", b"[1, 2]")], "unknown kind"),
    (lambda t, b: [write_file(t / "failed.json", json.dumps({"error": {"type": "ArtifactError", "message": "gone"},
                                                              "exit_status": 1, "tool": "bench-model"}).encode())],
     "failure report of bench-model"),
    (lambda t, b: [b / "bench.json", "-o", t / "missing" / "r.html"], "does not exist"),
    (lambda t, b: [b / "bench.json", "-o", t / "model.tflite"], "would replace a .tflite file"),
    (lambda t, b: [b / "bench.json", "-o", b / "bench.json"], "is also an input"),
    (lambda t, b: [b / "bench.json", "-o", "-"], "goes to a file"),
    # issue 27: JSON that parses but is not what the tools write
    (lambda t, b: [write_file(t / "deep.json", b"[" * 100000 + b"]" * 100000)], "nested deeper than any report"),
    (lambda t, b: [malformed(t, b, lambda r: r["cases"].__setitem__(0, "x"))], "case 1 is str, not an object"),
    (lambda t, b: [malformed(t, b, lambda r: r["cases"][0].__setitem__("samples_ms", "abc"))],
     "'samples_ms' is not a list of positive finite milliseconds"),
    (lambda t, b: [malformed(t, b, lambda r: r["cases"][0].__setitem__("samples_ms", [float("nan")] * 3))],
     "'samples_ms' is not a list of positive finite milliseconds"),
    (lambda t, b: [malformed(t, b, lambda r: r["cases"][0]["latency_ms"].__setitem__("p50", "fast"))],
     "'latency_ms' has no finite p50"),
    (lambda t, b: [malformed(t, b, lambda r: r.__setitem__("context", "x"))], "'context' is not an object"),
    (lambda t, b: [write_file(t / "hosts.json", json.dumps({"pi": {"host": ["a"], "benchmark": json.loads(
        (b / "bench.json").read_text())}}).encode())], "a host entry's 'host' is list"),
])
def test_bad_input_is_one_line_and_no_file(benched, tmp_path, make, phrase):
    args = make(tmp_path, benched)
    if "-o" not in args:
        args += ["-o", tmp_path / "r.html"]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = run("sepconv-report", *args)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("sepconv-report: error: ") and phrase in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no partial file is left"
    assert json.loads((benched / "bench.json").read_text())["cases"], "an input is never touched"


def malformed(folder: Path, benched: Path, change) -> Path:
    """bench.json with `change` applied to its parsed report, written to folder/bad.json."""
    report = json.loads((benched / "bench.json").read_text())
    change(report)
    return write_file(folder / "bad.json", json.dumps(report).encode())


def test_unwritable_folder(benched, tmp_path):
    """Not writable: refused before any work when the permissions say so (a user), or the write itself fails (root
    in sysfs): one line either way, nothing left."""
    folder = Path("/sys") if os.geteuid() == 0 else tmp_path / "ro"
    folder.mkdir(mode=0o555, exist_ok=True)
    done = run("sepconv-report", benched / "bench.json", "-o", folder / "sepconv-r.html")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert ("is not writable" in done.stderr or "could not be written" in done.stderr), done.stderr
    assert not (folder / "sepconv-r.html").exists() and not list(folder.glob(".sepconv-r.html.*"))


def test_failed_write_leaves_nothing(benched, tmp_path, monkeypatch):
    """A write that fails half-way (disk full) raises OutputError and leaves neither the file nor a temporary one."""
    from sepconv.deploy.report import html as html_report
    from sepconv.deploy import files
    from sepconv.deploy.errors import OutputError

    page = html_report.render(html_report.load_runs([benched / "bench.json"]))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)  # the shared atomic write (sepconv.deploy.files)
    with pytest.raises(OutputError, match="No space left on device"):
        html_report.write_report(page, tmp_path / "r.html", tmp_path / "png")
    assert not (tmp_path / "r.html").exists() and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_no_flag_no_output(benched):
    done = run("sepconv-report", benched / "bench.json")
    assert done.returncode == 2 and "name the HTML file with -o FILE" in done.stderr


BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
from sepconv.deploy.cli import bench_main
sys.exit(bench_main(sys.argv[1:]))
"""


def test_report_without_matplotlib_fails_first_in_one_line(benched, tmp_path):
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(BLOCKED), str(benched / "m.tflite"), "--report",
                           str(tmp_path / "r.html"), *FAST_BENCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'sepconv[report]'" in done.stderr and done.stdout == "", "refused before benchmarking"
    assert not list(tmp_path.iterdir())


def test_device_side_imports_neither_matplotlib_nor_tensorflow():
    probe = ("import sys, sepconv.deploy, sepconv.deploy.cli as cli; cli.bench_parser().format_help(); "
             "cli.deploy_parser().format_help(); import sepconv.deploy.report.html; "
             "print(sorted(m for m in ('matplotlib', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    assert "--report FILE" in run("bench-model", "--help").stdout
    assert "--report-dir DIR" in run("deploy-model", "--help").stdout


def chromium(page: Path, profile: Path, *mode):
    """Debian's chromium, headless, as root in a container allows (no sandbox, no GPU, no network chatter), with
    the page's console messages logged to stderr as 'CONSOLE' lines."""
    assert CHROMIUM, "chromium is missing: scripts/setup --for-tests installs it"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--no-first-run", "--disable-extensions",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *mode, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def console_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_renders_in_a_real_browser(benched, tmp_path):
    page = tmp_path / "report.html"
    assert run("sepconv-report", benched / "convert.json", benched / "bench.json", "-o", page).returncode == 0
    shot = chromium(page, tmp_path / "profile", "--window-size=1280,6000", f"--screenshot={tmp_path / 'shot.png'}")
    assert shot.returncode == 0, shot.stderr[-3000:]
    assert_png_drawn(tmp_path / "shot.png")
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"), dtype=np.int32)
    for color in ("#4C72B0", "#55A868"):  # bars and boxes of the charts (the page's own style has no such colour)
        rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        drawn = int((np.abs(pixels - rgb).sum(axis=-1) < 12).sum())
        assert drawn > 2000, f"the charts' {color} covers {drawn} pixels of the screenshot: the SVG did not render"
    assert console_lines(shot) == [], "no console error or warning"
    dom = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0 and console_lines(dom) == [], dom.stderr[-3000:]
    for name in CONVERT_CHARTS | BENCH_CHARTS:
        assert f'<figure id="{name}">' in dom.stdout, f"{name} is not in the browser's DOM"
    assert dom.stdout.count("<svg") == len(CONVERT_CHARTS | BENCH_CHARTS), "every chart parsed as SVG"


def test_the_browser_check_sees_console_errors(tmp_path):
    """The check above would catch a page that fails: the same browser run reports a script error."""
    page = write_file(tmp_path / "bad.html", b"<!DOCTYPE html><p>x</p><script>undefinedFunction();</script>")
    done = chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("undefinedFunction is not defined" in line for line in console_lines(done)), done.stderr[-3000:]


def test_the_int8_chart_names_keras_layers_alone_and_together():
    from sepconv.deploy.report import charts

    diagnosis = {"format": "tflite", "alarm_relative_error": 0.25, "layers": [
        {"layer": "functional_1/conv_1/Relu;functional_1/conv_1/convolution", "keras": ["conv"], "op": "CONV_2D",
         "order": 1, "relative_error": 0.01, "channel_relative_error": 0.02, "accumulated_relative_error": 0.02},
        {"layer": "PartitionedCall:0", "keras": ["logits"], "op": "FULLY_CONNECTED", "order": 3,
         "relative_error": 0.004, "channel_relative_error": 9.1, "accumulated_relative_error": 9.0}]}
    run = {"artifacts": [{"path": "m.tflite", "quantization": {"diagnosis": diagnosis}},
                         {"path": "m.onnx", "quantization": None}]}
    chart = charts.quantization_errors(run, "convert1_int8")
    assert chart is not None and chart.name == "convert1_int8" and chart.png.startswith(b"\x89PNG")
    for text in ("conv (CONV_2D)", "logits (FULLY_CONNECTED)", "m.tflite (tflite)", "all layers up to it"):
        assert text in chart.svg, text
    assert "PartitionedCall" not in chart.svg, "the Keras name, not the converter's"
    assert charts.quantization_errors({"artifacts": [{"path": "m.onnx", "quantization": None}]}, "x") is None
    fallback = {"path": "f.tflite", "quantize": "dynamic", "quantization": None,
                "quantize_fallback": {"int8_diagnosis": diagnosis}}
    fell_back = charts.quantization_errors({"artifacts": [fallback]}, "x")
    assert fell_back is not None and "f.tflite (tflite; int8 failed, shipped dynamic)" in fell_back.svg, \
        "the failed int8's diagnosis is drawn for the artifact that replaced it"


def test_the_stage_chart_shows_each_further_output_of_a_multi_output_model():
    """Issue 27: a two-headed model's second output is scored per stage (val_outputs); the chart shows it."""
    from sepconv.deploy.report import charts

    stages = [{"name": "original", "kept": True, "val_agreement": 1.0, "agreement": 1.0, "val_outputs": [1.0, 1.0]},
              {"name": "fine-tuned", "kept": False, "val_agreement": 1.0, "agreement": 1.0, "val_outputs": [1.0, 0.7],
               "note": "rejected: validation agreement of output 1 with the original 100.00% -> 70.00%"}]
    chart = charts.stage_scores({"recovery": {"stages": stages}}, "convert1_stages")
    assert chart is not None and "validation agreement, output 1" in chart.svg
    assert "agreement of output 1 with the original" in chart.caption
    single = charts.stage_scores({"recovery": {"stages": [{**s, "val_outputs": None} for s in stages]}}, "x")
    assert "output 1" not in single.svg
    assert "own rule" not in chart.caption
    noisy = {"name": "fine-tuned under int8 noise", "kept": True, "val_agreement": 0.9, "agreement": 0.9,
             "note": "agreement under int8 rounding noise on the validation images 80.00% -> 90.00%, a gain they can "
                     "show"}
    kept = charts.stage_scores({"recovery": {"stages": [stages[0], noisy]}}, "x")
    assert "unless it has a rule of its own" in kept.caption and f"Kept by its own rule: {noisy['name']}: " \
        f"{noisy['note']}." in kept.caption, kept.caption


def test_the_fine_tuning_chart_shows_each_pass_epoch_by_epoch_and_the_epoch_kept():
    """The fine-tuning details the page lacked: per pass, the monitored validation score per epoch beside its training
    twin, the start it had to beat, and what was kept; a resumed run's epochs are numbered as they ran."""
    from sepconv.deploy.report import charts

    finetune = {"mode": "labels", "monitor": "val_accuracy", "epochs_run": 5, "best_epoch": 4, "best_value": 0.93,
                "initial_value": 0.81, "history": {"val_accuracy": [0.9, 0.93, 0.92], "accuracy": [0.95, 0.97, 0.98],
                                                   "loss": [0.3, 0.2, 0.1]}}  # resumed after epoch 2
    int8 = {"mode": "labels", "monitor": "val_loss", "epochs_run": 2, "best_epoch": 0, "best_value": 0.4,
            "initial_value": 0.4, "history": {"val_loss": [0.5, 0.45]}}
    chart = charts.fine_tuning({"recovery": {"finetune": finetune, "finetune_frozen": None, "finetune_int8": int8}},
                               "convert1_finetune")
    assert chart is not None and chart.name == "convert1_finetune"
    for text in ("fine-tuned (labels)", "fine-tuned under int8 noise (labels)", "kept: epoch 4", "kept: the start",
                 "accuracy (training)", "before the pass", "val_loss"):
        assert text in chart.svg, text
    assert "BatchNorm frozen" not in chart.svg, "a pass that did not run is not drawn"
    axes = chart.svg.count('id="axes_')
    assert axes == 2, f"one panel per pass that ran, got {axes}"
    for run in ({}, {"recovery": {"finetune": None}}, {"recovery": {"finetune": {**finetune, "history": {}}}}):
        assert charts.fine_tuning(run, "x") is None, run


def test_log_axes_read_as_compact_numbers_that_never_run_together():
    """Issue 26: the parameters/MACs chart's tick labels ran together ("5001000", "5e+071e+082e+08"). Ticks are
    compact (1k, 10M) and at powers of ten only beyond two decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sepconv.deploy.report.charts import _compact, _log_axis

    assert [_compact(v) for v in (0.01, 20, 3000, 1.5e6, 2e9)] == ["0.01", "20", "3k", "1.5M", "2G"]
    figure, axis = plt.subplots()
    axis.barh([0, 1], [300, 4e8])
    _log_axis(axis.xaxis)
    figure.canvas.draw()
    low, high = axis.get_xlim()
    labels = [t.get_text() for t in axis.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
    assert labels and all(label[0] == "1" for label in labels), labels  # decades only: 1k, 10k, ... 100M
    assert "e+" not in "".join(labels)
    plt.close(figure)
