"""Data-parallel training: real `torchrun` processes (Gloo on the CPU) against one process."""

import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

from erde.config.schema import load_config
from erde.data import DeviceBatches
from erde.data.prepare import data_info, prepare_data, train_batches
from erde.distill.teacher import Teacher
from erde.distributed import World
from erde.errors import ErdeError
from erde.models.build import build_model
from erde.models.macs import exit_macs
from erde.run.metrics import read_jsonl
from erde.train.engine import build_loss, check_world, dropout_seed, exit_accuracy, fit, restore_rng
from erde.train.optim import build_optimizer

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
# 1438 digits in the train pool: 1182 held out leaves 256 training images, 4 steps of 64 a
# epoch; 256 is even, so both ranks' shares together are exactly the one-process batches.
STUDENT = [
    "model.name=resnet8",
    "train.batch_size=64",
    "data.val_size=1182",
    "train.epochs=2",
    "train.device=cpu",
    "distill.method=erde",
    # Dropout (p = 0.5, in the intermediate heads) draws its masks from each rank's own stream,
    # which no one-process run can reproduce. With weight 0 on those exits their dropout touches
    # no gradient; everything else must then match.
    "distill.exit_weights=[0,0,1]",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Two real processes under PyTorch's own launcher, one thread each."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *argv,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference(cfg, world_size: int):
    """What data parallelism must compute, written out in one process.

    Each step takes the global batch of `train.batch_size`, gives rank r the images at positions
    r, r + W, r + 2W, ... (the rank's share of the one seeded permutation), and averages the
    gradients of the ranks' losses. BatchNorm normalises each share by its own statistics, and
    the buffers that survive are rank 0's (DDP broadcasts them before every forward).
    """
    split = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)
    net = build_model(cfg.model, data_info(split.data))
    teacher = Teacher(cfg.distill.teacher, data_info(split.data), CPU, cfg.train.channels_last)
    loss_fn, _ = build_loss(cfg, exit_macs(net), teacher)
    batches = train_batches(cfg, split, CPU)  # one process: whole global batches
    optimizer, scheduler = build_optimizer(cfg.train, net, len(batches))
    val = DeviceBatches(
        split.data.train_x[split.val_idx],
        split.data.train_y[split.val_idx],
        batch_size=cfg.train.eval_batch_size,
        mean=split.data.mean,
        std=split.data.std,
    )
    rows = []
    for epoch in range(cfg.train.epochs):
        net.train()
        batches.set_epoch(epoch)
        total = 0.0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            start = {k: b.clone() for k, b in net.named_buffers()}
            for r in reversed(range(world_size)):  # rank 0 last: its buffers stay
                net.load_state_dict(start, strict=False)
                share = slice(r, None, world_size)
                loss = loss_fn(net(x[share]), y[share], teacher(x[share])).total
                (loss / world_size).backward()
                total += loss.item() / world_size
            optimizer.step()
            scheduler.step()
        rows.append({"loss": total / len(batches), "acc": exit_accuracy(net, val, nullcontext)})
    return net.state_dict(), rows


def test_two_processes_train_like_one_with_the_global_batch(teacher, tmp_path):
    """2 processes x 32 images == 1 process x 64 images doing the same arithmetic.

    Tolerance: measured, the weights are bit-identical (with two ranks the gradient average is
    one addition, which commutes, and a halving, which is exact) and the epoch losses differ by
    3e-8 relative (float32 sums in the engine, float64 here). The test allows 1e-6 on weights
    and losses for float32 rounding on other builds. The plain one-process run with the same
    global batch differs by 4e-2 (BatchNorm there normalises 64 images at once, each rank its
    32: the one real difference between the two, which `train.sync_bn` removes on CUDA).
    """
    args = [*STUDENT, f"distill.teacher={teacher}"]
    ddp = tmp_path / "ddp"
    # Interrupted after epoch 1, then resumed: also checks that every rank picks the state up.
    first = torchrun("-m", "erde", "train", "digits-student", *args, "--out", str(ddp),
                     "--stop-after", "1", "--no-progress")  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun("-m", "erde", "train", "--resume", "--out", str(ddp), "--no-progress")
    assert second.returncode == 0, second.stderr[-3000:]

    # Only rank 0 wrote: one log line per launch and epoch, one metrics row per epoch.
    lines = (ddp / "train.log").read_text().splitlines()
    log = [line for line in lines if line.split(" ", 2)[2].startswith(("start", "epoch"))]
    assert [line.split(" ", 2)[2].split(" ")[0:2] for line in log] == [
        ["start", "erde"],
        ["epoch", "1"],
        ["start", "erde"],
        ["epoch", "2"],
    ]
    assert "cpu x 2 processes" in log[0]
    assert sorted(p.name for p in ddp.iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "model.json",
        "model.safetensors",
        "state.pt",
        "train.log",
    ]
    state = torch.load(ddp / "state.pt", weights_only=True)
    assert state["rng_cpu_ranks"].shape[0] == 2
    assert not torch.equal(state["rng_cpu_ranks"][0], state["rng_cpu_ranks"][1])

    cfg = load_config("digits-student", args)
    want, rows = reference(cfg, world_size=2)
    got = load_file(str(ddp / "model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    metrics = read_jsonl(ddp / "metrics.jsonl")
    val_size = 1182
    for row, ref in zip(metrics, rows, strict=True):
        assert row["train/loss"] == pytest.approx(ref["loss"], rel=1e-6)
        # Accuracies are summed counts over both ranks' halves of the validation set.
        assert [row[f"val/acc/{i}"] for i in range(1, 4)] == pytest.approx(
            ref["acc"], abs=1.1 / val_size
        )

    # The reference is the engine's own arithmetic: with one rank it is exactly `fit`.
    one = tmp_path / "one"
    fit(cfg, one, progress=False)
    single, single_rows = reference(cfg, world_size=1)
    plain = load_file(str(one / "model.safetensors"))
    for key in single:
        assert torch.equal(plain[key], single[key]), key
    assert [r["train/loss"] for r in read_jsonl(one / "metrics.jsonl")] == pytest.approx(
        [r["loss"] for r in single_rows], rel=1e-6
    )
    # ... and the per-rank BatchNorm statistics are a visible effect, far above the tolerance.
    gap = max((plain[k] - got[k]).abs().max().item() for k in want if k.endswith("weight"))
    assert gap > 1e-3


def test_an_error_on_one_rank_stops_every_rank(tmp_path):
    """No rank may wait for ever on a rank that failed: an `ErdeError` met by rank 1 alone is
    raised on both; a non-finite loss stops both ranks at the same step, exit status 2 each,
    keeping the last good epoch. (One launch for both, to keep the test short: the training
    then runs in the group the script made, as it would for a Python user's own job.)"""
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, torch\n"
        "from erde import distributed\n"
        "from erde.cli.main import main\n"
        "from erde.errors import ErdeError\n"
        "import erde.train.engine\n"
        "from erde.distill.losses import LossResult\n"
        "real_epoch, nan = erde.train.engine.train_epoch, float('nan')\n"
        "def blowing_up(p, epoch):  # from epoch 2 the loss is NaN\n"
        "    if epoch == 1:\n"
        "        fn = p.loss_fn\n"
        "        p.loss_fn = lambda *a: LossResult(fn(*a).total * nan, fn(*a).components)\n"
        "    return real_epoch(p, epoch)\n"
        "erde.train.engine.train_epoch = blowing_up\n"
        "with distributed.process_group(torch.device('cpu')) as world:\n"
        "    try:\n"
        "        with distributed.agreed(world):\n"
        "            if world.rank == 1:\n"
        "                raise ErdeError('rank 1 cannot read its file')\n"
        "    except ErdeError as exc:\n"
        "        print(f'rank {world.rank} stopped: {exc}', flush=True)\n"
        "    code = main(sys.argv[1:])\n"
        "sys.exit(code)\n"
    )
    run = tmp_path / "blowup"
    # Epoch 1 trains normally; from epoch 2 the loss is NaN (`blowing_up` above).
    result = torchrun(str(script), "train", "digits-teacher", "model.name=resnet8",
                      "train.device=cpu", "train.epochs=2", "--out", str(run),
                      "--no-progress", timeout=90)  # fmt: skip
    out = result.stdout + result.stderr
    assert "rank 1 stopped: rank 1 cannot read its file" in out
    assert "rank 0 stopped: rank 1 stopped with an error" in out
    assert result.returncode != 0
    assert out.count("NaN or infinite at epoch 2, step") == 2, out[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1]
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "model.safetensors")).values())


def test_settings_a_multi_process_run_cannot_honour():
    cfg = load_config("digits-teacher", ["train.batch_size=64"])
    check_world(cfg, CPU, 2)  # 64 = 2 x 32
    with pytest.raises(ErdeError, match=r"global batch.*multiple of 3"):
        check_world(cfg, CPU, 3)
    sync = load_config("digits-teacher", ["train.sync_bn=true"])
    check_world(sync, CPU, 1)  # one process: BatchNorm already sees the whole batch
    with pytest.raises(ErdeError, match="sync_bn=true needs CUDA"):
        check_world(sync, CPU, 2)


def test_resume_gives_each_rank_its_own_random_stream():
    streams = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        streams.append(torch.get_rng_state())
    state = {"rng_cpu": streams[0], "rng_cpu_ranks": torch.stack(streams)}
    restore_rng(state, CPU, World(rank=1, size=2), seed=0, epoch=3)
    assert torch.equal(torch.get_rng_state(), streams[1])
    # Resumed with another number of processes: a fresh stream per rank from (seed, rank, epoch).
    restore_rng(state, CPU, World(rank=2, size=3), seed=0, epoch=3)
    expected = torch.Generator().manual_seed(dropout_seed(0, 2, 3)).get_state()
    assert torch.equal(torch.get_rng_state(), expected)
    assert len({dropout_seed(0, r, 3) for r in range(3)}) == 3
