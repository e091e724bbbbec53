"""``slidestream bench train``: the streamed and in-memory feeds are timed in their own windows (no
loader worker alive while the in-memory feed runs), so a slow loader cannot hide behind the other
feed's steps; the ratio is computed from the two rows."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_SLIDE, REPO

from pipelines import cli


def test_bench_train_windows_are_separate(capsys):
    rc = cli.main(
        ["bench", "train", "--json", "--steps", "1", "--rounds", "2", "--config",
         str(REPO / "pipelines/configs/pretrain/tiny-cpu.yaml"), f"data.slides={DEMO_SLIDE}", "data.num_workers=1", "train.batch_size=4",
         "data.tile_size=64", "augment.global_size=32", "augment.local_size=16", "model.img_size=32"],
    )  # fmt: skip
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["loader_processes_during_in_memory"] == 0  # the worker of round 1 was stopped
    assert r["streamed"]["windows"] == r["in_memory"]["windows"] == 2
    assert r["ratio"] == pytest.approx(r["streamed"]["steps_per_s"] / r["in_memory"]["steps_per_s"])
    assert r["loader_procs_x_threads"] == 1 * r["read_threads"]
    assert r["aligned"] and r["scaled_decode"] and r["decoded_per_delivered"] >= 1
    for feed in ("streamed", "in_memory"):
        assert r[feed]["cpu_s_per_step"] > 0 and r[feed]["rss_end_mb"] > 0
