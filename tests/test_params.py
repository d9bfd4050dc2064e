from pathlib import Path

import pytest

from stages.params import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent


def test_project_params_load_with_every_section():
    p = load_params(ROOT / "params.yaml")
    assert p.model.source == "embedded:smollm2-135m-instruct"
    assert p.template.name == "qa"
    assert isinstance(p.train.learning_rate, float)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    msg = str(e.value)
    assert str(f) in msg and "'train.learnig_rate'" in msg and "did you mean 'train.learning_rate'" in msg


def test_unknown_top_level_section(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ParamsError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_params(f)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"max_steps": "ten"}}, "train.max_steps"),
    ({"train": {"max_steps": 1.5}}, "train.max_steps"),
    ({"train": {"packing": "yes"}}, "train.packing"),
    ({"model": {"quantize": "8bit"}}, "model.quantize"),
    ({"lora": {"r": True}}, "lora.r"),
    ({"seed": None}, "seed"),
])
def test_wrong_type_names_the_key(raw, key):
    with pytest.raises(ParamsError, match=f"'{key}' must be"):
        parse_params(raw, "p.yaml")


def test_yaml_1_2_scientific_notation_is_a_float_and_ints_are_fine_floats(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n  warmup_ratio: 0\n")
    p = load_params(f)
    assert p.train.learning_rate == pytest.approx(1e-4) and p.train.warmup_ratio == 0.0


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(Exception):
        p.train.max_steps = 3  # type: ignore[misc]


def test_shipped_gpu_params_file_fits_the_schema():
    p = load_params(ROOT / "configs/params-mistral7b-gpu.yaml")
    assert p.model.source == "mistralai/Mistral-7B-v0.1" and p.lora.r == 32 and "lm_head" in p.lora.target_modules
