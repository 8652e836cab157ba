"""Shared test set-up: small, deterministic, CPU by default; GPU and Detectron2 tests skip cleanly."""
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tools the tests start run 2 OpenMP threads beside the other xdist worker: waiting threads that sleep
# instead of spinning give the busy core back (a 60-step stage 1 beside a busy core: 42 s instead of 67 s;
# alone 28 s instead of 25 s). How threads wait never changes a result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist every worker already keeps a core busy: more threads per worker only oversubscribe
# and make the training steps many times slower.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import detectron2  # noqa: F401

        has_d2 = True
    except ImportError:
        has_d2 = False
    # The longest tests first: pytest-xdist hands tests out in this order, so a test of many minutes that
    # started late would finish alone on one worker while the other idles. `slow(minutes=...)` marks them;
    # the others keep their order (a module's tests together, for its module-scoped fixtures).
    def minutes(item) -> float:
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("minutes", 0.0) if mark else 0.0

    items.sort(key=minutes, reverse=True)
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "detectron2" in item.keywords and not has_d2:
            item.add_marker(pytest.mark.skip(reason="needs Detectron2 importable"))


@pytest.fixture
def train_net():
    """tools/train_net.py as a module; the root-logger handlers its runs install are removed afterwards."""
    sys.path.insert(0, str(REPO / "tools"))
    import train_net

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield train_net
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def damage_zip():
    """copy(src, dst): a copy of the torch.save zip `src` with bytes inside its largest entry flipped, so
    that entry's CRC no longer matches (what torch.load alone does not notice)."""
    def copy(src: Path, dst: Path) -> None:
        with zipfile.ZipFile(src) as z:
            big = max(z.infolist(), key=lambda i: i.file_size)
            offset = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
        data = bytearray(src.read_bytes())
        mid = offset + big.file_size // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        dst.write_bytes(bytes(data))

    return copy


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the tiny models' ops gain nothing from a second one, which on a
    busy machine only spins and waits. Modules of tiny models use it for every test (`usefixtures`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded MiniLM folder's tokenizer (BERT's uncased vocabulary)."""
    from e2e_vl.modeling.hf import load_tokenizer

    return load_tokenizer("")


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory, tokenizer) -> Callable[..., str]:
    """`tiny_bert_folder(num_hidden_layers=2, pooler=True)`: the path of a Hugging Face BERT folder of
    `tiny.TINY_BERT`'s size with that many layers, with the MiniLM folder's tokenizer. Its weights are those
    of seed 0 (drawn without touching the tests' random state); each size is written once per session."""
    from transformers import BertConfig, BertModel

    from tiny import TINY_BERT

    folders: dict[tuple[int, bool], str] = {}

    def folder(num_hidden_layers: int = 2, pooler: bool = True) -> str:
        key = (num_hidden_layers, pooler)
        if key not in folders:
            path = tmp_path_factory.mktemp("tiny_bert")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                bert = BertModel(BertConfig(**{**TINY_BERT, "num_hidden_layers": num_hidden_layers}),
                                 add_pooling_layer=pooler)
            bert.save_pretrained(path)
            tokenizer.save_pretrained(path)
            folders[key] = str(path)
        return folders[key]

    return folder


@pytest.fixture(scope="session")
def bert_folder(tiny_bert_folder) -> str:
    """The default tiny BERT folder (2 layers of 32, with a pooler)."""
    return tiny_bert_folder()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A VL-BERT run folder written by tools/train_net.py, as a user's run is (config.yaml, model_best.pth,
    metrics.jsonl, training_curve.png): the easy-VQA smoke model at 64 px, three steps, once a session."""
    out = tmp_path_factory.mktemp("run") / "vlbert"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
                        str(REPO / "configs" / "easy_vqa" / "smoke.yaml"), "--output-dir", str(out),
                        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TRAIN_LIMIT", "24",
                        "DATASETS.TEST_LIMIT", "4"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
