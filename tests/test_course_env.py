"""The three course scripts in the course's grading environment (opt-in: ``pytest -m slow``).

The environment (Python 3.10, torch 1.11.0, transformers 4.19.2, numpy 1.24.4, Pillow
10.4.0, ... : ``tools/course_env.sh``) is built once and cached in ``$DIFFLAB_COURSE_ENV``
(default ``~/.cache/difflab/course-env``). Each script then runs from this checkout with
that environment's ``python3`` first on PATH, no ``difflab`` installed, and the
``safetensors`` package hidden (the course rules do not list it). Every run records the
third-party packages it imported; each output is compared with the full install's
(this interpreter) on the same inputs:

- hw2_1.sh: the shipped digit model's 1,000 images, byte for byte;
- hw2_2.sh: a small random face UNet (the course layout at 32x32), within MSE 0.05;
- hw2_3.sh: a tiny random CompVis-format ``model.ckpt`` with learned embeddings: the course
  layout, and the own SD v1 networks (torch 1.11) against diffusers' (torch 2.13).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What the course rules allow (Rules - Packages) and the packages those pull in.
COURSE_PACKAGES = {
    "numpy", "torch", "torchvision", "transformers", "timm", "pandas", "matplotlib", "PIL", "imageio", "scipy",
    "skimage", "tqdm", "gdown", "yaml",
    # dependencies of the listed ones
    "tokenizers", "huggingface_hub", "filelock", "regex", "requests", "packaging", "typing_extensions",
    "urllib3", "charset_normalizer", "idna", "certifi", "fsspec", "tqdm", "dateutil", "six", "hf_xet",
    # in every process there: Cython's runtime record, matplotlib's namespace package (a .pth file)
    "cython_runtime", "mpl_toolkits",
    "socks",  # PySocks, which gdown brings; requests imports it when present
}

RECORDER = '''import atexit, os, sys
def _dump():
    names = {m.split(".")[0] for m in list(sys.modules)}
    names -= set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    names = sorted(n for n in names if not n.startswith("_") and n != "sitecustomize")
    with open(os.environ["DIFFLAB_IMPORTS_LOG"], "w") as f:
        f.write("\\n".join(names) + "\\n")
atexit.register(_dump)
'''


@pytest.fixture(scope="module")
def course_env(tmp_path_factory) -> Path:
    env = Path(os.environ.get("DIFFLAB_COURSE_ENV") or Path.home() / ".cache" / "difflab" / "course-env")
    r = subprocess.run(["bash", str(REPO / "tools" / "course_env.sh"), str(env)], capture_output=True, text=True)
    if r.returncode != 0:
        if "no Python 3.10" in r.stderr:
            pytest.skip("no Python 3.10 on this machine to build the course environment: " + r.stderr.strip())
        raise AssertionError(f"tools/course_env.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return env


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    """A PYTHONPATH folder: the import recorder, and a safetensors that cannot be imported."""
    d = tmp_path_factory.mktemp("shim")
    (d / "sitecustomize.py").write_text(RECORDER)
    (d / "safetensors").mkdir()
    (d / "safetensors" / "__init__.py").write_text("raise ImportError('safetensors is not in the course environment')\n")
    return d


def course_environ(env: Path, shim: Path, log, extra: dict | None = None) -> dict:
    """Only the course environment's bin/ and the system's on PATH (no difflab command),
    the shim first on PYTHONPATH, the import log at ``log``."""
    return {"PATH": f"{env}/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(shim),
            "DIFFLAB_IMPORTS_LOG": str(log), "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_course(env: Path, shim: Path, log: Path, script: str, *args: str, extra: dict | None = None) -> list[str]:
    """Run a course script in the course environment; return the third-party packages it imported."""
    r = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True,
                       env=course_environ(env, shim, log, extra))
    assert r.returncode == 0, f"{script} in the course environment failed:\n{r.stderr[-4000:]}"
    if script == "hw2_download_ckpt.sh":
        assert r.stdout.startswith("shipped digit model OK: "), r.stdout
    imported = log.read_text().split()
    assert "difflab" in imported
    return [m for m in imported if m != "difflab"]


def run_full(*args: str, extra: dict | None = None) -> None:
    environ = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(extra or {})}
    r = subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True, env=environ)
    assert r.returncode == 0, r.stderr[-4000:]


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
            for p in sorted(folder.rglob("*.png"))}


def check_imports(imported: list[str], script: str) -> None:
    foreign = sorted(set(imported) - COURSE_PACKAGES)
    assert not foreign, f"{script} imported packages outside the course environment: {foreign}"
    print(f"{script} imported: {' '.join(imported)}")


def evaluate(folder: Path) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "difflab", "digits", "evaluate", str(folder)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if "acc" in line]


def test_hw2_1_matches_the_full_install(course_env, shim, tmp_path):
    """torch 1.11 rounds a few values otherwise (no fused attention there; other kernels):
    measured 1,050 of the 2,352,000 pixel values, in 605 images, one level apart, and the
    same accuracy. The bar: no value more than one level apart, at most 0.1% of them
    differ, and the course grader's accuracy is the same (when ../shared has it)."""
    out = tmp_path / "course"
    imported = run_course(course_env, shim, tmp_path / "imports", "hw2_1.sh", str(out))
    check_imports(imported, "hw2_1.sh")
    assert "safetensors" not in imported and "accelerate" not in imported
    ref = tmp_path / "full"
    run_full("digits", "generate", "--out", str(ref), "--quiet")
    a, b = pngs(out), pngs(ref)
    assert len(a) == 1000 and sorted(a) == sorted(b)
    diff = np.stack([np.abs(a[k] - b[k]) for k in sorted(a)])
    print(f"hw2_1.sh: {int((diff > 0).sum())} of {diff.size} pixel values differ, in "
          f"{int((diff.reshape(len(a), -1) > 0).any(1).sum())} images; largest difference {int(diff.max())}")
    assert diff.max() <= 1, f"a pixel {diff.max()} levels from the full install's"
    assert (diff > 0).mean() < 1e-3, f"{int((diff > 0).sum())} of {diff.size} pixel values differ"
    evaluators = REPO.parent / "shared" / "evaluators"
    if (evaluators / "mnistm_classifier.pth").is_file():
        assert evaluate(out) == evaluate(ref)


def test_hw2_2_matches_the_full_install(course_env, shim, tmp_path):
    from difflab.nets.face_unet import FaceUNet, FaceUNetConfig

    torch.manual_seed(0)
    model = FaceUNet(FaceUNetConfig.tiny(8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # A random UNet's reverse process is chaotic: one forward that moves by 1e-6
        # (another attention kernel) gives a different image (measured MSE 1,500 to
        # 6,500). Scaled output weights keep it stable (the course's trained UNet is);
        # the network itself is compared forward by forward below.
        model.out[2].weight.mul_(0.01)
        model.out[2].bias.mul_(0.01)
    torch.save(model.state_dict(), tmp_path / "UNet.pt")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    forward = ("import torch; from difflab.faces.model_io import load_face_unet; "
               f"m = load_face_unet({str(tmp_path / 'UNet.pt')!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
               f"torch.save(m(x, torch.tensor([999, 20])).detach(), {str(tmp_path / 'y.pt')!r})")
    r = subprocess.run([str(course_env / "bin" / "python3"), "-c", forward], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'src'}:{shim}", "DIFFLAB_IMPORTS_LOG": os.devnull})
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x, torch.tensor([999, 20])), rtol=0, atol=1e-5)
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(3):
        torch.save(torch.randn(1, 3, 32, 32), noise / f"{i:02d}.pt")
    out = tmp_path / "course"
    imported = run_course(course_env, shim, tmp_path / "imports", "hw2_2.sh", str(noise), str(out), str(tmp_path / "UNet.pt"))
    check_imports(imported, "hw2_2.sh")
    ref = tmp_path / "full"
    run_full("faces", "generate", "--noise", str(noise), "--out", str(ref), "--unet", str(tmp_path / "UNet.pt"), "--quiet")
    a, b = pngs(out), pngs(ref)
    assert sorted(a) == sorted(b) == ["00.png", "01.png", "02.png"]
    print("hw2_2.sh: MSE " + ", ".join(f"{float(((a[k] - b[k]) ** 2).mean()):.3g}" for k in a))
    for k in a:
        mse = float(((a[k] - b[k]) ** 2).mean())
        assert mse < 0.05, f"{k}: MSE {mse} between the course environment and the full install"


def test_hw2_3_reads_a_compvis_checkpoint(course_env, shim, tmp_path):
    from difflab.io import save_tensors
    from difflab.testing import save_tiny_compvis

    ckpt = save_tiny_compvis(tmp_path / "sd")
    emb = tmp_path / "embeddings"
    emb.mkdir()
    torch.manual_seed(1)
    save_tensors({"<new1>": torch.randn(1, 32) * 0.3}, emb / "new1.safetensors")
    save_tensors({"<new2>": torch.randn(1, 32) * 0.3}, emb / "new2.safetensors")
    spec = {"0": {"token_name": "<new1>", "prompt": ["a photo of <new1>.", "a <new1> on a park bench."]},
            "1": {"token_name": "<new2>", "prompt": ["a house in the style of <new2>."]}}
    (tmp_path / "input.json").write_text(json.dumps(spec))
    extra = {"DIFFLAB_EMBEDDINGS": str(emb), "DIFFLAB_SD_CONFIG": str(tmp_path / "sd" / "configs")}
    out = tmp_path / "course"
    imported = run_course(course_env, shim, tmp_path / "imports", "hw2_3.sh", str(tmp_path / "input.json"), str(out),
                          str(ckpt), extra=extra)
    check_imports(imported, "hw2_3.sh")
    assert "diffusers" not in imported
    a = pngs(out)
    expected = [f"{key}/{p}/source{key}_prompt{p}_{i}.png" for key, n in (("0", 2), ("1", 1)) for p in range(n) for i in range(25)]
    assert sorted(a) == sorted(expected)
    ref = tmp_path / "full"
    run_full("ti", "generate", "--json", str(tmp_path / "input.json"), "--out", str(ref), "--sd", str(ckpt), "--quiet",
             extra={**extra, "DIFFLAB_SD_NETWORKS": "diffusers"})
    b = pngs(ref)
    worst = max(float(((a[k] - b[k]) ** 2).mean()) for k in a)
    print(f"hw2_3.sh: worst image MSE {worst:.3g} (own networks, torch 1.11, vs diffusers, torch 2.13)")
    assert worst < 0.05, f"own SD v1 networks on torch 1.11 vs diffusers on torch 2.13: worst image MSE {worst}"


def test_hw2_3_without_a_checkpoint_says_it_needs_the_full_install(course_env, shim, tmp_path):
    """The shipped mini model is a diffusers folder: in the course environment the script
    stops with one line saying why, and writes nothing."""
    (tmp_path / "input.json").write_text(json.dumps({"0": {"token_name": "<new1>", "prompt": ["a photo of <new1>."]}}))
    r = subprocess.run(["bash", str(REPO / "hw2_3.sh"), str(tmp_path / "input.json"), str(tmp_path / "out")],
                       capture_output=True, text=True, env=course_environ(course_env, shim, os.devnull))
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith("difflab: error: ") and "diffusers is not installed" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_hw2_download_ckpt_checks_the_shipped_model_there(course_env, shim, tmp_path):
    imported = run_course(course_env, shim, tmp_path / "imports", "hw2_download_ckpt.sh")
    check_imports(imported, "hw2_download_ckpt.sh")
