"""difflab.io on the course's stack (torch 1.11, maybe no safetensors package): the
safetensors reader and writer written on numpy/torch, the restricted unpickler used where
torch.load has no ``weights_only``, the meta-device fallback of ``check_fits``; checked
here against the safetensors package and torch's own loader, and once in the course
environment itself when one is present (``DIFFLAB_COURSE_ENV``)."""
import collections
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difflab.io as dio
from difflab import pickles, safetensors_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_safetensors(monkeypatch):
    """``import safetensors`` fails, as in an environment without the package."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert dio._safetensors_api() is None


@pytest.fixture
def restricted(monkeypatch):
    """Every torch.load of difflab.io goes through the restricted unpickler, as on torch 1.11."""
    monkeypatch.setattr(pickles, "USE_RESTRICTED_UNPICKLER", True)


def every_dtype() -> dict:
    """One tensor per supported dtype, plus a 0-d, an empty and a non-ASCII-named one."""
    base = torch.arange(-12, 12, dtype=torch.float64).reshape(2, 3, 4) / 4
    out = {f"t_{d}": base.to(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                         torch.int64, torch.int32, torch.int16, torch.int8)}
    out.update({"u8": torch.arange(250, dtype=torch.uint8).reshape(10, 25), "flags": base > 0,
                "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 7, dtype=torch.float16),
                "bias 0-d bf16": torch.tensor(-2.25, dtype=torch.bfloat16), "größe\n\"q\"": torch.ones(3, dtype=torch.int32)})
    return out


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k


# ------------------------------------------------------------------- safetensors format
def test_fallback_reads_what_the_package_writes(tmp_path, no_safetensors):
    want = every_dtype()
    save_file(want, str(tmp_path / "w.safetensors"), metadata={"format": "pt", "note": "ü"})
    got = dio.load_tensors(tmp_path / "w.safetensors")
    assert_same(got, want)
    assert list(got) == list(load_file(str(tmp_path / "w.safetensors")))  # the package's order: the file's
    for t in got.values():  # contiguous, writable, and owning their memory: the file is untouched
        assert t.is_contiguous() and t.device.type == "cpu"
        t.zero_()
        assert t.count_nonzero() == 0
    assert_same(dio.load_tensors(tmp_path / "w.safetensors"), want)
    tensors, meta = safetensors_file.read_safetensors(tmp_path / "w.safetensors")
    assert meta == {"format": "pt", "note": "ü"}
    assert_same(tensors, want)


def test_package_reads_what_the_fallback_writes(tmp_path, no_safetensors):
    want = every_dtype()
    dio.save_tensors(want, tmp_path / "w.safetensors", metadata={"b": "2", "a": "1"})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert_same(load_file(str(tmp_path / "w.safetensors")), want)  # imported before the package was hidden
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}], ids=["no-metadata", "one-key"])
@pytest.mark.parametrize("which", ["every-dtype", "nothing", "one-empty"])
def test_fallback_writes_the_package_bytes(tmp_path, no_safetensors, metadata, which):
    tensors = {"every-dtype": every_dtype(), "nothing": {}, "one-empty": {"e": torch.zeros(0)}}[which]
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    dio.save_tensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_fallback_metadata_order_is_the_only_difference(tmp_path, no_safetensors):
    """The package writes two or more metadata keys in hash order (random per process);
    ours writes them sorted. Headers parse equal and the data bytes are identical."""
    tensors, metadata = every_dtype(), {"z": "1", "a": "2", "m": "3"}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    dio.save_tensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    ref, ours = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "ours.safetensors").read_bytes()
    (n_ref,), (n_ours,) = struct.unpack("<Q", ref[:8]), struct.unpack("<Q", ours[:8])
    assert n_ref == n_ours and ref[8 + n_ref:] == ours[8 + n_ours:]
    h_ref, h_ours = json.loads(ref[8:8 + n_ref]), json.loads(ours[8:8 + n_ours])
    assert h_ref == h_ours and list(h_ours["__metadata__"]) == ["a", "m", "z"]


def test_fallback_writer_refuses_what_the_format_cannot_hold(tmp_path, no_safetensors):
    target = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=r"^cannot write safetensors file .*w\.safetensors: entry 'c' is a "
                                         r"torch\.complex64; supported: torch\.float64, "):
        dio.save_tensors({"a": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)}, target)
    with pytest.raises(ValueError, match=r"tensor name '__metadata__' is not allowed"):
        dio.save_tensors({"__metadata__": torch.zeros(2)}, target)
    with pytest.raises(ValueError, match=r"metadata must map strings to strings"):
        dio.save_tensors({"a": torch.zeros(2)}, target, metadata={"a": 1})
    assert not target.exists() and not list(tmp_path.iterdir())
    # a failure while writing leaves the earlier file as it was, and no temporary file
    dio.save_tensors({"a": torch.ones(2)}, target)
    before = target.read_bytes()

    def disk_full(*args):
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(dio, "write_safetensors", disk_full)
        with pytest.raises(OSError, match="disk full"):
            dio.save_tensors({"b": torch.zeros(3)}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_fallback_device_and_missing_file(tmp_path, no_safetensors):
    with pytest.raises(FileNotFoundError, match=r"missing weights file: .*nope\.safetensors"):
        dio.load_tensors(tmp_path / "nope.safetensors")
    dio.save_tensors({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    assert dio.load_tensors(tmp_path / "w.safetensors", torch.device("meta"))["a"].device.type == "meta"
    with pytest.raises(ValueError, match=r"^cannot read safetensors file .*w\.safetensors: .*nowhere"):
        dio.load_tensors(tmp_path / "w.safetensors", "nowhere")


def st_bytes(header, data: bytes = b"", length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


_GOOD = st_bytes({"a": entry([2], [0, 8]), "b": entry([1], [8, 10], "F16")}, b"\0" * 10)
# name -> (file bytes, the fallback's reason, whether the package refuses it too: it reads
# more dtypes, and takes any nonzero BOOL byte for True)
MALFORMED = {
    "truncated-length": (b"\x10\x00\x00", r"the file is 3 bytes, too short for the 8-byte header length", True),
    "truncated-header": (_GOOD[:30], r"the header length \d+ is larger than the 22 bytes after it", True),
    "length-beyond-file": (st_bytes({}, length=1 << 40), r"the header length 1099511627776 is larger than the 8 bytes", True),
    "bad-json": (st_bytes(b'{"a": {"dtype": '), r"the header is not valid JSON \(", True),
    "not-utf8": (st_bytes(b'{"\xff": 1}'), r"the header is not UTF-8 text", True),
    "not-an-object": (st_bytes(b"[1, 2]"), r"the header is a JSON list, not an object", True),
    "duplicate-name": (st_bytes(b'{"a": 1, "a": 2}'), r"the header names 'a' twice", True),
    "unknown-dtype": (st_bytes({"a": entry([1], [0, 1], "Q7")}, b"\0"), r"entry 'a' has dtype 'Q7'; known: F64", True),
    "unsupported-dtype": (st_bytes({"a": entry([1], [0, 1], "F8_E4M3")}, b"\0"), r"entry 'a' has dtype 'F8_E4M3'", False),
    "entry-not-object": (st_bytes({"a": [1, 2]}), r"entry 'a' is not an object with dtype, shape and data_offsets", True),
    "negative-shape": (st_bytes({"a": entry([-1], [0, 4])}, b"\0" * 4), r"entry 'a' has shape \[-1\]", True),
    "float-offsets": (st_bytes({"a": entry([1], [0, 4.0])}, b"\0" * 4), r"entry 'a' has data_offsets \[0, 4\.0\]", True),
    "one-offset": (st_bytes({"a": entry([1], [4])}, b"\0" * 4), r"entry 'a' has data_offsets \[4\]; expected \[begin, end\]", True),
    "size-mismatch": (st_bytes({"a": entry([2], [0, 4])}, b"\0" * 4), r"entry 'a' spans bytes 0\.\.4, but shape \[2\] of F32 needs 8", True),
    "huge-shape": (st_bytes({"a": entry([1 << 40, 1 << 40], [0, 4])}, b"\0" * 4), r"needs 4835703278458516698824704 bytes", True),
    "offsets-out-of-range": (st_bytes({"a": entry([1], [8, 12])}, b"\0" * 4), r"entry 'a' spans bytes 8\.\.12, beyond the 4-byte data buffer", True),
    "truncated-data": (_GOOD[:-2], r"entry 'b' spans bytes 8\.\.10, beyond the 8-byte data buffer", True),
    "overlap": (st_bytes({"a": entry([1], [0, 4]), "b": entry([1], [0, 4])}, b"\0" * 4), r"entry 'b' starts at byte 0 and overlaps the entry before it", True),
    "gap": (st_bytes({"a": entry([1], [4, 8])}, b"\0" * 8), r"entry 'a' starts at byte 4 and leaves bytes 0\.\.4 unused", True),
    "trailing-bytes": (st_bytes({"a": entry([1], [0, 4])}, b"\0" * 8), r"4 bytes of the data buffer belong to no entry", True),
    "bad-metadata": (st_bytes({"__metadata__": {"a": 1}}), r"__metadata__ must be an object whose values are strings", True),
    "bool-not-0-or-1": (st_bytes({"a": entry([1], [0, 1], "BOOL")}, b"\x02"), r"entry 'a' is BOOL but holds bytes other than 0 and 1", False),
}


@pytest.mark.parametrize("case, backend", [(case, backend) for case, (_, _, package_refuses) in MALFORMED.items()
                                           for backend in ("fallback", "package") if backend == "fallback" or package_refuses])
def test_malformed_safetensors_are_one_line_errors_naming_the_file(tmp_path, monkeypatch, case, backend):
    data, reason, _ = MALFORMED[case]
    if backend == "fallback":
        monkeypatch.setitem(sys.modules, "safetensors", None)
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        dio.load_tensors(path)
    text = str(info.value)
    assert text.startswith(f"cannot read safetensors file {path}: ") and "\n" not in text
    if backend == "fallback":
        assert re.search(reason, text), text


def test_fallback_reads_a_good_file_built_by_hand(tmp_path, no_safetensors):
    (tmp_path / "ok.safetensors").write_bytes(_GOOD)
    got = dio.load_tensors(tmp_path / "ok.safetensors")
    assert_same(got, {"a": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float16)})


# ------------------------------------------------------------------- restricted unpickler
def state_dict() -> "collections.OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    sd["conv.half"] = torch.randn(5, generator=g).half()
    sd["norm.bf16"] = torch.randn(6, generator=g).bfloat16()
    sd["steps"] = torch.arange(7)
    sd["view"] = torch.arange(20.0)[5:15:2]  # a strided view of a larger storage
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["mask"] = torch.tensor([True, False])
    return sd


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_restricted_unpickler_loads_state_dicts(tmp_path, restricted, fmt):
    sd = state_dict()
    tagged = torch.nn.Parameter(torch.ones(3))
    tagged.tag = "ema"  # pickled through _rebuild_parameter_with_state
    obj = {"state_dict": sd, "step": 3, "names": ("a", "b"), "ids": {1, 2}, "blob": b"\x00\xff", "dtype": torch.float16,
           "size": torch.Size([2, 3]), "device": torch.device("cpu"), "param": torch.nn.Parameter(torch.ones(2)),
           "tagged": tagged}
    path = tmp_path / f"{fmt}.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    got = pickles.restricted_torch_load(path)
    reference = torch.load(path, weights_only=True)
    assert type(got["state_dict"]) is collections.OrderedDict and list(got["state_dict"]) == list(sd)
    assert_same(got["state_dict"], sd)
    plain = ("step", "names", "ids", "blob", "dtype", "size", "device")
    assert {k: got[k] for k in plain} == {k: reference[k] for k in plain} == {k: obj[k] for k in plain}
    assert isinstance(got["param"], torch.nn.Parameter) and torch.equal(got["param"], obj["param"])
    assert isinstance(got["tagged"], torch.nn.Parameter) and got["tagged"].tag == "ema"
    assert_same(dio.load_torch_state(path), sd)
    torch.save(sd["conv.weight"], tmp_path / "one.pt", _use_new_zipfile_serialization=fmt == "zip")
    assert torch.equal(dio.load_tensor_file(tmp_path / "one.pt"), sd["conv.weight"])


class Exploit:
    """Unpickling it runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecExploit(Exploit):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class EvalExploit(Exploit):
    def __reduce__(self):
        return (eval, (f"__import__('os').system('touch {self.marker}')",))


class StorageBomb:
    """A call of a storage class asking for 40 GB."""

    def __reduce__(self):
        return (torch.FloatStorage, (10**10,))


class TrainerCallback:  # a pickled trainer object, as real SD .ckpt files carry
    def __init__(self):
        self.monitor = "val/loss"


def hostile_files(folder: Path, marker: Path) -> dict:
    """name -> (path, the refused global): torch.save (zip and legacy) and a bare pickle."""
    files = {}
    for name, payload in (("system", Exploit(marker)), ("exec", ExecExploit(marker)), ("eval", EvalExploit(marker))):
        glob = {"system": r"posix\.system", "exec": r"builtins\.exec", "eval": r"builtins\.eval"}[name]
        for fmt in ("zip", "legacy"):
            path = folder / f"{name}-{fmt}.pt"
            torch.save({"w": torch.ones(2), "evil": payload}, path, _use_new_zipfile_serialization=fmt == "zip")
            files[f"{name}-{fmt}"] = (path, glob)
    (folder / "bare-pickle.pt").write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    files["bare-pickle"] = (folder / "bare-pickle.pt", r"posix\.system")
    (folder / "storage-bomb.pt").write_bytes(pickle.dumps(StorageBomb(), protocol=2))  # read as the legacy magic number
    files["storage-bomb"] = (folder / "storage-bomb.pt", r"torch\.FloatStorage")
    return files


@pytest.mark.parametrize("name", ["system-zip", "system-legacy", "exec-zip", "exec-legacy", "eval-zip",
                                  "eval-legacy", "bare-pickle", "storage-bomb"])
def test_restricted_unpickler_refuses_hostile_pickles_without_running_them(tmp_path, restricted, name):
    marker = tmp_path / "PWNED"
    path, glob = hostile_files(tmp_path, marker)[name]
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to load the global {glob}"):
        pickles.restricted_torch_load(path)
    with pytest.raises(ValueError, match=rf"^cannot read .*{name}\.pt as a PyTorch state dict: UnpicklingError: "
                                         rf"refusing to load the global {glob}"):
        dio.load_torch_state(path)
    with pytest.raises(ValueError, match=rf"expected a tensor saved with torch\.save \(tensor file\), cannot read it: "
                                         rf"UnpicklingError: refusing to load the global {glob}"):
        dio.load_tensor_file(path)
    # with inert_fallback the payload becomes an inert object and the tensors load
    bare = name in ("bare-pickle", "storage-bomb")
    state = None if bare else dio.load_torch_state(path, inert_fallback=True, drop_non_tensors=True)
    assert state is None or (list(state) == ["w"] and torch.equal(state["w"], torch.ones(2)))
    assert not marker.exists()


def test_restricted_inert_fallback_loads_an_sd_style_checkpoint(tmp_path, restricted):
    marker = tmp_path / "PWNED"
    sd = state_dict()
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {"ckpt": TrainerCallback()},
                "evil": Exploit(marker)}, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match=r"UnpicklingError: refusing to load the global .*TrainerCallback"):
        dio.load_torch_state(tmp_path / "model.ckpt")
    state = dio.load_torch_state(tmp_path / "model.ckpt", inert_fallback=True, drop_non_tensors=True)
    assert_same(state, sd)
    obj = pickles.restricted_torch_load(tmp_path / "model.ckpt", inert=True)
    assert isinstance(obj["callbacks"]["ckpt"], pickles._Inert) and not hasattr(obj["callbacks"]["ckpt"], "monitor")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_restricted_unpickler_refuses_a_torchscript_archive(tmp_path, restricted):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match=r"scripted\.pt as a PyTorch state dict: UnpicklingError: a TorchScript archive"):
        dio.load_torch_state(tmp_path / "scripted.pt")


class FakeStorage:
    """Pickled as a persistent storage id claiming ``numel`` float32 values."""

    def __init__(self, numel):
        self.numel = numel


class FakeTensor:
    def __init__(self, storage, size, stride):
        self.args = (storage, 0, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class ClaimPickler(pickle.Pickler):
    """Writes FakeStorage as torch.save does: a persistent id; the legacy format adds a view slot."""

    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) + ((None,) if self.legacy else ())
        return None


def claim_file(path: Path, fmt: str, numel: int, stored: int, size, stride) -> Path:
    """A torch file whose tensor claims ``size``/``stride`` on a storage of ``numel``
    values, of which ``stored`` are in the file (written as torch.save lays them out)."""
    import io as _io

    buf = _io.BytesIO()
    pickler = ClaimPickler(buf, legacy=fmt == "legacy")
    if fmt == "zip":
        pickler.dump({"w": FakeTensor(FakeStorage(numel), size, stride)})
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/data/0", b"\0" * 4 * stored)
            z.writestr("archive/version", "3\n")
        return path
    for head in (torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
                 {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, buf, protocol=2)
    pickler.dump({"w": FakeTensor(FakeStorage(numel), size, stride)})
    pickle.dump(["0"], buf, protocol=2)
    path.write_bytes(buf.getvalue() + struct.pack("<q", numel) + b"\0" * 4 * stored)
    return path


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_restricted_unpickler_bounds_what_a_file_claims(tmp_path, restricted, fmt):
    ok = claim_file(tmp_path / "ok.pt", fmt, 6, 6, (2, 3), (3, 1))
    assert torch.equal(dio.load_torch_state(ok)["w"], torch.zeros(2, 3))
    # a storage claiming 40 GB the file does not hold: refused before torch allocates it
    big = claim_file(tmp_path / "big.pt", fmt, 10**10, 1, (1,), (1,))
    want = (r"storage '0' claims 40000000000 bytes, the file's record holds 4" if fmt == "zip"
            else r"the storages claim 40000000000 bytes, more than the \d+-byte file")
    with pytest.raises(ValueError, match=rf"big\.pt as a PyTorch state dict: UnpicklingError: {want}"):
        dio.load_torch_state(big)
    # a tensor reaching past its storage: torch would grow the storage to 40 GB to fit it
    far = claim_file(tmp_path / "far.pt", fmt, 1, 1, (100000, 100000), (100000, 1))
    with pytest.raises(ValueError, match=r"far\.pt as a PyTorch state dict: UnpicklingError: a tensor of shape "
                                         r"\[100000, 100000\] reaches element 10000000000 of a storage holding 1"):
        dio.load_torch_state(far)
    bad = claim_file(tmp_path / "neg.pt", fmt, 4, 4, (2, -1), (1, 1))
    with pytest.raises(ValueError, match=r"a tensor has a malformed shape \(2, -1\)"):
        dio.load_torch_state(bad)


def test_restricted_path_is_the_default_only_without_weights_only():
    assert pickles.TORCH_HAS_WEIGHTS_ONLY == ("weights_only" in __import__("inspect").signature(torch.load).parameters)
    assert pickles.USE_RESTRICTED_UNPICKLER is (not pickles.TORCH_HAS_WEIGHTS_ONLY)


# ------------------------------------------------------------------ check_fits on torch 1.x
def test_check_fits_meta_fallback_allocates_nothing(monkeypatch):
    monkeypatch.setattr(dio, "_DEVICE_IS_CONTEXT", False)
    real_empty = torch.empty
    seen = []

    def build():
        seen.append(torch.empty(0).device.type)
        return torch.nn.Sequential(torch.nn.Linear(100000, 100000), torch.nn.GroupNorm(4, 100000))

    with pytest.raises(ValueError, match=r"^src does not fit Sequential: missing keys \(4\).* \(the network its config "
                                         r"describes has 10000300000 values, the file 2\)$"):
        dio.check_fits(build, {"x": torch.zeros(2)}, "src")
    assert seen == ["meta"] and torch.empty is real_empty
    with pytest.raises(RuntimeError, match="boom"):
        with dio.meta_device():
            raise RuntimeError("boom")
    assert torch.empty is real_empty and torch.zeros(1).device.type == "cpu"
    dio.check_fits(lambda: torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).state_dict(), "src")


# --------------------------------------------------------------------- the course env
def course_python():
    env = os.environ.get("DIFFLAB_COURSE_ENV")
    root = Path(env) if env else Path.home() / ".cache" / "difflab" / "course-env"
    python = root / "bin" / "python3"
    return python if python.is_file() else None


EXPECTED = textwrap.dedent("""
    import collections, torch
    def expected():
        base = torch.arange(-12, 12, dtype=torch.float64).reshape(2, 3, 4) / 4
        out = collections.OrderedDict((f"t_{str(d)[6:]}", base.to(d)) for d in (
            torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8))
        out["u8"] = torch.arange(250, dtype=torch.uint8).reshape(10, 25)
        out["flags"] = base > 0
        out["scalar"] = torch.tensor(3.5)
        out["empty"] = torch.zeros(0, 7, dtype=torch.float16)
        out["view"] = torch.arange(20.0)[5:15:2]
        return out
    def same(a, b):
        assert list(a) == list(b) or set(a) == set(b), (list(a), list(b))
        for k in b:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
""")

COURSE_SCRIPT = EXPECTED + textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import difflab.io as dio
    from difflab import pickles
    folder = Path(sys.argv[1])
    assert torch.__version__.startswith("1.11"), torch.__version__
    assert dio._safetensors_api() is None, "safetensors should be hidden"
    assert pickles.USE_RESTRICTED_UNPICKLER and not pickles.TORCH_HAS_WEIGHTS_ONLY and not dio._DEVICE_IS_CONTEXT
    want = expected()
    # (a) a safetensors file the full install wrote with the package
    same(dio.load_tensors(folder / "full.safetensors"), {k: v.contiguous() for k, v in want.items()})
    dio.save_tensors(want, folder / "course.safetensors", metadata={"format": "pt"})
    # (b) torch 2.x's torch.save, zip and legacy format
    for name in ("full-zip.pt", "full-legacy.pt"):
        same(dio.load_torch_state(folder / name), want)
    assert torch.equal(dio.load_tensor_file(folder / "tensor.pt"), want["t_float32"])
    try:
        dio.load_tensor_file(folder / "expanded.pt")
        raise AssertionError("expanded tensor accepted")
    except ValueError as e:
        assert "claims shape [3, 100000, 100000] (30000000000 values) but the file stores only 1" in str(e), e
    # (c) a hostile pickle is refused without running; inert_fallback keeps the tensors
    for name in ("hostile-zip.pt", "hostile-legacy.pt"):
        try:
            dio.load_torch_state(folder / name)
            raise AssertionError(f"{name} accepted")
        except ValueError as e:
            assert "UnpicklingError: refusing to load the global posix.system" in str(e), e
        state = dio.load_torch_state(folder / name, inert_fallback=True, drop_non_tensors=True)
        assert list(state) == ["w"], state
    assert not (folder / "PWNED").exists(), "the payload ran"
    # claims the file cannot back are refused before torch 1.11 allocates them
    for name, reason in (("big-zip.pt", "storage '0' claims 40000000000 bytes"),
                         ("big-legacy.pt", "the storages claim 40000000000 bytes"),
                         ("far-zip.pt", "reaches element 10000000000 of a storage holding 1"),
                         ("far-legacy.pt", "reaches element 10000000000 of a storage holding 1")):
        try:
            dio.load_torch_state(folder / name)
            raise AssertionError(f"{name} accepted")
        except ValueError as e:
            assert reason in str(e), e
    # check_fits builds on the meta device
    def build():
        assert torch.empty(0).device.type == "meta"
        return torch.nn.Linear(100000, 100000)
    try:
        dio.check_fits(build, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, "src")
        raise AssertionError("check_fits accepted a mismatch")
    except ValueError as e:
        assert "shape conflicts" in str(e), e
    print("COURSE-ENV-OK")
""")


def test_course_env_reads_files_written_here(tmp_path):
    python = course_python()
    if python is None:
        pytest.skip("no course environment (set DIFFLAB_COURSE_ENV=/path/to/env, or build "
                    "~/.cache/difflab/course-env)")
    namespace: dict = {}
    exec(EXPECTED, namespace)
    want = namespace["expected"]()
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "full.safetensors"))
    torch.save(want, tmp_path / "full-zip.pt")
    torch.save(want, tmp_path / "full-legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(want["t_float32"], tmp_path / "tensor.pt")
    torch.save(torch.zeros(1).expand(3, 100000, 100000), tmp_path / "expanded.pt")
    for fmt in ("zip", "legacy"):
        torch.save({"w": torch.ones(2), "evil": Exploit(tmp_path / "PWNED")}, tmp_path / f"hostile-{fmt}.pt",
                   _use_new_zipfile_serialization=fmt == "zip")
    for fmt in ("zip", "legacy"):
        claim_file(tmp_path / f"big-{fmt}.pt", fmt, 10**10, 1, (1,), (1,))
        claim_file(tmp_path / f"far-{fmt}.pt", fmt, 1, 1, (100000, 100000), (100000, 1))
    shim = tmp_path / "shim" / "safetensors"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('safetensors is hidden for this test')\n")
    (tmp_path / "check.py").write_text(COURSE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim.parent), str(REPO / "src")])}
    run = subprocess.run([str(python), str(tmp_path / "check.py"), str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "COURSE-ENV-OK" in run.stdout, run.stdout + run.stderr
    assert not (tmp_path / "PWNED").exists()
    # the course env's writer (no package) wrote what the package writes here
    save_file({k: v.contiguous() for k, v in want.items()}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "course.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("device_context", [True, False])
def test_assign_state_hands_the_file_tensors_to_the_network(monkeypatch, device_context):
    """assign_state builds on the meta device (torch's context, or the emulation torch 1.11
    needs), then the network holds the state's own tensors: no copy, no random init."""
    if device_context and not dio._DEVICE_IS_CONTEXT:
        pytest.skip("this torch has no device context")
    monkeypatch.setattr(dio, "_DEVICE_IS_CONTEXT", device_context)

    def build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.BatchNorm2d(8))

    ref = build()
    state = {k: v.clone() + 0.5 if v.is_floating_point() else v.clone() for k, v in ref.state_dict().items()}
    net = dio.assign_state(build, state, "w.pt")
    for k, v in net.state_dict().items():
        assert v.data_ptr() == state[k].data_ptr(), k  # the same memory, not a copy
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(net.eval()(x), ref.eval()(x))
    assert not any(p.requires_grad for p in net.parameters())
    wide = dio.assign_state(build, {k: v.double() if v.is_floating_point() else v for k, v in state.items()}, "w.pt")
    assert all(v.dtype == state[k].dtype and torch.equal(v, state[k]) for k, v in wide.state_dict().items())
    with pytest.raises(ValueError, match=r"^w\.pt does not fit Sequential: missing keys \(1\): 0\.bias"):
        dio.assign_state(build, {k: v for k, v in state.items() if k != "0.bias"}, "w.pt")
    bad = dict(state)
    bad["1.weight"] = torch.full((8,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        dio.assign_state(build, bad, "w.pt")

    class WithHiddenBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.zeros(3), persistent=False)

    with pytest.raises(ValueError, match=r"keeps 1 tensors the file does not hold, e\.g\. table"):
        dio.assign_state(WithHiddenBuffer, {k: v.clone() for k, v in WithHiddenBuffer().state_dict().items()}, "w.pt")


@pytest.mark.parametrize("device_context", [True, False])
def test_meta_device_skips_the_initialisers_and_restores_them(monkeypatch, device_context):
    """In meta_device a network is built without running torch.nn.init (no values to fill;
    on meta tensors the fills cost a Python import); after the block, also after an error,
    the initialisers are torch's again."""
    if device_context and not dio._DEVICE_IS_CONTEXT:
        pytest.skip("this torch has no device context")
    monkeypatch.setattr(dio, "_DEVICE_IS_CONTEXT", device_context)
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counting)
    with dio.meta_device():
        shell = torch.nn.Linear(300, 200)
    assert calls == [] and shell.weight.is_meta and tuple(shell.weight.shape) == (200, 300)
    with pytest.raises(RuntimeError, match="boom"):
        with dio.meta_device():
            raise RuntimeError("boom")
    assert torch.nn.init.kaiming_uniform_ is counting
    built = torch.nn.Linear(300, 200)
    assert calls == [(200, 300)] and not built.weight.is_meta
    assert 0.02 < float(built.weight.detach().std()) < 0.05  # kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 * 300) = 0.033
