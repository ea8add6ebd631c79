"""difflab.io: model ids resolved from the local Hugging Face cache only, the one
template parser, and the one course input.json reader."""
import json

import pytest

from difflab.io import parse_templates, read_course_json, resolve_model_path


def fake_cache(root, repo, files):
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/REV/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    for name in files:
        (snap / name).write_text("{}")
    return snap


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = fake_cache(tmp_path / "hub", "openai/clip-vit-base-patch32", ["config.json"])
    assert resolve_model_path("openai/clip-vit-base-patch32", "CLIP folder", "get it") == snap
    with pytest.raises(FileNotFoundError, match=r"CLIP folder 'openai/not-cached' is neither a local path nor in the local "
                                                 r"Hugging Face cache; hf download it"):
        resolve_model_path("openai/not-cached", "CLIP folder", "hf download it")
    with pytest.raises(FileNotFoundError, match=r"CLIP folder not found: .*a/b/c; get it"):
        resolve_model_path(tmp_path / "a" / "b" / "c", "CLIP folder", "get it")
    # a local folder wins over a cache entry of the same spelling
    local = tmp_path / "openai" / "clip-vit-base-patch32"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("openai/clip-vit-base-patch32", "CLIP folder", "x").resolve() == local.resolve()


def test_clip_and_sd_loaders_name_how_to_get_the_weights(tmp_path, monkeypatch):
    from difflab.clip.model import check_clip_folder
    from difflab.sd.load import load_sd

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"hf download openai/clip-vit-base-patch32"):
        check_clip_folder("openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError, match=r"sd-v1-4\.ckpt"):
        load_sd(tmp_path / "absent.ckpt")


def test_templates_one_parser(tmp_path):
    assert parse_templates("# comment\n\na photo of {}.\n  art by {}  \n", "t.txt") == ("a photo of {}.", "art by {}")
    for bad in ("{} and {}", "a {x} {}", "no slot"):
        with pytest.raises(ValueError, match=r"t\.txt, line 1"):
            parse_templates(bad, "t.txt")
    with pytest.raises(ValueError, match="has no templates"):
        parse_templates("# only\n", "t.txt")


def test_course_json_one_concept_for_generation_and_scoring(tmp_path):
    data = {"0": {"src_image": "dog", "token_name": "<new1>", "prompt": ["a <new1>"],
                  "prompt_4_clip_eval": ["a dog"], "baseline": [[79, 34]]}}
    path = tmp_path / "input.json"
    path.write_text(json.dumps(data))
    gen, = read_course_json(path, "generate")
    score, = read_course_json(path, "score")
    assert gen == score
    assert (gen.key, gen.token, gen.prompts, gen.src_image, gen.eval_prompts, gen.baselines) == (
        "0", "<new1>", ("a <new1>",), "dog", ("a dog",), ((79.0, 34.0),))
    del data["0"]["baseline"]
    path.write_text(json.dumps(data))
    assert read_course_json(path, "generate")[0].baselines == ()
    with pytest.raises(ValueError, match=r"concept '0' has no 'baseline'"):
        read_course_json(path, "score")
