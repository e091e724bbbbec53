"""pipelines.training: the components every training loop shares — checkpointer (one resume
policy), precision, optimiser groups and schedules, metrics logger, seeding, resumable stream."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.errors import ConfigError, ResumeError
from pipelines.training import (
    Checkpointer,
    DistInfo,
    GeneratorState,
    MetricsLogger,
    OptimConfig,
    Precision,
    RNGState,
    Stream,
    TensorState,
    apply_schedules,
    load_checkpoint,
    lr_schedule,
    optimizer_for,
    save_checkpoint,
    seed_everything,
    wd_schedule,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(2)

    def forward(self, x):
        return self.ln(self.fc(self.bn(self.conv(x)).mean((2, 3))))


def _step(net: nn.Module, opt: torch.optim.Optimizer, precision: Precision) -> None:
    x = torch.randn(4, 3, 8, 8)
    with precision.autocast():
        loss = net(x).float().pow(2).mean()
    precision.backward(loss)
    precision.unscale_(opt)
    precision.step(opt)
    opt.zero_grad(set_to_none=True)


def test_checkpointer_round_trip_restores_every_object(tmp_path):
    seed_everything(0)
    net, centre, gen = _Net(), torch.zeros(3), torch.Generator().manual_seed(5)
    opt = optimizer_for(net, OptimConfig(lr=1e-2))
    precision = Precision("none", torch.device("cpu"))
    objects = {"model": net, "optimizer": opt, "scaler": precision, "centre": TensorState(centre)}
    ck = Checkpointer(
        tmp_path / "checkpoint.pt",
        shared=objects,
        per_rank={"rng": RNGState(), "augment": GeneratorState(gen)},
    )
    _step(net, opt, precision)
    centre += 2.5
    torch.rand(7, generator=gen)
    ck.save(1, config={"x": 1})
    want = {
        "weights": {k: v.clone() for k, v in net.state_dict().items()},
        "torch": torch.rand(3),
        "numpy": np.random.random(3),
        "python": random.random(),
        "gen": torch.rand(3, generator=gen),
    }
    # a fresh process's state: other weights, other RNG positions
    seed_everything(123)
    net2, centre2, gen2 = _Net(), torch.zeros(3), torch.Generator().manual_seed(9)
    opt2 = optimizer_for(net2, OptimConfig(lr=1e-2))
    ck2 = Checkpointer(
        tmp_path / "checkpoint.pt",
        shared={"model": net2, "optimizer": opt2, "scaler": precision, "centre": TensorState(centre2)},
        per_rank={"rng": RNGState(), "augment": GeneratorState(gen2)},
    )
    assert ck2.resume(False) == 0  # not asked: nothing restored
    assert not torch.equal(net2.fc.weight, want["weights"]["fc.weight"])
    assert ck2.resume(True) == 1
    for k, v in want["weights"].items():
        assert torch.equal(net2.state_dict()[k], v), k
    assert torch.equal(centre2, torch.full((3,), 2.5))
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    # the RNG streams continue where the saved run's did
    assert torch.equal(torch.rand(3), want["torch"]) and np.array_equal(np.random.random(3), want["numpy"])
    assert random.random() == want["python"] and torch.equal(torch.rand(3, generator=gen2), want["gen"])
    raw = load_checkpoint(tmp_path / "checkpoint.pt")
    assert raw["step"] == 1 and raw["world_size"] == 1 and raw["config"] == {"x": 1}
    assert {"model", "optimizer", "scaler", "centre", "rank_states"} <= set(raw)


def test_one_resume_policy(tmp_path, capsys):
    net = _Net()
    ck = Checkpointer(tmp_path / "none.pt", shared={"model": net})
    assert ck.resume(True) == 0 and "no checkpoint" in capsys.readouterr().err
    # written by 2 ranks: a single process refuses it (each rank's stream and RNG are its own)
    save_checkpoint(
        tmp_path / "two.pt",
        {"step": 4, "world_size": 2, "model": net.state_dict(), "rank_states": [{}, {}]},
    )
    with pytest.raises(ResumeError, match=r"two\.pt was written by 2 process\(es\).*same world size"):
        Checkpointer(tmp_path / "two.pt", shared={"model": net}).resume(True)
    # a 2-rank run on rank 1 takes rank 1's state
    states = [{"stream": {"epoch": 0}}, {"stream": {"epoch": 7}}]
    save_checkpoint(
        tmp_path / "two.pt", {"step": 4, "world_size": 2, "model": net.state_dict(), "rank_states": states}
    )

    class _Pos:
        epoch = -1

        def state_dict(self):
            return {"epoch": self.epoch}

        def load_state_dict(self, sd):
            self.epoch = sd["epoch"]

    pos = _Pos()
    info = DistInfo(rank=1, world_size=2)
    assert (
        Checkpointer(tmp_path / "two.pt", shared={"model": net}, per_rank={"stream": pos}, info=info).resume(
            True
        )
        == 4
    )
    assert pos.epoch == 7
    # another job's checkpoint lacks this job's objects
    with pytest.raises(ResumeError, match="no 'optimizer' state"):
        Checkpointer(
            tmp_path / "two.pt",
            shared={"model": net, "optimizer": torch.optim.SGD(net.parameters(), 0.1)},
            info=info,
        ).resume(True)


def test_precision_settings():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert Precision("auto", cpu).dtype is None and Precision("none", cpu).scaler is None
    assert Precision("bf16", cpu).dtype is torch.bfloat16
    with pytest.raises(ConfigError, match="needs a GPU"):
        Precision("fp16", cpu)
    with pytest.raises(ConfigError, match="not one of"):
        Precision("off", cpu)
    from pipelines.training import amp_settings

    assert amp_settings("auto", gpu) == (torch.bfloat16, False) and amp_settings("fp16", gpu) == (
        torch.float16,
        True,
    )
    with Precision("bf16", cpu).autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is torch.bfloat16


def test_param_groups_no_decay_on_biases_and_norms():
    from models.mil import create_head
    from models.seg import tissue_net

    for model in (_Net(), create_head("abmil", 16, 2, hidden=8), tissue_net.build({"width": 4, "depth": 2})):
        opt = optimizer_for(model, OptimConfig(weight_decay=0.1))
        apply_schedules(opt, 1e-3, 0.1)
        wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            assert wd[id(p)] == (0.1 if p.ndim >= 2 else 0.0), name
        assert len(wd) == sum(1 for p in model.parameters() if p.requires_grad)


def test_schedules_warmup_cosine_and_linear_scaling():
    cfg = OptimConfig(
        lr=0.1, lr_scaling="linear", min_lr=1e-4, warmup_steps=5, weight_decay=0.04, weight_decay_end=0.4
    )
    lrs = lr_schedule(cfg, 20, global_batch=512)
    peak = 0.1 * 512 / 256
    np.testing.assert_allclose(lrs[:5], np.linspace(0, peak, 5, endpoint=False))
    assert lrs[5] == pytest.approx(peak) and lrs[-1] == pytest.approx(1e-4)
    assert np.all(np.diff(lrs[5:]) <= 0)
    wd = wd_schedule(cfg, 20)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    flat = lr_schedule(OptimConfig(lr=0.1, min_lr=0.1), 10)
    np.testing.assert_allclose(flat, 0.1)
    with pytest.raises(ValueError, match="global batch"):
        lr_schedule(cfg, 10)


def test_metrics_logger_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, names={"dice": ["bg", "fg"]}, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, loss=1.0 / step, dice=[0.5, 0.1 * step])
    log.log(4, loss=0.2, rankme=3.0)  # a new column: the CSV is rewritten with it
    log.close()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,dice_bg,dice_fg,rankme"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss"')  # killed while writing
    resumed = MetricsLogger(tmp_path, resume_step=2, names={"dice": ["bg", "fg"]}, tensorboard=False)
    assert [r["step"] for r in resumed.rows] == [1, 2]
    resumed.log(3, loss=0.4, dice=[0.6, 0.7])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["dice"] == [0.6, 0.7]
    csv_rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[-1].startswith("3,0.4,0.6,0.7")
    assert resumed.plot(tmp_path / "m.png", ["loss", "dice"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(resumed.write_json(tmp_path / "m.json", classes=["bg", "fg"]).read_text())[
        "classes"
    ] == ["bg", "fg"]
    fresh = MetricsLogger(tmp_path, tensorboard=False)  # a new run starts an empty log
    assert fresh.rows == [] and (tmp_path / "metrics.jsonl").read_text() == ""


def test_stream_resumes_mid_epoch():
    from pipelines.pretrain import TensorLoader

    images = torch.arange(40 * 3, dtype=torch.uint8).reshape(40, 3, 1, 1).expand(40, 3, 2, 2).contiguous()

    def firsts(stream, n):
        return [int(stream.next()["image"][0, 0, 0, 0]) for _ in range(n)]

    straight = firsts(Stream(TensorLoader(images, 4, seed=1, batches_per_epoch=3)), 8)
    a = Stream(TensorLoader(images, 4, seed=1, batches_per_epoch=3))
    head = firsts(a, 5)
    b = Stream(TensorLoader(images, 4, seed=1, batches_per_epoch=3))
    b.load_state_dict(a.state_dict())
    assert head + firsts(b, 3) == straight and b.epoch == 2  # 8 batches of 3 per epoch: in epoch 2


def test_seed_everything_seeds_every_generator():
    seed_everything(7)
    a = (torch.rand(2), np.random.random(2), random.random())
    seed_everything(7)
    b = (torch.rand(2), np.random.random(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_json_safe_writes_unmeasured_figures_as_null():
    import json
    import math

    from pipelines.training import json_safe

    doc = {"auroc": math.nan, "folds": [0.9, math.nan], "ci": (0.1, 0.2), "n": 3, "name": "x"}
    out = json_safe(doc)
    assert out == {"auroc": None, "folds": [0.9, None], "ci": [0.1, 0.2], "n": 3, "name": "x"}
    json.dumps(out, allow_nan=False)  # strict JSON
    assert math.isnan(doc["auroc"])  # the input is left as it was
