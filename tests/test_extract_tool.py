"""tools/extract_rois.py and tools/visualize_rois.py end to end with a tiny random-weight detector."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import nms

from detector.checkpoint import load_checkpoint, save_checkpoint
from detector.config import load_cfg
from detector.modeling import build_detector
from detector.transforms import resize_shortest_edge
from detector.roi_store import RoIRecord, RoIStore, RoIStoreWriter, read_npz, write_npz

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "vg" / "tiny_R_18_C4_attr.yaml"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract_tool = load_tool("extract_rois")
visualize_tool = load_tool("visualize_rois")


def make_images(folder, sizes, seed=0):
    """Smooth random blobs (JPEG-friendly), one file per size, named so that sorted order is creation
    order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        img = cv2.resize(rng.integers(0, 255, (6, 6, 3), np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"im{i:03d}.png"), img)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny detector whose class scores vary across proposals (random init gives near-uniform ones)."""
    torch.manual_seed(0)
    model = build_detector(load_cfg(CONFIG))
    x = model.preprocess_image(torch.rand(1, 3, 96, 120) * 255)
    with torch.no_grad():
        res4 = model.features(x)
        props = model.proposal_generator(res4, [(96, 120)])[0]["proposal_boxes"]
        f = model.roi_heads.region_features(res4, [props])
        mu, sd = f.mean(0), f.std(0).clamp(min=1e-3)
        cls = model.roi_heads.box_predictor.cls_score
        w = torch.randn_like(cls.weight) * 3.0 / (sd * f.shape[1] ** 0.5)
        cls.weight.copy_(w)
        cls.bias.copy_(-w @ mu)
        model.roi_heads.box_predictor.attr_score.weight.mul_(200)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def model(weights):
    m = build_detector(load_cfg(CONFIG))
    load_checkpoint(m, weights)
    return m


def run_tool(weights, inputs, output, *extra):
    """In-process run (decoding in the main process unless a test asks for workers)."""
    args = ["--config-file", str(CONFIG), "--weights", str(weights), "--input", *map(str, inputs),
            "--output", str(output), "--device", "cpu", "--no-progress", "--num-workers", "0",
            *map(str, extra)]
    return extract_tool.main(args)


def reference_regions(model, path, min_boxes=10, max_boxes=100, conf=0.2):
    """The detector called step by step through its public API, selection as a per-class NMS loop."""
    img = cv2.imread(str(path))
    resized, _ = resize_shortest_edge(img, 96, 128)
    sy, sx = resized.shape[0] / img.shape[0], resized.shape[1] / img.shape[1]
    x = model.preprocess_image(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        res4 = model.features(x)
        props = model.proposal_generator(res4, [resized.shape[:2]])[0]["proposal_boxes"]
        feats = model.roi_heads.region_features(res4, [props])
        preds = model.roi_heads.predict(feats)
    probs = preds["class_logits"].softmax(-1)
    boxes = props / torch.tensor([sx, sy, sx, sy])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img.shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img.shape[0])
    max_conf = torch.zeros(len(boxes))
    for c in range(probs.shape[1] - 1):
        keep = nms(boxes, probs[:, c], 0.3)
        max_conf[keep] = torch.maximum(max_conf[keep], probs[keep, c])
    count = min(max(int((max_conf >= conf).sum()), min_boxes), max_boxes, len(boxes))
    keep = torch.argsort(max_conf, descending=True, stable=True)[:count]
    return img.shape[:2], boxes[keep], probs[keep], preds["attr_logits"][keep].softmax(-1), feats[keep]


def check_valid(rec: RoIRecord, num_classes=11, num_attrs=7):
    k = rec.num_boxes
    assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (k, 4)
    assert rec.class_probs.dtype == np.float16 and rec.class_probs.shape == (k, num_classes)
    assert rec.attr_probs.dtype == np.float16 and rec.attr_probs.shape == (k, num_attrs)
    assert rec.object_ids.dtype == np.int32 and (rec.object_ids < num_classes - 1).all()
    np.testing.assert_allclose(rec.class_probs.astype(np.float32).sum(1), 1, atol=1e-2)
    assert (rec.boxes[:, 2] >= rec.boxes[:, 0]).all() and (rec.boxes[:, 2] <= rec.width + 1e-3).all()


def test_store_matches_detector_called_directly(tmp_path, weights, model):
    # Pairs of equal sizes so batches of 2 need no padding (padding changes border activations).
    files = make_images(tmp_path / "imgs", [(90, 120), (90, 120), (130, 100), (130, 100), (64, 200)])
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "out", "--features", "--batch-size", 2) == 0
    store = RoIStore(tmp_path / "out")
    assert sorted(store.ids()) == [f.stem for f in files]
    header = store.header
    assert (header["mode"] == "faster_rcnn" and header["features"] is True
            and len(header["weights_sha256"]) == 64)
    assert "ROI_HEADS" in header["detector_config"] and header["selection"]["min_boxes"] == 10
    for f in files:
        rec = store[f.stem]
        check_valid(rec)
        (h, w), boxes, probs, attr_probs, feats = reference_regions(model, f)
        assert (rec.height, rec.width, rec.path) == (h, w, str(f))
        assert 10 <= rec.num_boxes <= 100 and rec.num_boxes == len(boxes)
        np.testing.assert_allclose(rec.boxes, boxes.numpy(), atol=1e-3)
        np.testing.assert_allclose(rec.class_probs, probs.numpy(), atol=2e-3)
        np.testing.assert_allclose(rec.attr_probs, attr_probs.numpy(), atol=2e-3)
        np.testing.assert_allclose(rec.features, feats.numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_array_equal(rec.object_ids, probs[:, :-1].argmax(1).numpy())
        np.testing.assert_array_equal(rec.attr_ids, attr_probs[:, :-1].argmax(1).numpy())
    store.close()


def test_min_max_counts_and_npz_format(tmp_path, weights):
    make_images(tmp_path / "imgs", [(90, 120), (100, 100), (70, 140)])
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "few", "--min-boxes", 4, "--max-boxes", 6,
                    "--conf-thresh", 0.0) == 0
    with RoIStore(tmp_path / "few") as store:
        assert [r.num_boxes for r in store] == [6, 6, 6]  # everything passes conf 0: cut to max
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "npz", "--min-boxes", 4, "--max-boxes", 6,
                    "--conf-thresh", 1.0, "--format", "npz", "--features") == 0
    files = sorted((tmp_path / "npz").glob("*.npz"))
    assert [f.stem for f in files] == ["im000", "im001", "im002"]
    assert (tmp_path / "npz" / "failures.tsv").is_file() and (tmp_path / "npz" / "header.json").is_file()
    for f in files:
        with np.load(f, allow_pickle=True) as data:
            k = int(data["num_bbox"])
            info = data["info"].item()
            # Topped up to min; more only for boxes whose (saturated, fp32) softmax is exactly 1.0.
            assert k == 4 or (4 < k <= 6 and (info["objects_conf"] == 1.0).all()), (k, info["objects_conf"])
            assert data["x"].dtype == np.float16 and data["x"].shape == (k, 512)
            assert data["bbox"].dtype == np.float32 and data["bbox"].shape == (k, 4)
            assert info["objects_id"].dtype == np.int64 and info["objects_conf"].dtype == np.float32
            assert info["attrs_id"].shape == (k,) and info["image_h"] == int(data["image_h"])
            assert (info["objects_id"] < 10).all()  # 0-based, background excluded
        check_valid(read_npz(f))


def test_bad_files_are_listed_and_run_completes(tmp_path, weights):
    imgs = tmp_path / "imgs"
    make_images(imgs, [(90, 120), (80, 100)])
    good = cv2.imencode(".jpg", np.full((60, 70, 3), 128, np.uint8))[1].tobytes()
    (imgs / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (imgs / "zero.jpg").write_bytes(b"")
    (imgs / "text.png").write_text("not an image")
    (imgs / "noise.jpg").write_bytes(os.urandom(3000))
    cv2.imwrite(str(imgs / "huge.png"), np.zeros((300, 300, 3), np.uint8))
    cv2.imwrite(str(imgs / "gray16.png"),
                (np.arange(90 * 120).reshape(90, 120) * 7 % 65535).astype(np.uint16))
    assert run_tool(weights, [imgs], tmp_path / "out", "--num-workers", 2, "--batch-size", 3,
                    "--max-pixels", 50_000) == 0
    lines = (tmp_path / "out" / "failures.tsv").read_text().splitlines()
    assert lines[0] == "image_id\tpath\treason"
    reasons = {line.split("\t")[0]: line.split("\t")[2] for line in lines[1:]}
    assert set(reasons) == {"truncated", "zero", "text", "noise", "huge"}
    assert "empty file" in reasons["zero"] and "too large" in reasons["huge"]
    assert "not a decodable image" in reasons["text"]
    with RoIStore(tmp_path / "out") as store:
        assert sorted(store.ids()) == ["gray16", "im000", "im001"]
        assert store["im000"].path == str(imgs / "im000.png")
    # Nothing usable at all: non-zero exit. Bad arguments: exit 2.
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    assert run_tool(weights, [tmp_path / "bad"], tmp_path / "out2") == 1
    assert run_tool(weights, [imgs], tmp_path / "out3", "--min-boxes", 20, "--max-boxes", 10) == 2
    assert run_tool(tmp_path / "missing.pth", [imgs], tmp_path / "out3") == 2
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert run_tool(tmp_path / "junk.pth", [imgs], tmp_path / "out4") == 2


@pytest.mark.parametrize("fmt", ["lmdb", "npz"])
def test_failed_run_that_stored_nothing_does_not_block_the_corrected_one(tmp_path, weights, fmt):
    make_images(tmp_path / "imgs", [(90, 120)])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not weights\n")
    out = tmp_path / "out"
    # Weights that are not a checkpoint: refused before any output exists.
    assert run_tool(notes, [tmp_path / "imgs"], out, "--format", fmt) == 2
    assert not out.exists() or not any(out.iterdir())
    # A run that could store nothing (every image unreadable) with other settings than the corrected one.
    assert run_tool(weights, [tmp_path / "bad"], out, "--format", fmt, "--conf-thresh", 0.5) == 1
    assert run_tool(weights, [tmp_path / "imgs"], out, "--format", fmt) == 0
    if fmt == "lmdb":
        with RoIStore(out) as store:
            assert store.ids() == ["im000"] and store.header["selection"]["conf_thresh"] == 0.2
        # With a record stored, other settings are refused, naming what differs.
        assert run_tool(weights, [tmp_path / "imgs"], out, "--format", fmt, "--conf-thresh", 0.5) == 2
    else:
        assert [f.stem for f in out.glob("*.npz")] == ["im000"]
        assert run_tool(weights, [tmp_path / "imgs"], out, "--format", fmt, "--conf-thresh", 0.5) == 2


def test_boxes_from_gives_features_for_exactly_those_boxes(tmp_path, weights, model):
    files = make_images(tmp_path / "imgs", [(90, 120), (100, 80)])
    given = {
        "im000": np.array([[0, 0, 120, 90], [10.5, 20.25, 60, 70], [30, 5, 31, 6]], np.float32),
        "im001": np.array([[5, 5, 50, 60]], np.float32),
    }
    with RoIStoreWriter(tmp_path / "gt", {"fingerprint": "gt"}) as w:
        w.write_batch([RoIRecord(k, "", 0, 0, boxes=b) for k, b in given.items()])
    make_images(tmp_path / "imgs2", [(90, 120)] * 3)  # a third image without given boxes -> failure
    (tmp_path / "imgs2" / "im002.png").rename(tmp_path / "imgs" / "im002.png")
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "out", "--boxes-from", tmp_path / "gt",
                    "--features", "--batch-size", 1) == 0
    with RoIStore(tmp_path / "out") as store:
        assert store.header["mode"] == "fast_rcnn"
        assert sorted(store.ids()) == ["im000", "im001"]
        for f in files:
            rec = store[f.stem]
            np.testing.assert_array_equal(rec.boxes, given[f.stem])  # exactly the given boxes, in order
            img = cv2.imread(str(f))
            resized, _ = resize_shortest_edge(img, 96, 128)
            scale = np.array([resized.shape[1] / img.shape[1], resized.shape[0] / img.shape[0]] * 2,
                             np.float32)
            x = model.preprocess_image(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
            with torch.no_grad():
                out = model.fast_rcnn(x, [torch.from_numpy(given[f.stem] * scale)])
            np.testing.assert_allclose(rec.features, out["features"].numpy(), atol=2e-2, rtol=1e-2)
            np.testing.assert_allclose(rec.class_probs, out["class_probs"].numpy(), atol=2e-3)
    assert "no boxes" in (tmp_path / "out" / "failures.tsv").read_text()


def test_shards_are_disjoint_and_read_together(tmp_path, weights):
    files = make_images(tmp_path / "imgs", [(64, 80)] * 5)
    for part in ("0/2", "1/2"):
        assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "out", "--shard", part) == 0
    with RoIStore(tmp_path / "out") as store:
        assert len(store.paths) == 2 and len(store) == 5
        assert sorted(store.ids()) == [f.stem for f in files]
    assert extract_tool.resolve_shard(None, {"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert extract_tool.resolve_shard(None, {}) == (0, 1)
    with pytest.raises(extract_tool.UsageError, match="i/N"):
        extract_tool.resolve_shard("2of4", {})


def _raw_records(output) -> dict[str, bytes]:
    """Every stored record as its encoded bytes (all parts of a sharded store)."""
    with RoIStore(output) as store:
        return {image_id: store._get_raw(image_id) for image_id in store.ids()}


def test_records_do_not_depend_on_batch_size_sharding_or_resume(tmp_path, weights):
    # Five sizes: resized for the network they all differ, so a batched forward would pad them.
    files = make_images(tmp_path / "imgs", [(90, 120), (130, 100), (64, 200), (100, 100), (150, 90)])
    listing = tmp_path / "all.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    first_part = tmp_path / "part.txt"  # the run that was interrupted stored these before being killed
    first_part.write_text("".join(f"{f}\n" for f in files[::2]))
    flags = ["--features", "--conf-thresh", 0.1]
    assert run_tool(weights, [listing], tmp_path / "b1", "--batch-size", 1, *flags) == 0
    reference = _raw_records(tmp_path / "b1")
    assert sorted(reference) == [f.stem for f in files]
    runs = {"batch 4": [["--batch-size", 4]], "batch 3": [["--batch-size", 3]],
            "sharded 0/2 + 1/2, batch 4": [["--shard", "0/2", "--batch-size", 4],
                                           ["--shard", "1/2", "--batch-size", 4]]}
    for name, commands in runs.items():
        out = tmp_path / name.replace(" ", "_").replace("/", "of")
        for extra in commands:
            assert run_tool(weights, [listing], out, *extra, *flags) == 0
        records = _raw_records(out)
        assert records.keys() == reference.keys(), name
        for image_id, raw in reference.items():
            assert records[image_id] == raw, f"{name}: record {image_id} differs from the batch-size-1 run"
    # Resumed: three images stored by a first run, the others by the re-run, each in other batch company.
    resumed = tmp_path / "resumed"
    assert run_tool(weights, [first_part], resumed, "--batch-size", 4, *flags) == 0
    assert run_tool(weights, [listing], resumed, "--batch-size", 4, *flags) == 0
    assert _raw_records(resumed) == reference


def _processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace") \
                    and " Z " not in (entry / "stat").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, weights):
    files = make_images(tmp_path / "imgs", [(96, 128)] * 30)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "extract_rois.py"), "--config-file", str(CONFIG),
           "--weights", str(weights), "--input", str(tmp_path / "imgs"), "--output", str(out),
           "--device", "cpu", "--batch-size", "2", "--num-workers", "1", "--no-progress", "--features"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        if (out / "data.mdb").exists():
            with RoIStore(out) as store:
                stored = len(store)
            if stored >= 1:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()
    # Its DataLoader worker dies with it (it used to linger for good, blocked on a pipe nobody read).
    deadline = time.time() + 20
    while time.time() < deadline and _processes_mentioning(str(out)):
        time.sleep(0.1)
    assert not _processes_mentioning(str(out)), "a worker of the killed run is still alive"
    with RoIStore(out) as store:
        at_kill = len(store)
    assert 1 <= at_kill < len(files)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {at_kill}" in rerun.stdout or f"skipped {at_kill}" in rerun.stderr
    with RoIStore(out) as store:
        ids = store.ids()
        assert sorted(ids) == [f.stem for f in files] and len(ids) == len(set(ids)) == len(store)
        for rec in store:
            check_valid(rec)
            assert rec.features.shape == (rec.num_boxes, 512) and 10 <= rec.num_boxes <= 100


@pytest.mark.slow
def test_sigint_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, weights):
    # 48 images: the signal must land while the run still has work. With 16, a test process starved by a
    # busy machine first saw a record when the run was already exiting (make test, 2 cores, 2 more jobs).
    files = make_images(tmp_path / "imgs", [(96, 128), (120, 90)] * 24)
    out, flags = tmp_path / "out", ["--features", "--batch-size", "2"]
    cmd = [sys.executable, str(REPO / "tools" / "extract_rois.py"), "--config-file", str(CONFIG),
           "--weights", str(weights), "--input", str(tmp_path / "imgs"), "--output", str(out),
           "--device", "cpu", "--num-workers", "1", "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C in a terminal signals the whole process group: the tool and its DataLoader worker.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "data.mdb").exists():
            with RoIStore(out) as store:
                if len(store) >= 1:
                    break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and f"{out} is consistent: run the same command again" in stderr
    with RoIStore(out) as store:
        at_interrupt = len(store)
        for rec in store:
            check_valid(rec)
    assert 1 <= at_interrupt < len(files)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"done {len(files) - at_interrupt}, skipped {at_interrupt}" in rerun.stdout
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "whole", *flags) == 0
    resumed, whole = _raw_records(out), _raw_records(tmp_path / "whole")
    assert sorted(resumed) == [f.stem for f in files]
    assert resumed == whole  # every record bit for bit as in the uninterrupted run


class _DiskFillsUp:
    """An LMDB environment whose third write transaction (header, first batch, then this) finds the disk
    full."""

    def __init__(self, env):
        self._env, self._writes = env, 0

    def begin(self, write: bool = False, **kw):
        import lmdb

        self._writes += write
        if write and self._writes == 3:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return self._env.begin(write=write, **kw)

    def __getattr__(self, name):
        return getattr(self._env, name)


@pytest.mark.parametrize("fmt", ["lmdb", "npz"])
def test_disk_full_during_extraction_keeps_what_was_stored_and_says_where(tmp_path, weights, monkeypatch,
                                                                          caplog, fmt):
    import errno

    import lmdb

    from detector import atomic

    files = make_images(tmp_path / "imgs", [(64, 80), (80, 64)])
    out, flags = tmp_path / "out", ["--batch-size", 1, "--format", fmt]
    real_open, real_lmdb_open, npz_writes = open, lmdb.open, []

    def writer_env(path, **kw):  # only the writer's environment (readers open read-only)
        env = real_lmdb_open(path, **kw)
        return env if kw.get("readonly") else _DiskFillsUp(env)

    def full_disk_open(path, mode="r", *args, **kw):  # the second npz runs out of space half-way
        f = real_open(path, mode, *args, **kw)
        if "w" in mode and str(path).endswith(f".npz.tmp.{os.getpid()}"):
            npz_writes.append(path)
            if len(npz_writes) == 2:
                f.write(b"partial")
                f.close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    with monkeypatch.context() as patch:
        if fmt == "lmdb":
            patch.setattr(lmdb, "open", writer_env)
        else:
            patch.setattr(atomic, "open", full_disk_open, raising=False)  # the one atomic write
        assert run_tool(weights, [tmp_path / "imgs"], out, *flags) == 2
    where = (f"{out}: cannot store a batch of 1 record(s)" if fmt == "lmdb"
             else f"cannot write {out / 'im001.npz'}")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(where) and "No space left on device" in errors[0], errors
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # nothing half-written left behind
    stored = sorted(_raw_records(out)) if fmt == "lmdb" else sorted(p.stem for p in out.glob("*.npz"))
    assert stored == ["im000"]  # the first batch, intact and readable
    if fmt == "npz":
        for p in out.glob("*.npz"):
            check_valid(read_npz(p))
    assert run_tool(weights, [tmp_path / "imgs"], out, *flags) == 0  # space again: the rest is added
    final = sorted(_raw_records(out)) if fmt == "lmdb" else sorted(p.stem for p in out.glob("*.npz"))
    assert final == [f.stem for f in files]


def test_webdataset_input_and_visualization(tmp_path, weights):
    import io
    import tarfile

    rng = np.random.default_rng(3)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("000000000", "000000001"):
            img = cv2.resize(rng.integers(0, 255, (5, 5, 3), np.uint8), (140, 100),
                             interpolation=cv2.INTER_CUBIC)
            for ext, data in ((".jpg", cv2.imencode(".jpg", img)[1].tobytes()), (".txt", b"caption"),
                              (".json", b"{}")):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert run_tool(weights, [shard], tmp_path / "out") == 0
    with RoIStore(tmp_path / "out") as store:
        assert store.ids() == ["000000000", "000000001"]
        assert store["000000001"].path == f"{shard}::000000001.jpg"
    assert visualize_tool.main(["--store", str(tmp_path / "out"), "--image-id", "000000001",
                                "--output", str(tmp_path / "vis"), "--max-boxes", "5"]) == 0
    png = cv2.imread(str(tmp_path / "vis" / "000000001.png"))
    assert png.shape[0] > 480 and png.shape[1] == round(140 * 480 / 100)  # scaled up, a legend below
    from detector.image_sources import load_image

    original = cv2.resize(load_image(f"{shard}::000000001.jpg"), (png.shape[1], 480),
                          interpolation=cv2.INTER_NEAREST)
    assert (png[:480] != original).any(axis=2).mean() > 0.01  # boxes were drawn


def test_visualize_is_readable_on_a_small_image_names_task_classes_and_makes_a_contact_sheet(tmp_path):
    from e2e_vl.data.easy_vqa import REGION_CLASSES
    from e2e_vl.visualize.drawing import PALETTE

    image = tmp_path / "small.png"
    cv2.imwrite(str(image), np.full((32, 48, 3), 200, np.uint8))
    boxes = np.array([[0, 0, 48, 32], [4, 4, 20, 20], [24, 8, 44, 30]], np.float32)
    cp = np.zeros((3, len(REGION_CLASSES) + 1), np.float16)
    for i in range(3):
        rec = RoIRecord(str(i), str(image), 32, 48, boxes=boxes, class_probs=cp,
                        object_ids=np.array([0, 5, 23], np.int32),
                        object_conf=np.array([0.9, 0.8, 0.7], np.float32))
        write_npz(tmp_path, rec)
    pictures = []
    for i in range(3):
        assert visualize_tool.main(["--store", str(tmp_path / f"{i}.npz"), "--output", str(tmp_path / "vis"),
                                    "--classes", "easy_vqa", "--max-boxes", "2"]) == 0
        pictures.append(cv2.imread(str(tmp_path / "vis" / f"{i}.png")))
    rec = read_npz(tmp_path / "0.npz")
    assert visualize_tool.box_labels(rec, 0.1, REGION_CLASSES)[1] == f"{REGION_CLASSES[5]} 0.80"
    picture, drawn = visualize_tool.draw(cv2.imread(str(image)), rec, 2, 0.1, REGION_CLASSES)
    assert len(drawn) == 2 and min(picture.size) >= 480  # 32 px scaled up to 480
    rgb = np.asarray(picture)
    for box in drawn:  # each drawn box's outline is there in its own colour; the third box is not drawn
        assert (rgb == np.array(box.color, np.uint8)).all(axis=2).sum() > 100
    assert not (rgb == np.array(PALETTE[2], np.uint8)).all(axis=2).any()
    sheet = tmp_path / "sheet.png"
    store = tmp_path / "store"
    with RoIStoreWriter(store, {"test": True}) as out:
        out.write_batch(read_npz(tmp_path / f"{i}.npz") for i in range(3))
    assert visualize_tool.main(["--store", str(store), "--num", "3", "--output", str(tmp_path / "vis2"),
                                "--contact-sheet", str(sheet), "--columns", "2"]) == 0
    assert cv2.imread(str(sheet)).shape == (2 * 320, 2 * 320, 3)  # 3 pictures, 2 a row


def test_visualize_labels_use_vg_names():
    k = 2
    cp = np.zeros((k, 1601), np.float16)
    ap = np.zeros((k, 401), np.float16)
    rec = RoIRecord("1", "x.jpg", 10, 10, boxes=np.zeros((k, 4), np.float32), class_probs=cp, attr_probs=ap,
                    object_ids=np.array([0, 1], np.int32), object_conf=np.array([0.9, 0.5], np.float32),
                    attr_ids=np.array([0, 0], np.int32), attr_conf=np.array([0.8, 0.05], np.float32))
    from detector import vocab

    labels = visualize_tool.box_labels(rec, attr_thresh=0.1)
    assert labels[0] == f"{vocab.attribute_names()[0]} {vocab.object_names()[0]} 0.90"
    assert labels[1] == f"{vocab.object_names()[1]} 0.50"  # attribute below the threshold is left out


def test_bf16_autocast_run_stores_valid_fp32_boxes(tmp_path, weights):
    make_images(tmp_path / "imgs", [(90, 120), (100, 100)])
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "out", "--precision", "bf16", "--features") == 0
    with RoIStore(tmp_path / "out") as store:
        assert store.header["precision"] == "bf16" and len(store) == 2
        for rec in store:
            check_valid(rec)
            assert rec.features.dtype == np.float16 and 10 <= rec.num_boxes <= 100


def test_min_boxes_tops_up_low_scores_and_an_image_with_fewer_regions_is_listed_and_counted(tmp_path, capsys):
    """Every class score far under every floor: the top-up still fills to --min-boxes (generate_tsv's
    argsort of max_conf). Fewer proposals than --min-boxes: all are stored, the image is listed in
    failures.tsv with the reason and the summary counts it."""
    torch.manual_seed(0)
    model = build_detector(load_cfg(CONFIG))
    cls = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():  # the background takes all: class scores ~e-26
        cls.weight.zero_()
        cls.bias.zero_()
        cls.bias[-1] = 60.0
    weights = tmp_path / "hopeless.pth"
    save_checkpoint(model, weights)
    files = make_images(tmp_path / "imgs", [(90, 120), (96, 96)])
    assert run_tool(weights, [tmp_path / "imgs"], tmp_path / "topped", "--min-boxes", 5) == 0
    assert capsys.readouterr().out.strip() == "done 2, skipped 0 (already stored), failed 0"
    with RoIStore(tmp_path / "topped") as store:
        assert [store[f.stem].num_boxes for f in files] == [5, 5]
        assert all((store[f.stem].object_conf < 1e-6).all() for f in files)

    short = tmp_path / "short"
    assert run_tool(weights, [tmp_path / "imgs"], short, "--min-boxes", 5,
                    "--opts", "MODEL.RPN.POST_NMS_TOPK_TEST", 3) == 0
    assert capsys.readouterr().out.strip() == ("done 2, skipped 0 (already stored), failed 0, fewer boxes "
                                               "than --min-boxes 2 (see failures.tsv)")
    with RoIStore(short) as store:
        counts = {f.stem: store[f.stem].num_boxes for f in files}
    assert all(0 < k < 5 for k in counts.values())
    lines = (short / "failures.tsv").read_text().splitlines()
    assert lines[1:] == [f"{f.stem}\t{f}\tstored {counts[f.stem]} boxes, fewer than --min-boxes 5: the "
                         f"detector proposed only {counts[f.stem]} regions" for f in files]
