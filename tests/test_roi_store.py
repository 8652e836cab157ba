"""RoI store: record round trips, atomic batches, shards read together, fork-safe reading, npz layout."""
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.roi_store import (
    RoIRecord, RoIStore, RoIStoreError, RoIStoreWriter, decode_record, encode_record, npz_ids, read_npz,
    shard_name, write_npz)


def make_record(image_id, k=5, features=True, seed=0, classes=11, attrs=7):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 50, (k, 2))
    cp = rng.dirichlet(np.ones(classes), k)
    ap = rng.dirichlet(np.ones(attrs), k)
    return RoIRecord(
        image_id=str(image_id), path=f"images/{image_id}.jpg", height=120, width=160,
        boxes=np.concatenate([xy, xy + rng.uniform(1, 60, (k, 2))], 1).astype(np.float32),
        class_probs=cp.astype(np.float16), attr_probs=ap.astype(np.float16),
        object_ids=cp[:, :-1].argmax(1).astype(np.int32), object_conf=cp[:, :-1].max(1).astype(np.float32),
        attr_ids=ap[:, :-1].argmax(1).astype(np.int32), attr_conf=ap[:, :-1].max(1).astype(np.float32),
        features=rng.normal(size=(k, 32)).astype(np.float16) if features else None,
    )


def assert_same(a: RoIRecord, b: RoIRecord):
    assert (a.image_id, a.path, a.height, a.width) == (b.image_id, b.path, b.height, b.width)
    assert a.arrays().keys() == b.arrays().keys()
    for name, value in a.arrays().items():
        assert b.arrays()[name].dtype == value.dtype, name
        np.testing.assert_array_equal(b.arrays()[name], value, err_msg=name)


HEADER = {"fingerprint": "abc", "detector_config": "MODEL: {}\n"}


def test_record_round_trip_without_pickle():
    rec = make_record("img1")
    data = encode_record(rec)
    assert b"\x80\x04" not in data[:2]  # not a pickle stream
    back = decode_record(data)
    assert_same(rec, back)
    assert back.boxes.flags.writeable  # torch.from_numpy takes it without warnings
    assert torch.from_numpy(back.features).shape == (5, 32)
    empty = make_record("none", k=0, features=False)
    assert decode_record(encode_record(empty)).num_boxes == 0


def test_record_rejects_bad_shapes_and_bytes():
    rec = make_record("x")
    rec.class_probs = rec.class_probs[:3]
    with pytest.raises(RoIStoreError, match="class_probs"):
        encode_record(rec)
    with pytest.raises(RoIStoreError, match="bad magic"):
        decode_record(b"not a record at all")
    good = encode_record(make_record("y"))
    with pytest.raises(RoIStoreError, match="does not fit"):
        decode_record(good[: len(good) // 2], "y")
    with pytest.raises(RoIStoreError, match="invalid image id"):
        encode_record(make_record("__header__"))


def test_writer_reader_random_access_and_iteration(tmp_path):
    recs = [make_record(i, k=i + 1, seed=i) for i in range(6)]
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:
        w.write_batch(recs[:4])
        w.write_batch(recs[4:])
    store = RoIStore(tmp_path / "s")
    assert len(store) == 6
    assert sorted(store.ids()) == [str(i) for i in range(6)]
    assert_same(recs[3], store[3])  # int ids are looked up as their decimal text
    assert_same(recs[5], store["5"])
    assert "2" in store and "99" not in store and "__header__" not in store
    with pytest.raises(KeyError, match="'99'"):
        store["99"]
    assert {r.image_id for r in store} == {str(i) for i in range(6)}
    assert store.header["fingerprint"] == "abc" and store.header["schema_version"] == 1


def test_writer_refuses_other_fingerprint_and_overwrite_resets(tmp_path):
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:
        w.write_batch([make_record("a")])
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:  # same settings: resume
        assert w.existing_ids() == {"a"}
    with pytest.raises(RoIStoreError, match="different detector config"):
        RoIStoreWriter(tmp_path / "s", {"fingerprint": "other"})
    with RoIStoreWriter(tmp_path / "s", {"fingerprint": "other"}, overwrite=True) as w:
        assert w.existing_ids() == set()


def test_store_without_records_pins_no_fingerprint(tmp_path):
    # A run that failed before storing anything left a header only: other settings may take the store over.
    RoIStoreWriter(tmp_path / "s", {**HEADER, "weights_sha256": "1" * 64}).close()
    with RoIStoreWriter(tmp_path / "s", {**HEADER, "fingerprint": "fixed", "weights_sha256": "2" * 64}) as w:
        assert w.header["fingerprint"] == "fixed"
        w.write_batch([make_record("a")])
    assert RoIStore(tmp_path / "s").header["fingerprint"] == "fixed"
    # Once a record is stored, the header pins the store; the refusal names what differs.
    with pytest.raises(RoIStoreError, match=r"\(weights_sha256 differ\)"):
        RoIStoreWriter(tmp_path / "s", {**HEADER, "fingerprint": "other", "weights_sha256": "3" * 64})


def test_failed_batch_writes_nothing(tmp_path):
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:
        w.write_batch([make_record("a")])
        bad = make_record("c")
        bad.boxes = bad.boxes[:, :3]
        with pytest.raises(RoIStoreError):
            w.write_batch([make_record("b"), bad])
    assert RoIStore(tmp_path / "s").ids() == ["a"]


BATCH = 4


def _write_forever(path: Path) -> None:
    """A writer that commits batches of large records (each commit spends its time writing and syncing)
    until it is killed; record i is always make_record(i, k=2000, seed=i)."""
    with RoIStoreWriter(path, HEADER) as w:
        start = len(w.existing_ids())
        for first in range(start, 10**6, BATCH):
            w.write_batch([make_record(i, k=2000, seed=i) for i in range(first, first + BATCH)])


def test_sigkill_at_random_points_of_commits_leaves_whole_batches(tmp_path):
    import random
    import signal
    import time

    rng, ctx, path = random.Random(0), mp.get_context("fork"), tmp_path / "s"
    for _ in range(5):
        proc = ctx.Process(target=_write_forever, args=(path,))
        proc.start()
        time.sleep(rng.uniform(0.3, 0.8))  # most of a writer's time is spent inside commits
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        with RoIStore(path) as store:
            ids = sorted(int(i) for i in store.ids())
            assert len(ids) % BATCH == 0 and ids == list(range(len(ids)))  # whole batches, in order
            for i in ids[-BATCH:]:  # the newest batch, written last before a kill, is complete and exact
                assert_same(store[str(i)], make_record(i, k=2000, seed=i))
    assert len(ids) >= BATCH  # the writers did store something


def test_map_grows_when_full(tmp_path):
    with RoIStoreWriter(tmp_path / "s", HEADER, map_size=64 * 1024) as w:
        w.write_batch([make_record(i, k=200, seed=i) for i in range(8)])
    assert len(RoIStore(tmp_path / "s")) == 8


def test_shards_read_together(tmp_path):
    for part in range(3):
        with RoIStoreWriter(tmp_path / "out" / shard_name(part, 3), HEADER) as w:
            w.write_batch([make_record(f"{part}-{j}", seed=part * 10 + j) for j in range(part + 1)])
    store = RoIStore(tmp_path / "out")
    assert len(store) == 6 and len(store.paths) == 3
    assert_same(make_record("2-1", seed=21), store["2-1"])
    assert sorted(r.image_id for r in store) == sorted(store.ids())
    listed = RoIStore([tmp_path / "out" / shard_name(0, 3), tmp_path / "out" / shard_name(2, 3)])
    assert len(listed) == 4
    (tmp_path / "out" / shard_name(1, 3) / "data.mdb").unlink()
    with pytest.raises(RoIStoreError, match="missing parts"):
        RoIStore(tmp_path / "out")
    with pytest.raises(RoIStoreError, match="not found"):
        RoIStore(tmp_path / "nowhere")


def test_stores_with_overlapping_ids_are_refused_naming_the_id(tmp_path):
    with RoIStoreWriter(tmp_path / "a", HEADER) as w:
        w.write_batch([make_record("1"), make_record("2")])
    with RoIStoreWriter(tmp_path / "b", HEADER) as w:
        w.write_batch([make_record("3"), make_record("2", seed=5)])
    with pytest.raises(RoIStoreError, match=r"image id '2' is in both .*a and .*b"):
        RoIStore([tmp_path / "a", tmp_path / "b"])
    assert len(RoIStore(tmp_path / "a")) == 2  # each alone is fine


def _read_in_child(store, image_id, queue):
    queue.put(store[image_id].boxes.tolist())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_store_usable_in_worker_processes(tmp_path, method):
    rec = make_record("z")
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:
        w.write_batch([rec])
    store = RoIStore(tmp_path / "s")
    assert store["z"].num_boxes == 5  # opened in the parent before the child starts
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(store, "z", queue))
    proc.start()
    boxes = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(np.array(boxes, np.float32), rec.boxes)
    assert pickle.loads(pickle.dumps(store))["z"].num_boxes == 5


def test_npz_layout_matches_bottom_up_attention(tmp_path):
    rec = make_record("COCO_1", k=4)
    path = write_npz(tmp_path, rec)
    assert path.name == "COCO_1.npz" and npz_ids(tmp_path) == {"COCO_1"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    with np.load(path, allow_pickle=True) as data:  # how bottom-up-attention.pytorch users read it
        # float16: the features' own precision, not float32 that only looks more precise
        assert data["x"].dtype == np.float16 and data["x"].shape == (4, 32)
        assert data["bbox"].dtype == np.float32 and data["bbox"].shape == (4, 4)
        assert int(data["num_bbox"]) == 4 and int(data["image_h"]) == 120 and int(data["image_w"]) == 160
        info = data["info"].item()
    assert set(info) == {"image_id", "image_h", "image_w", "num_boxes", "objects_id", "objects_conf",
                         "attrs_id", "attrs_conf"}
    assert info["image_id"] == "COCO_1" and info["num_boxes"] == 4
    np.testing.assert_array_equal(info["objects_id"], rec.object_ids)
    np.testing.assert_array_equal(info["attrs_conf"], rec.attr_conf)
    back = read_npz(path)  # our reader never unpickles
    np.testing.assert_array_equal(back.boxes, rec.boxes)
    np.testing.assert_array_equal(back.class_probs, rec.class_probs)
    assert back.features.dtype == np.float16
    np.testing.assert_array_equal(back.features, rec.features)
    no_feat = write_npz(tmp_path, make_record("nf", features=False))
    with np.load(no_feat, allow_pickle=False) as data:
        assert "x" not in data.files


def test_an_unwritable_output_is_one_error_naming_it(tmp_path, monkeypatch):
    import errno

    import lmdb

    from detector import atomic

    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RoIStoreError,
                       match=f"{tmp_path / 'file' / 's'}: cannot open the RoI store for writing: "
                                            "Not a directory"):
        RoIStoreWriter(tmp_path / "file" / "s", HEADER)

    def read_only(path, **kw):
        raise lmdb.ReadonlyError(f"{path}: Read-only file system")

    monkeypatch.setattr(lmdb, "open", read_only)
    with pytest.raises(RoIStoreError,
                       match=f"{tmp_path / 'ro'}: cannot open the RoI store for writing: .*Read-only"):
        RoIStoreWriter(tmp_path / "ro", HEADER)
    monkeypatch.undo()

    def no_space(path, mode="r", *args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "open", no_space, raising=False)  # the one atomic write
    with pytest.raises(RoIStoreError, match=f"cannot write {tmp_path / 'a.npz'}: No space left on device"):
        write_npz(tmp_path, make_record("a"))
    assert not list(tmp_path.glob("*a.npz*"))


def test_npz_without_an_attribute_head_stores_no_attributes(tmp_path):
    rec = make_record("plain", k=3)
    rec.attr_probs = rec.attr_ids = rec.attr_conf = None  # a detector without an attribute head
    path = write_npz(tmp_path, rec)
    with np.load(path, allow_pickle=True) as data:
        assert not {"attrs_id", "attrs_conf", "attr_prob"} & set(data.files)
        info = data["info"].item()
    assert set(info) == {"image_id", "image_h", "image_w", "num_boxes", "objects_id", "objects_conf"}
    back = read_npz(path)
    assert back.attr_ids is None and back.attr_conf is None and back.attr_probs is None
    np.testing.assert_array_equal(back.object_ids, rec.object_ids)
    with RoIStoreWriter(tmp_path / "s", HEADER) as w:  # the LMDB store leaves them out too
        w.write_batch([rec])
    assert RoIStore(tmp_path / "s")["plain"].attr_ids is None


def test_a_stored_record_is_byte_for_byte_what_the_codec_wrote_before_it_moved_to_detector():
    """tests/data/roi_record_v1.bin was written by the codec while it lived in e2e_vl.data.roi_store; the
    codec under detector/ must read it to the same values and write the same bytes."""
    from detector.roi_store import decode_record, encode_record

    stored = (Path(__file__).parent / "data" / "roi_record_v1.bin").read_bytes()
    rng = np.random.default_rng(14)
    k = 3
    expected = dict(
        boxes=rng.uniform(0, 400, (k, 4)).astype(np.float32),
        class_probs=rng.dirichlet(np.ones(6), k).astype(np.float16),
        attr_probs=rng.dirichlet(np.ones(5), k).astype(np.float16),
        object_ids=np.array([3, 0, 1], np.int32), object_conf=rng.uniform(0, 1, k).astype(np.float32),
        attr_ids=np.array([2, 2, 0], np.int32), attr_conf=rng.uniform(0, 1, k).astype(np.float32),
        features=rng.normal(size=(k, 8)).astype(np.float16))
    record = decode_record(stored)
    assert (record.image_id, record.path, record.height, record.width) == ("42", "images/42.jpg", 480, 640)
    for name, array in expected.items():
        np.testing.assert_array_equal(getattr(record, name), array)
    assert encode_record(record) == stored
