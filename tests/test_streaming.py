"""Data at scale (issue 28): streamed data sets (sepconv.convert.data.Images), the seeded stratified role split by
file, fine-tuning on a tf.data pipeline, and multi-worker fine-tuning with two local workers."""

import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sepconv.convert.data import DataOptions, load_data, stratified_split
from sepconv.convert.errors import DataError, InvalidOptionError

SHAPE = (None, 16, 16, 3)
STREAM = DataOptions(cache_mb=0)  # every file streams


def images(count, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8), np.arange(count) % classes


def folder_of(tmp_path, x, y):
    for i, (image, label) in enumerate(zip(x, y)):
        path = tmp_path / "images" / f"class{label}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return tmp_path / "images"


@pytest.mark.parametrize("kind", ["npz uint8", "npz float32", "npz compressed", "npz fortran", "npz grey 8x8",
                                  "folder"])
def test_a_streamed_set_reads_what_memory_holds(tmp_path, kind):
    x, y = images(40)
    if kind == "npz float32":
        x = x.astype(np.float32) / 255
    if kind == "npz grey 8x8":
        x = x[:, ::2, ::2, 0]
    path = tmp_path / "d.npz"
    if kind == "folder":
        path = folder_of(tmp_path, x, y)
    elif kind == "npz compressed":
        np.savez_compressed(path, x=x, y=y)
    else:
        np.savez(path, x=np.asfortranarray(x) if kind == "npz fortran" else x, y=y)
    held, streamed = load_data(path, SHAPE), load_data(path, SHAPE, STREAM)
    assert not held.streamed and streamed.streamed and len(streamed) == 40
    assert streamed.x.shape == held.x.shape == (40, 16, 16, 3)
    np.testing.assert_array_equal(streamed.y, held.y, err_msg="the same labels in the same order")
    rows = np.array([3, 4, 5, 17, 2, 39])
    np.testing.assert_allclose(streamed.x[rows], held.x[rows], rtol=0, atol=1e-6,
                               err_msg=f"{kind}: rows read from disk equal the rows read whole")
    np.testing.assert_allclose(streamed.x[5:9], held.x[5:9], rtol=0, atol=1e-6, err_msg=f"{kind}: a slice")
    np.testing.assert_allclose(streamed.x[7], held.x[7], rtol=0, atol=1e-6, err_msg=f"{kind}: one image")
    part = streamed.take(rows)
    assert part.streamed and len(part) == 6, "take reads nothing: still streamed"
    np.testing.assert_allclose(part.x[:], held.x[rows], rtol=0, atol=1e-6, err_msg=f"{kind}: a subset's rows")
    assert streamed.fingerprint() == load_data(path, SHAPE, STREAM).fingerprint(), "stable across loads"


def test_a_streamed_set_is_checked_without_holding_it(tmp_path):
    x = np.random.default_rng(0).random((30, 16, 16, 3)).astype(np.float32)
    x[7, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match=r"nan\.npz: 1 non-finite values \(NaN or infinity\) in 1 of 30 samples"):
        load_data(tmp_path / "nan.npz", SHAPE, STREAM)
    np.savez(tmp_path / "flat.npz", x=np.full((30, 16, 16, 3), 7, np.uint8))
    with pytest.raises(DataError, match=r"flat\.npz: all 30 images read are the same constant value"):
        load_data(tmp_path / "flat.npz", SHAPE, STREAM)
    with zipfile.ZipFile(tmp_path / "nox.npz", "w") as archive:
        archive.writestr("y.npy", b"")
    with pytest.raises(DataError, match=r"nox\.npz: has no array 'x' \(found: \['y'\]\)"):
        load_data(tmp_path / "nox.npz", SHAPE, STREAM)
    with pytest.raises(InvalidOptionError, match="cache_mb=-1"):
        DataOptions(cache_mb=-1)


def test_the_role_split_is_seeded_stratified_disjoint_and_complete():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    kept, held = stratified_split(labels, 100, 0.25, seed=0)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100)), "disjoint and complete"
    assert len(held) == 25
    counts = np.bincount(labels[held], minlength=3)
    assert all(abs(n - q) < 1 for n, q in zip(counts, [12.5, 7.5, 5.0])), f"each class in proportion: {counts}"
    again_kept, again_held = stratified_split(labels, 100, 0.25, seed=0)
    assert again_held.tolist() == held.tolist() and again_kept.tolist() == kept.tolist(), "the same seed, the same"
    assert stratified_split(labels, 100, 0.25, seed=1)[1].tolist() != held.tolist(), "another seed, another split"
    kept, held = stratified_split(None, 10, 0.999, seed=0)
    assert len(kept) == 1 and len(held) == 9, "unlabelled; at least one each side"


def test_a_run_splits_the_roles_by_file_and_records_them(tmp_path):
    import keras

    from sepconv.convert.data import datasets
    from sepconv.convert.options import ConvertOptions

    x, y = images(120, classes=4)
    folder = folder_of(tmp_path, x, y)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])
    options = ConvertOptions(data=str(folder), data_options=STREAM)
    run, again = datasets(model, options), datasets(model, options)
    assert run.train.streamed and run.validation.streamed and run.test.streamed and run.info.streamed
    roles = {name: getattr(run, name).members() for name in ("train", "validation", "test")}
    assert roles == {name: getattr(again, name).members() for name in roles}, "stable across runs"
    assert sum(map(len, roles.values())) == 120 and len(set().union(*roles.values())) == 120, "disjoint, complete"
    assert all(member.startswith("class") and member.endswith(".png") for member in roles["test"]), "files"
    recorded = run.info.to_dict()["roles"]
    assert recorded["test"]["per_class"] == {f"class{c}": 7 if c < 2 else 8 for c in range(4)} or \
        sorted(recorded["test"]["per_class"].values()) == [7, 7, 8, 8], recorded["test"]["per_class"]
    assert recorded["train"]["samples"] == len(roles["train"]) and len(recorded["train"]["members_sha256"]) == 64
    held = datasets(model, replace(options, data_options=DataOptions()))
    assert not held.train.streamed
    assert held.info.to_dict()["roles"] == {name: dict(record, streamed=False) for name, record in recorded.items()}, \
        "in memory or streamed, the same files play the same roles"
    assert isinstance(run.calibration, np.ndarray) and len(run.calibration) == len(held.calibration)
    np.testing.assert_array_equal(run.calibration, held.calibration, err_msg="the same calibration images")


def test_a_streamed_conversion_never_reads_the_data_whole(tmp_path, trained_demo, caplog):
    from sepconv.convert import convert_model

    data = tmp_path / "train.npz"
    with np.load(trained_demo["npz"]) as archive:
        np.savez(data, x=archive["x"], y=archive["y"])
    caplog.set_level("INFO", logger="sepconv")
    out = tmp_path / "m.tflite"
    result = convert_model(trained_demo["h5"], [out], data=str(data), rank=1, epochs=1, quantize="int8",
                           data_options=STREAM, measure_latency=False)
    assert not [r for r in caplog.records if "into memory" in r.getMessage()], "no role was read whole"
    manifest = json.loads(out.with_name("m.tflite.json").read_text())
    assert manifest["data"]["streamed"] and set(manifest["data"]["roles"]) == {"train", "validation", "test"}
    assert result.data.streamed and result.recovery.finetune is not None
    verification = result.artifacts[0].verification
    assert verification.outputs[0].accuracy > 0.85, "a streamed run gives a working int8 artifact"


def test_finetuning_reads_a_streamed_set_in_batches(tmp_path):
    from sepconv.convert import separate
    from sepconv.convert.recovery.finetuning import feed, finetune
    from test_finetuning import agreement, teacher_and_data

    teacher, x, y = teacher_and_data(n=256)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz", (None, 12, 12, 3), STREAM)
    pipeline = feed(data.x, np.eye(4, dtype=np.float32)[y], 32, shuffle=0)["x"]
    seen = np.concatenate([np.argmax(t, 1) for _, t in pipeline.as_numpy_iterator()])
    assert sorted(seen.tolist()) == sorted(y.tolist()), "each row once per epoch"
    student, _ = separate(teacher, rank=1)
    held_out = np.random.default_rng(9).uniform(0, 1, (256, 12, 12, 3)).astype(np.float32)
    before = agreement(student, teacher, held_out)
    finetune(student, teacher, data.x, data.y, epochs=4, verbose=0, patience=4,
             validation=(data.x.take(np.arange(32)), data.y[:32]))
    after = agreement(student, teacher, held_out)
    assert after > before + 0.05, f"agreement {before:.2%} -> {after:.2%} on streamed images"


def test_worker_role_reads_tf_config():
    from sepconv.convert.recovery.finetuning import worker_role

    cluster = {"worker": ["a:1", "b:1"]}
    role = worker_role({"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})})
    assert (role.index, role.workers, role.chief) == (1, 2, False)
    chief = worker_role({"TF_CONFIG": json.dumps({"cluster": {"chief": ["c:1"], **cluster},
                                                  "task": {"type": "worker", "index": 0}})})
    assert (chief.index, chief.workers, chief.chief) == (1, 3, False), "a named chief comes first"
    for text, what in [("", "is not set"), ("{", "cannot be read"),
                       (json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 5}}), "not in the cluster")]:
        with pytest.raises(InvalidOptionError, match=what) as caught:
            worker_role({"TF_CONFIG": text})
        assert "TF_CONFIG=" in str(caught.value) and "\n" not in str(caught.value)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_two_workers(tmp_path, argv, env=None):
    """convert-model ARGV started on two local workers of one TF_CONFIG cluster, each in its own folder (as on two
    hosts): [(process, folder)], output and errors in one stream."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    started = []
    for index in range(2):
        folder = tmp_path / f"worker{index}"
        folder.mkdir(exist_ok=True)
        config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        started.append((subprocess.Popen([sys.executable, "-m", "sepconv.convert.cli", "convert-model", *argv],
                                         cwd=folder, env=dict(os.environ, TF_CONFIG=config, **(env or {})),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True), folder))
    return started


def _two_workers(tmp_path, argv, env=None):
    """_start_two_workers, then [(exit status, output, folder)] once both end."""
    return [(p.wait(timeout=600), p.stdout.read(), folder) for p, folder in _start_two_workers(tmp_path, argv, env)]


@pytest.mark.slow
def test_two_local_workers_fine_tune_together_and_the_chief_writes(tmp_path, trained_demo):
    data = tmp_path / "train.npz"
    with np.load(trained_demo["npz"]) as archive:
        np.savez(data, x=archive["x"], y=archive["y"])
    argv = [str(trained_demo["h5"]), "out.tflite", "--data", str(data), "--rank", "1", "--epochs", "2",
            "--strategy", "multi-worker", "--data-cache-mb", "0", "--no-latency"]
    (chief, chief_out, chief_dir), (other, other_out, other_dir) = _two_workers(tmp_path, argv)
    assert chief == 0 and other == 0, f"chief:\n{chief_out[-3000:]}\nworker 1:\n{other_out[-3000:]}"
    assert (chief_dir / "out.tflite").exists() and not (other_dir / "out.tflite").exists(), "the chief writes"
    assert "worker 1 of 2: fine-tuning done" in other_out
    assert "no artifacts from this worker: worker 1 of 2" in other_out and "manifests beside" not in other_out
    manifest = json.loads((chief_dir / "out.tflite.json").read_text())
    finetuned = manifest["recovery"]["finetune"]
    assert finetuned["strategy"] == "multi-worker" and finetuned["devices"] == 2, finetuned
    checks = [[line.split("int8 stability: ")[1] for line in out.splitlines() if "int8 stability: " in line]
              for out in (chief_out, other_out)]
    assert len(checks[0]) == 1 and checks[0] == checks[1], f"an int8 run checks once, alike on both workers {checks}"
    epochs = [[line.split("val_accuracy ")[1].split(",")[0] for line in out.splitlines() if "finetune: epoch" in line]
              for out in (chief_out, other_out)]
    assert epochs[0] and epochs[0] == epochs[1], f"the workers train one model: the same validation each epoch {epochs}"
    assert not list(chief_dir.glob("*.checkpoints")) and not list(other_dir.glob("*.checkpoints")), "cleaned up"


def test_multi_worker_needs_tf_config_and_a_fresh_process(tmp_path, trained_demo):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "sepconv.convert.cli", "convert-model", str(trained_demo["h5"]),
                           "o.tflite", "--data", str(trained_demo["npz"]), "--strategy", "multi-worker", "--epochs",
                           "1"], env=env, capture_output=True, text=True, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--strategy multi-worker reads the cluster from TF_CONFIG, which is not set" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir()), "one line, nothing written"
    late = ("import tensorflow as tf; tf.constant(1.0) + 1\n"
            "from sepconv.convert.recovery.finetuning import multi_worker_strategy\n"
            "try:\n    multi_worker_strategy()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    config = json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    done = subprocess.run([sys.executable, "-c", late], env=dict(env, TF_CONFIG=config), capture_output=True,
                          text=True)
    assert "InvalidOptionError --strategy multi-worker must start before any TensorFlow work" in done.stdout, \
        done.stdout + done.stderr[-2000:]


def _until_epoch_1(started) -> list[str]:
    """Each started worker's output up to its first epoch's progress line (which follows that epoch's checkpoint)."""
    import threading

    seen = [[] for _ in started]

    def read(index, process):
        for line in process.stdout:
            seen[index].append(line)
            if "finetune: epoch 1/4" in line:
                return

    readers = [threading.Thread(target=read, args=(i, p)) for i, (p, _) in enumerate(started)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=300)
    outputs = ["".join(lines) for lines in seen]
    assert all("finetune: epoch 1/4" in out for out in outputs), [out[-2000:] for out in outputs]
    return outputs


FOUR_EPOCHS_ON_TWO_WORKERS = ["--rank", "1", "--epochs", "4", "--patience", "4", "--quantize", "none", "--strategy",
                              "multi-worker", "--no-latency"]


@pytest.mark.slow
def test_two_local_workers_resume_together(tmp_path, trained_demo):
    """Both workers interrupted after epoch 1's checkpoint (Ctrl-C): each keeps its own checkpoints; the same command
    with --resume continues both from epoch 2 and the chief writes. The signals reach the workers during the test's
    epoch-end wait, one after the other: each stops there (exit 130), not after a training step the other never joins
    (which failed 4 runs in 6 before the wait raised the Ctrl-C itself: UnavailableError, exit 1)."""
    import signal

    argv = [str(trained_demo["h5"]), "out.tflite", "--data", str(trained_demo["npz"]), *FOUR_EPOCHS_ON_TWO_WORKERS]
    started = _start_two_workers(tmp_path, argv, {"SEPCONV_TEST_EPOCH_DELAY": "60"})
    seen = _until_epoch_1(started)
    for process, _ in started:
        process.send_signal(signal.SIGINT)
    statuses = [process.wait(timeout=120) for process, _ in started]
    outputs = [before + process.stdout.read() for before, (process, _) in zip(seen, started)]
    assert statuses == [130, 130], [(status, out[-3000:]) for status, out in zip(statuses, outputs)]
    assert all("Traceback" not in out and "--resume to continue" in out for out in outputs), outputs
    assert (tmp_path / "worker0" / "out.tflite.checkpoints").is_dir()
    assert (tmp_path / "worker1" / "out.tflite.checkpoints").is_dir()
    (chief, chief_out, chief_dir), (other, other_out, _) = _two_workers(tmp_path, [*argv, "--resume"])
    assert chief == 0 and other == 0, f"chief:\n{chief_out[-3000:]}\nworker 1:\n{other_out[-3000:]}"
    for out in (chief_out, other_out):
        epochs = [int(line.split("finetune: epoch ")[1].split("/")[0]) for line in out.splitlines()
                  if "finetune: epoch " in line]
        assert epochs and epochs[0] == 2, f"each worker resumes after its checkpointed epoch 1: {epochs}"
    assert (chief_dir / "out.tflite").exists()
    assert json.loads((chief_dir / "out.tflite.json").read_text())["recovery"]["resumed"] is True


@pytest.mark.slow
def test_a_worker_whose_peer_is_gone_says_so_in_one_line(tmp_path, trained_demo):
    """Worker 1 killed (as a host that goes away) after epoch 1: the chief's next step cannot all-reduce; it ends
    with one line that says what happened and how to go on, not TensorFlow's traceback and exit 1 unexplained."""
    argv = [str(trained_demo["h5"]), "out.tflite", "--data", str(trained_demo["npz"]), *FOUR_EPOCHS_ON_TWO_WORKERS]
    started = _start_two_workers(tmp_path, argv, {"SEPCONV_TEST_EPOCH_DELAY": "3"})
    seen = _until_epoch_1(started)
    started[1][0].kill()  # the command's process; its worker process follows (PR_SET_PDEATHSIG)
    chief = started[0][0]
    status = chief.wait(timeout=300)
    out = seen[0] + chief.stdout.read()
    assert status == 1, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert ("error: fine-tuning across 2 workers stopped on worker 0: another worker ended or cannot be reached"
            in last and "checkpointed in out.tflite.checkpoints" in last and "--resume" in last), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert (tmp_path / "worker0" / "out.tflite.checkpoints").is_dir(), "the finished epoch stays, for --resume"
    assert not (tmp_path / "worker0" / "out.tflite").exists()


def test_an_unreadable_image_in_a_streamed_folder_is_one_line(tmp_path, monkeypatch):
    """A file that is no image is refused when the folder is opened (every header is read); one whose pixels are cut
    short passes that (past the first images the constant check decodes: none here) and fails when fine-tuning's
    tf.data pipeline decodes it: a DataError naming the file, not TensorFlow's wrapped traceback."""
    from sepconv.convert import data as data_module
    from sepconv.convert import separate
    from sepconv.convert.recovery.finetuning import _reads_reported, feed, finetune
    from test_finetuning import teacher_and_data

    x, y = images(30)
    folder = folder_of(tmp_path, x, y)
    (folder / "class0" / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.png: cannot be read as an image"):
        load_data(folder, SHAPE, STREAM)
    (folder / "class0" / "notes.png").unlink()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    cut = buffer.getvalue()
    (folder / "class1" / "cut.jpg").write_bytes(cut[:len(cut) // 2])  # the whole header, half of the pixels
    with pytest.raises(DataError, match=r"cut\.jpg: cannot be read as an image"):
        load_data(folder, (None, 12, 12, 3), STREAM)  # the constant check decodes it: refused before any work
    monkeypatch.setattr(data_module, "CHECKED_SAMPLES", 0)
    data = load_data(folder, (None, 12, 12, 3), STREAM)
    teacher, _, _ = teacher_and_data(n=8)
    student, _ = separate(teacher, rank=1)
    labels = data.y % 4
    with pytest.raises(DataError, match=r"cut\.jpg: cannot be read as an image") as caught:
        finetune(student, teacher, data.x, labels, epochs=1, verbose=0,
                 validation=(data.x.take(np.arange(3)), labels[:3]))  # met by the teacher's pass, before fit
    assert "\n" not in str(caught.value)
    pipeline = feed(data.x, np.zeros((len(data), 4), np.float32), 8, shuffle=0)["x"]
    with pytest.raises(DataError, match=r"cut\.jpg: cannot be read as an image") as caught:
        with _reads_reported():  # what finetune wraps evaluate and fit in
            for _ in pipeline:
                pass
    assert "\n" not in str(caught.value), "the file's own line, not TensorFlow's wrapped traceback"
