"""Several processes, for real: two CPU processes (gloo) started with ``accelerate launch``
or ``torchrun``, against one process.

- generation: ``digits generate``, ``faces generate`` and ``ti generate`` on two processes
  write files byte-identical to one process's, and no staging folder is left behind;
- training: two processes hold bit-identical state after every checkpoint (the digests
  each process computed are in the checkpoint), write one run, and follow one process
  with the global batch and the same shards to a float tolerance; a one-process
  ``--resume`` continues a two-process run, or refuses with one line saying why;
  ``ti train`` leaves every frozen weight bit-identical on both processes.

Run as a script (``python tests/test_multiprocess.py JOB ...``, under a launcher) this file
is the worker of the jobs that need the Python API (tiny in-memory data, a loaded model).
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
TIMEOUT = 300

# Two processes with batch B against one with batch 2B over the same rows: only the order
# of float sums differs (the per-process means and the all-reduce against one mean over
# 2B rows, and batch-size-dependent kernel blocking), about 1e-7 relative per step here.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, cwd: Path, *, launcher: str = "accelerate", script: bool = False) -> subprocess.CompletedProcess:
    """Run ``difflab ARGS`` (or this file as a worker, ``script``) on two CPU processes."""
    port = str(free_port())
    if launcher == "accelerate":  # --multi_gpu selects the torchrun-style launcher; the processes run on the CPU
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += [str(HERE)] if script else ["-m", "difflab"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DIFFLAB_CACHE=str(cwd / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".staging-" in p.name]


# ------------------------------------------------------------------ shards, in process
def test_shards_give_every_process_count_the_same_rows():
    from difflab.training import Shards

    def draw(g, n):
        return torch.randn(n, 3, generator=g), [f"c{v}" for v in torch.randint(100, (n,), generator=g).tolist()]

    for count, world, batch in [(2, 2, 4), (2, 1, 8), (1, 2, 4), (4, 2, 2), (2, 4, 3), (3, 1, 6)]:
        whole = Shards(count, world * batch).draw(7, 5, draw)  # one process with the global batch
        parts = [Shards(count, batch, world, r).draw(7, 5, draw) for r in range(world)]
        x = torch.cat([p[0] for p in parts])
        captions = [c for p in parts for c in p[1]]
        assert x.shape == (world * batch, 3) and len(captions) == world * batch
        assert torch.equal(x, whole[0]) and captions == whole[1]
    # one shard per process: process r draws batch_generator(seed, step, r), as before shards
    from difflab.training import batch_generator

    for r in range(2):
        assert torch.equal(Shards(2, 4, 2, r).draw(7, 5, draw)[0], draw(batch_generator(7, 5, r), 4)[0])
    with pytest.raises(ValueError, match="cannot be cut into 3 equal shards"):
        Shards(3, 4, 2, 0)


def test_resume_on_another_process_count_keeps_the_global_batch_or_refuses():
    from difflab.training import resume_shards

    assert resume_shards("run", None, 2, 4) == 2 and resume_shards("run", None, 1, 8, asked=2) == 2
    saved = {"world_size": 2, "shards": 2}
    assert resume_shards("run", saved, 1, 8, 4) == 2 and resume_shards("run", saved, 4, 2, 4) == 2
    assert resume_shards("run", saved, 2, 6, 4) == 2  # same processes, new batch: a deliberate change, as before
    with pytest.raises(ValueError, match=r"2 process\(es\) x batch 4 = 8 images per step.*pass --batch-size 8"):
        resume_shards("run", saved, 1, 4, 4)
    with pytest.raises(ValueError, match="8 does not split evenly over 3 processes"):
        resume_shards("run", saved, 3, 4, 4)
    with pytest.raises(ValueError, match="cannot switch to 1"):
        resume_shards("run", saved, 2, 4, 4, asked=1)
    assert resume_shards("run", {}, 1, 8, 8) == 1  # a checkpoint from before: one process, one shard


# ---------------------------------------------------------------------- generation
def test_two_processes_write_the_digit_files_of_one(tmp_path):
    from difflab.digits.generate import SampleConfig, generate_course_set
    from difflab.digits.model_io import load_digit_model
    from test_digits import write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    launch(["digits", "generate", "--ckpt", model, "--out", "two", "--steps", 3, "--per-class", 2, "--batch-size", 7,
            "--quiet", "--device", "cpu"], tmp_path, launcher="torchrun")
    net, schedule, _ = load_digit_model(model)
    generate_course_set(net, schedule, tmp_path / "one", SampleConfig(steps=3, batch_size=7), per_class=2, progress=False)
    one, two = digest(tmp_path / "one"), digest(tmp_path / "two")
    assert len(one) == 40 and one == two  # 6 batches: 3 on each process
    assert no_staging_left(tmp_path)


def _faces_args(root: Path) -> list:
    return ["faces", "generate", "--noise", root / "noise", "--unet", root / "UNet.pt", "--steps", 3, "--batch-size", 2,
            "--quiet", "--device", "cpu"]


def _ti_args(root: Path) -> list:
    return ["ti", "generate", "--json", root / "input.json", "--sd", root / "sd", "--embeddings", root / "new1.safetensors",
            root / "new2.safetensors", "--images-per-prompt", 2, "--steps", 2, "--batch-size", 1, "--quiet",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def generated_by_two(tmp_path_factory):
    """``faces generate`` (5 noises, batch 2; with eta 0 and 0.5) and ``ti generate`` (6 prompts
    x 2 images, batch 1) on two processes, in one launch: ``two_faces/``, ``two_faces_eta/``
    and ``two_ti/``; the launch's stderr in ``stderr.txt``."""
    from difflab.nets.face_unet import FaceUNet, FaceUNetConfig
    from difflab.sd.concepts import save_embedding
    from difflab.testing import save_tiny_sd
    from test_ti_generate import PROMPTS

    root = tmp_path_factory.mktemp("mp_generate")
    torch.manual_seed(0)
    torch.save(FaceUNet(FaceUNetConfig.tiny(8)).state_dict(), root / "UNet.pt")
    (root / "noise").mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(5):
        torch.save(torch.randn(1, 3, 32, 32, generator=g), root / "noise" / f"{i:02d}.pt")
    save_tiny_sd(root / "sd", seed=2)
    save_embedding(root / "new1.safetensors", "<new1>", torch.randn(1, 32, generator=g))
    save_embedding(root / "new2.safetensors", "<new2>", torch.randn(2, 32, generator=g))
    (root / "input.json").write_text(json.dumps(PROMPTS))
    r = launch(["generate", root], root, script=True)
    (root / "stderr.txt").write_text(r.stderr)
    return root


def test_two_processes_write_the_face_files_of_one(generated_by_two, tmp_path):
    from difflab.cli import main

    assert main([str(a) for a in _faces_args(generated_by_two) + ["--out", tmp_path / "one"]]) == 0
    one, two = digest(tmp_path / "one"), digest(generated_by_two / "two_faces")
    assert len(one) == 5 and one == two  # 3 batches: 2 on the main process, 1 on the other
    assert no_staging_left(generated_by_two)


def test_faces_with_eta_are_sampled_by_the_main_process_alone(generated_by_two, tmp_path):
    """eta > 0 draws each batch's noise after the previous batch's: the same files, sampled by one process."""
    from difflab.cli import main

    assert main([str(a) for a in _faces_args(generated_by_two) + ["--eta", "0.5", "--out", tmp_path / "one"]]) == 0
    one, two = digest(tmp_path / "one"), digest(generated_by_two / "two_faces_eta")
    assert len(one) == 5 and one == two and one != digest(generated_by_two / "two_faces")
    assert "the main process samples every batch" in (generated_by_two / "stderr.txt").read_text()


def test_two_processes_write_the_ti_files_of_one(generated_by_two, tmp_path):
    from difflab.cli import main

    assert main([str(a) for a in _ti_args(generated_by_two) + ["--out", tmp_path / "one"]]) == 0
    one, two = digest(tmp_path / "one"), digest(generated_by_two / "two_ti")
    assert len(one) == 12 and one == two
    assert no_staging_left(generated_by_two)


# ------------------------------------------------------------------------ digits train
TINY_ARGS = ["--channels", 16, "--channel-mults", 1, 2, "--num-res-blocks", 1, "--attention-levels", 1, "--groups", 8,
             "--patch", 2]
TRAIN_ARGS = ["--steps", 4, "--warmup", 1, "--ckpt-every", 2, "--keep-checkpoints", 0, "--sample-every", 0, "--seed", 3,
              "--device", "cpu", "--quiet", *TINY_ARGS]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``digits train`` on two processes with batch 4: 4 steps, checkpoints at 2 and 4."""
    from test_digits import make_layout

    root = tmp_path_factory.mktemp("mp_train")
    make_layout(root / "data")
    launch(["digits", "train", "--data", "data", "--out", "run", "--batch-size", 4, *TRAIN_ARGS], root)
    return root


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())


def test_two_process_training_writes_one_run_and_every_rank_agrees(two_process_run):
    run = two_process_run / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "train_config.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    for step in (2, 4):
        state = _state(run, step)
        assert state["world_size"] == 2 and state["shards"] == 2 and len(state["losses"]) == step
        digests = state["state_digests"]  # weights, EMA and AdamW state, hashed on each process
        assert len(digests) == 2 and digests[0] == digests[1]
    assert _state(run, 2)["state_digests"] != _state(run, 4)["state_digests"]


def _compare_weights(a: Path, b: Path) -> float:
    from difflab.io import load_tensors

    worst = 0.0
    for name in ("raw.safetensors", "model.safetensors"):
        x, y = load_tensors(a / name), load_tensors(b / name)
        assert x.keys() == y.keys()
        worst = max(worst, max(float((x[k].float() - y[k].float()).abs().max()) for k in x))
    return worst


def test_one_process_with_the_global_batch_follows_two(two_process_run, tmp_path):
    from difflab.data import BalancedDigits
    from difflab.digits.train import TrainConfig, train
    from test_digits import TINY

    data = BalancedDigits.from_root(two_process_run / "data", cache_dir=tmp_path / "cache", progress=False)
    cfg = TrainConfig(steps=4, batch_size=8, warmup=1, ckpt_every=2, keep_checkpoints=0, sample_every=0, seed=3,
                      model=TINY, device="cpu")
    one = train(None, tmp_path / "one", cfg, data=data, progress=False, shards=2)
    two = _state(two_process_run / "run", 4)["losses"]
    assert one == pytest.approx(two, rel=LOSS_RTOL)
    ckpt = Path("checkpoints") / "step_0000004"
    assert _compare_weights(tmp_path / "one" / ckpt, two_process_run / "run" / ckpt) < WEIGHT_ATOL
    assert _state(tmp_path / "one", 4)["world_size"] == 1 and _state(tmp_path / "one", 4)["shards"] == 2
    # without the shards, one process draws other rows: the losses differ far beyond the tolerance
    other = train(None, tmp_path / "other", cfg, data=data, progress=False)
    assert other[0] != pytest.approx(two[0], rel=100 * LOSS_RTOL)


def test_one_process_resumes_a_two_process_run(two_process_run, tmp_path, capsys, monkeypatch):
    from difflab.cli import main

    run = tmp_path / "run"
    shutil.copytree(two_process_run / "run", run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    args = ["digits", "train", "--data", str(two_process_run / "data"), "--out", str(run), "--resume",
            *[str(a) for a in TRAIN_ARGS]]
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    assert main(args + ["--batch-size", "4"]) == 2  # half the global batch: refused, in one line
    err = capsys.readouterr().err
    assert "trained by 2 process(es) x batch 4 = 8 images per step" in err and "pass --batch-size 8" in err
    assert main(args + ["--batch-size", "8"]) == 0
    resumed, two = _state(run, 4), _state(two_process_run / "run", 4)
    assert resumed["world_size"] == 1 and resumed["shards"] == 2
    assert resumed["losses"][:2] == two["losses"][:2]  # the history the two processes wrote
    assert resumed["losses"] == pytest.approx(two["losses"], rel=LOSS_RTOL)
    ckpt = Path("checkpoints") / "step_0000004"
    assert _compare_weights(run / ckpt, two_process_run / "run" / ckpt) < WEIGHT_ATOL


# -------------------------------------------------------------------- t2i and ti train
T2I = dict(steps=2, ckpt_every=2, vae_steps=2)


def _ti_concept(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def trained_by_two(tmp_path_factory):
    """In one launch of two processes: ``t2i train`` (tiny, batch 2, 2 VAE and 2 diffusion
    steps) into ``t2i/``, then ``ti train`` (batch 2, 3 steps) into ``ti/e.safetensors``,
    each process reporting its frozen weights in ``ti/rankR.json``."""
    from difflab.testing import save_tiny_sd

    root = tmp_path_factory.mktemp("mp_t2i_ti")
    save_tiny_sd(root / "sd", seed=1)
    _ti_concept(root / "concept")
    launch(["train", root], root, script=True)
    return root


def test_t2i_train_on_two_processes_follows_one(trained_by_two, tmp_path):
    from difflab.t2i.train import train_t2i
    from test_t2i import tiny_cfg, tiny_data

    state = _state(trained_by_two / "t2i", 2)
    assert state["world_size"] == 2 and state["shards"] == 2
    assert len(state["state_digests"]) == 2 and len(set(state["state_digests"])) == 1
    one = train_t2i(None, tmp_path / "one", tiny_cfg(batch_size=4, vae_batch_size=4, **T2I), data=tiny_data(),
                    progress=False, shards=2)
    assert one == pytest.approx(state["losses"], rel=LOSS_RTOL)


def test_ti_train_on_two_processes_keeps_frozen_weights_and_follows_one(trained_by_two, tmp_path):
    from safetensors import safe_open

    from difflab.personalize import textual_inversion as ti
    from difflab.sd.concepts import read_embedding_file
    from difflab.sd.load import load_sd
    from test_textual_inversion import cfg_for

    root = trained_by_two
    ranks = [json.loads((root / "ti" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["frozen_unchanged"] for r in ranks)  # each process against its own copy before training
    assert ranks[0]["frozen_sha256"] == ranks[1]["frozen_sha256"] == _frozen_sha256(load_sd(root / "sd"))
    with safe_open(str(ti.state_path(root / "ti" / "e.safetensors")), framework="pt") as f:
        meta = f.metadata()
    assert meta["world_size"] == "2" and len(set(json.loads(meta["state_digests"]))) == 1
    ti.train_textual_inversion(cfg_for(root / "sd", root / "concept", tmp_path / "e.safetensors", batch_size=4),
                               sd=load_sd(root / "sd"), shards=2)
    one = read_embedding_file(tmp_path / "e.safetensors")["<new1>"]
    two = read_embedding_file(root / "ti" / "e.safetensors")["<new1>"]
    assert torch.allclose(one, two, rtol=0, atol=WEIGHT_ATOL)


def _frozen(sd) -> dict:
    """Every UNet, VAE and text-encoder entry of the model as loaded, under its original name."""
    return {f"{name}.{k}".replace("token_embedding.base.", "token_embedding."): v
            for name, net in (("unet", sd.unet), ("vae", sd.vae), ("text", sd.text_encoder))
            for k, v in net.state_dict().items() if ".concept_" not in k}


def _frozen_sha256(sd) -> str:
    h = hashlib.sha256()
    for k, v in sorted(_frozen(sd).items()):
        h.update(k.encode() + v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ worker
def _worker(job: str, root: str) -> int:
    """One process's part of a job (see the fixtures that launch it)."""
    root, rank = Path(root), int(os.environ.get("RANK", "0"))
    if job == "generate":
        from difflab.cli import main

        return (main([str(a) for a in _faces_args(root) + ["--out", root / "two_faces"]])
                or main([str(a) for a in _faces_args(root) + ["--eta", "0.5", "--out", root / "two_faces_eta"]])
                or main([str(a) for a in _ti_args(root) + ["--out", root / "two_ti"]]))
    if job != "train":
        raise SystemExit(f"unknown job {job!r}")
    from difflab.personalize import textual_inversion as ti
    from difflab.sd.load import load_sd
    from difflab.t2i.train import train_t2i
    from test_t2i import tiny_cfg, tiny_data
    from test_textual_inversion import cfg_for

    train_t2i(None, root / "t2i", tiny_cfg(batch_size=2, vae_batch_size=2, **T2I), data=tiny_data(), progress=False)
    sd = load_sd(root / "sd")
    before = {k: v.clone() for k, v in _frozen(sd).items()}
    ti.train_textual_inversion(cfg_for(root / "sd", root / "concept", root / "ti" / "e.safetensors", batch_size=2), sd=sd)
    after = _frozen(sd)
    report = {"frozen_unchanged": after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items()),
              "frozen_sha256": _frozen_sha256(sd)}
    (root / "ti" / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:]))
