"""slidestream pretrain under a real ``torchrun --nproc_per_node 2`` (gloo, CPU).

One torchrun launch (module fixture) runs this file as the worker on both ranks:
1. gradient accumulation under DDP (2 ranks × 2 micro-batches with ``no_sync`` on the first)
   against the one-big-batch gradient computed on rank 0 without DDP;
2. a few steps of the tiny config through the CLI, writing a checkpoint and the backbone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from wsi.data import DEMO_SLIDE

HERE = Path(__file__).resolve()
REPO = HERE.parents[3]
TINY = [
    "data.tile_size=48",
    "data.num_workers=0",
    "data.probe_tiles=8",
    "model.img_size=32",
    "augment.global_size=32",
    "augment.local_size=16",
    "augment.n_local=2",
    "ssl.out_dim=64",
    "ssl.hidden_dim=64",
    "ssl.bottleneck_dim=32",
    "train.batch_size=4",
    "train.threads=1",
    "train.progress=false",
    "train.steps=3",
    "train.checkpoint_every=2",
    "train.rankme_every=3",
    "optim.warmup_steps=1",
]


def _accumulation_check(out: Path) -> None:
    from pipelines.config import load_config
    from pipelines.pretrain import PretrainConfig, build_method, forward_backward
    from pipelines.training import init_distributed

    info = init_distributed("cpu")
    cfg = load_config(
        PretrainConfig, REPO / "pipelines/configs/pretrain/tiny-cpu.yaml", [*TINY, "model.drop_path_rate=0"]
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    reference = build_method(cfg)
    reference.load_state_dict(method.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(method.student)
    g = torch.Generator().manual_seed(123)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)
    ]
    mine = [v[4 * info.rank : 4 * info.rank + 4] for v in views]
    forward_backward(method, ddp, [[v[:2] for v in mine], [v[2:] for v in mine]], step=2)
    if info.rank == 0:
        forward_backward(reference, reference.student, [views], step=2)
        # per tensor, the difference relative to that gradient's largest entry (round-off of
        # float32 sums taken in another order scales with the gradient's size)
        diffs = [
            float((a.grad - b.grad).abs().max()) / (float(b.grad.abs().max()) + 1e-12)
            for a, b in zip(method.student.parameters(), reference.student.parameters())
            if a.grad is not None
        ]
        norm = max(float(p.grad.abs().max()) for p in reference.student.parameters() if p.grad is not None)
        (out / "accum.json").write_text(
            json.dumps(
                {"max_rel_diff": max(diffs), "n": len(diffs), "max_grad": norm, "world_size": info.world_size}
            )
        )


def _worker(out: Path) -> int:
    from pipelines import cli

    _accumulation_check(out)
    return cli.main(
        [
            "pretrain",
            "--config",
            str(REPO / "pipelines/configs/pretrain/tiny-cpu.yaml"),
            "--out",
            str(out / "run"),
            f"data.slides={DEMO_SLIDE}",
            *TINY,
        ]
    )


@pytest.fixture(scope="module")
def torchrun_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    from conftest import torchrun

    return out, torchrun(str(HERE), str(out))


@pytest.mark.ddp
def test_ddp_gradient_accumulation_equals_big_batch(torchrun_result):
    out, proc = torchrun_result
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "accum.json").read_text())
    assert res["world_size"] == 2 and res["n"] > 100
    assert res["max_grad"] > 1e-4  # a real gradient, not zeros
    # a missing all-reduce or a wrong micro-batch scale is a relative error of ~0.5
    assert res["max_rel_diff"] < 1e-4, res


@pytest.mark.ddp
def test_ddp_pretrain_writes_checkpoint_and_backbone(torchrun_result):
    out, proc = torchrun_result
    assert proc.returncode == 0, proc.stderr[-4000:]
    ck = torch.load(out / "run" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and ck["world_size"] == 2 and len(ck["rank_states"]) == 2
    # each rank read its own shard of the tile stream
    s0, s1 = (s["stream"]["loader"] for s in ck["rank_states"])
    assert s0["num_shards"] == 2 and set(s0["consumed"]) != set(s1["consumed"])
    assert (out / "run" / "backbone.safetensors").exists()
    assert "steps 3: loss" in proc.stdout
    assert proc.stdout.count("steps 3: loss") == 1  # rank 0 reports


@pytest.mark.ddp
def test_resume_with_another_world_size_is_refused(torchrun_result, capsys):
    """The checkpoint holds each of 2 ranks' sampler position and RNG: one process cannot
    continue that stream, and says so in one line (exit 2) instead of a traceback."""
    from pipelines import cli

    out, proc = torchrun_result
    assert proc.returncode == 0, proc.stderr[-4000:]
    args = [
        "--config",
        str(REPO / "pipelines/configs/pretrain/tiny-cpu.yaml"),
        "--out",
        str(out / "run"),
        "--resume",
    ]
    rc = cli.main(["pretrain", *args, f"data.slides={DEMO_SLIDE}", *TINY, "train.steps=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("slidestream pretrain: error: ")
    assert "written by 2 process(es)" in err[-1] and "same world size" in err[-1]
    assert torch.load(out / "run" / "checkpoint.pt", weights_only=True)["step"] == 3  # untouched


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
