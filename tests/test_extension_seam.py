"""The README's "Adding an architecture or a task" holds for extensions with keys of their own (issue 26):
a stub architecture and a stub task, each one file that declares its own config key (`register_config`) and
registers itself, dropped into the packages' search paths and nothing else touched, train through
tools/train_net.py; their keys are real keys (a typo is the usual "did you mean" error)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from detector.config import ConfigError
import e2e_vl.config
import e2e_vl.modeling
import e2e_vl.modeling.registry
import e2e_vl.tasks

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "easy_vqa" / "smoke.yaml")

STUB_ARCHITECTURE = '''"""A stub architecture: BERT; the regions' mean feature added to [CLS]."""
import torch

from e2e_vl.config import register_config
from e2e_vl.modeling.heads import Encoded, HeadSpec, build_heads
from e2e_vl.modeling.region_encoder import RegionEncoder
from e2e_vl.modeling.registry import register_model

register_config("MODEL.STUB", {"REGION_SCALE": 1.0}, owner=__name__)


@register_model("stub")
class Stub(RegionEncoder):
    body_prefixes = ("bert.", "region_scale")

    def __init__(self, detector, bert, options, tokenizer, region_scale):
        super().__init__(detector, masking=options.masking, freeze_detector=options.freeze_detector)
        self.bert, self.tokenizer, self.loss_weights = bert, tokenizer, dict(options.loss_weights)
        self.region_scale = torch.nn.Parameter(torch.tensor(region_scale))
        hidden = bert.config.hidden_size
        self.init_object_embedding(hidden, object_dropout=0.0, appearance_norm="none")
        self.heads = build_heads(options.heads, HeadSpec(bert.config, bert.embeddings.word_embeddings,
                                                         options.num_answers, options.num_mrc_classes,
                                                         appearance_dim=self.appearance_dim))

    @classmethod
    def from_body(cls, cfg, detector, body, options):
        return cls(detector, body.module, options, body.tokenizer, cfg.MODEL.STUB.REGION_SCALE)

    def enable_gradient_checkpointing(self):
        self.bert.gradient_checkpointing_enable()

    def encode(self, batch):
        device = self.bert.device
        text = self.bert(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["text_mask"].to(device).long()).last_hidden_state
        objects, valid = self.encode_regions(batch)
        slot = batch["sample_image_index"].to(device).clamp(min=0)
        regions, region_valid = objects[slot], valid[slot]
        summary = (regions * region_valid[..., None]).sum(1) / region_valid.sum(1, keepdim=True).clamp(min=1)
        text = torch.cat([text[:, :1] + self.region_scale * summary[:, None], text[:, 1:]], dim=1)
        has_image = batch["sample_image_index"].to(device) >= 0
        return Encoded(text, regions, region_valid, has_image, pooled=text[:, 0])
'''

STUB_TASK = '''"""A stub task: easy-VQA on the first DATASETS.STUB.QUESTIONS training questions."""
from e2e_vl.config import register_config
from e2e_vl.tasks import get_task, register_task

register_config("DATASETS.STUB", {"QUESTIONS": 8}, owner=__name__)


@register_task("stub_task", default_arch="stub")
def build_stub_task(cfg, model, device, eval_only):
    vqa_cfg = cfg.clone()
    vqa_cfg.freeze(False)
    vqa_cfg.DATASETS.TRAIN_LIMIT = cfg.DATASETS.STUB.QUESTIONS
    return get_task("vqa").build(vqa_cfg.freeze(), model, device, eval_only)
'''


@pytest.fixture
def stub_extensions(tmp_path, monkeypatch):
    """The two stub files, each in a folder added to its package's search path; the registries are copies
    for this test, and the stub modules are forgotten afterwards."""
    for package, name, text in ((e2e_vl.modeling, "stub_arch", STUB_ARCHITECTURE),
                                (e2e_vl.tasks, "stub_task", STUB_TASK)):
        folder = tmp_path / package.__name__.replace(".", "_")
        folder.mkdir()
        (folder / f"{name}.py").write_text(text)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(e2e_vl.modeling.registry, "MODELS", dict(e2e_vl.modeling.registry.MODELS))
    monkeypatch.setattr(e2e_vl.modeling.registry, "_CLASSES", dict(e2e_vl.modeling.registry._CLASSES))
    monkeypatch.setattr(e2e_vl.tasks, "TASKS", dict(e2e_vl.tasks.TASKS))
    monkeypatch.setattr(e2e_vl.config, "_DECLARATIONS", dict(e2e_vl.config._DECLARATIONS))
    yield [Path(p) / f"{n}.py" for p, n in ((tmp_path / "e2e_vl_modeling", "stub_arch"),
                                             (tmp_path / "e2e_vl_tasks", "stub_task"))]
    for name in ("e2e_vl.modeling.stub_arch", "e2e_vl.tasks.stub_task"):
        sys.modules.pop(name, None)


def test_a_stub_architecture_and_task_with_their_own_keys_train_by_adding_one_file_each(
        stub_extensions, tmp_path, train_net):
    out = tmp_path / "run"
    assert train_net.cli(["--config-file", SMOKE, "--output-dir", str(out), "TASK", "stub_task",
                          "MODEL.ARCH", "", "MODEL.VL.BERT_RANDOM_INIT", "True",
                          "MODEL.STUB.REGION_SCALE", "0.5", "DATASETS.STUB.QUESTIONS", "24",
                          "SOLVER.IMS_PER_BATCH", "2",
                          "SOLVER.MAX_ITER", "2", "DATASETS.TEST_LIMIT", "4"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["MODEL"]["STUB"] == {"REGION_SCALE": 0.5} and saved["DATASETS"]["STUB"] == {"QUESTIONS": 24}
    assert (out / "metrics.jsonl").is_file() and (out / "model_0000002.pth").is_file()
    with pytest.raises(ConfigError, match=r"'MODEL.STUB.REGION_SCALES'; did you mean "
                                          r"'MODEL.STUB.REGION_SCALE'"):
        e2e_vl.config.load_train_cfg(None, ["MODEL.STUB.REGION_SCALES", "1.0"])
