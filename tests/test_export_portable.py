"""Exports link the base model's large parts unless asked to be portable; export.json says which parts are
links and names the base as the recipe gave it, never a path resolved on the machine that wrote it."""
import json

import pytest

from trainer import export
from trainer.config import ScheduleConfig
from trainer.data.encoders import create_toy_encoders
from trainer.method.models import build_toy_unet


@pytest.mark.parametrize("portable", [False, True])
def test_portable_exports_copy_every_part(tmp_path, monkeypatch, portable):
    monkeypatch.chdir(tmp_path)
    create_toy_encoders(tmp_path / "base")
    monkeypatch.setattr(export, "_COPY_LIMIT_BYTES", 1024)  # the toy's text encoder counts as large here
    unet = build_toy_unet(seed=0)
    out = export.export_unet({k: v.float() for k, v in unet.state_dict().items()}, dict(unet.config), tmp_path / "out",
                             base_dir=export.Path("base"), schedule=ScheduleConfig(), prediction_type="epsilon",
                             steps=4, stage="test", portable=portable)
    manifest = json.loads((out / "export.json").read_text())
    links = sorted(p.name for p in out.iterdir() if p.is_symlink())
    if portable:
        assert links == [] and manifest["linked"] == [] and manifest["base"] == "."
        assert (out / "text_encoder").is_dir() and not (out / "text_encoder").is_symlink()
    else:
        assert links == manifest["linked"] and "text_encoder" in links  # the small parts (codec config) copied
        assert manifest["base"] == "base"  # as given: no machine path in the manifest
    assert str(tmp_path) not in (out / "export.json").read_text()


def test_the_one_step_card_states_x0_prediction_and_the_comfyui_setting(tmp_path):
    create_toy_encoders(tmp_path / "base")
    unet = build_toy_unet(seed=0)
    weights = {k: v.float() for k, v in unet.state_dict().items()}
    kw = dict(base_dir=tmp_path / "base", schedule=ScheduleConfig(), stage="test")
    one = export.export_unet(weights, dict(unet.config), tmp_path / "one", prediction_type="sample", steps=1, **kw)
    four = export.export_unet(weights, dict(unet.config), tmp_path / "four", prediction_type="epsilon", steps=4, **kw)
    card = (one / "README.md").read_text()
    assert 'prediction_type="sample"' in card and "ModelSamplingDiscrete" in card and "1 steps" in card
    assert "ModelSamplingDiscrete" not in (four / "README.md").read_text()
    assert json.loads((one / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "sample"


def test_the_unet_config_names_no_folder_of_the_training_machine(tmp_path):
    create_toy_encoders(tmp_path / "base")
    build_toy_unet(seed=0).save_pretrained(tmp_path / "student")
    from trainer.method.models import load_unet

    unet = load_unet(tmp_path / "student")
    assert str(tmp_path) in json.dumps(dict(unet.config), default=str)  # diffusers records where it read the UNet
    out = export.export_unet({k: v.float() for k, v in unet.state_dict().items()}, dict(unet.config), tmp_path / "out",
                             base_dir=tmp_path / "base", schedule=ScheduleConfig(), prediction_type="epsilon", steps=4)
    assert str(tmp_path) not in (out / "unet" / "config.json").read_text()
