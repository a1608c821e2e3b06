"""A trained model is rebuilt from the architecture its run recorded (model.json), not from
the config: a CLIP run from a weights file whose metadata says QuickGELU (and a mean/std of
its own) evaluates, without that file, exactly as the run itself evaluated."""

import json
from pathlib import Path

import pytest
import torch

from rskdist.runlog import read_summary

ROOT = Path(__file__).resolve().parent.parent
TOWER = dict(layers=2, width=64, patch_size=16)
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def test_spec_rebuilds_architecture_and_preprocessing(tmp_path):
    from rskdist.models import create_model, read_spec, rebuild_model, write_spec
    from rskdist.models.fetch_weights import save_weights

    torch.manual_seed(0)
    trained = create_model("open_clip:ViT-B-16", image_size=32, embed_dim=16,
                           backbone_kwargs=dict(TOWER, quick_gelu=True))
    trained.mean, trained.std = MEAN, STD
    path = save_weights(trained, str(tmp_path / "tower.safetensors"))
    # As a config names it: the tower's shape only; the file's metadata decides the rest.
    model = create_model("open_clip:ViT-B-16", pretrained=path, image_size=32, embed_dim=16,
                         backbone_kwargs=dict(TOWER))
    assert model.info["quick_gelu"] and model.mean == MEAN and model.std == STD
    assert model.spec["backbone_kwargs"]["quick_gelu"] is True

    write_spec(model.spec, tmp_path)
    again = rebuild_model(read_spec(tmp_path))
    again.load_state_dict(model.state_dict())
    assert (again.mean, again.std, again.image_size) == (model.mean, model.std, model.image_size)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        # The config alone (no weights file) builds GELU: the outputs differ, so the check above is informative.
        plain = create_model("open_clip:ViT-B-16", image_size=32, embed_dim=16, backbone_kwargs=dict(TOWER))
        plain.load_state_dict(model.state_dict())
        assert float((plain.eval()(x) - model(x)).abs().max()) > 1e-4


def test_spec_errors_name_the_file(tmp_path):
    from rskdist.models import read_spec, rebuild_model

    assert read_spec(tmp_path) is None
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json is not valid JSON"):
        read_spec(tmp_path)
    with pytest.raises(ValueError, match="lacks backbone"):
        rebuild_model({"version": 1})


@pytest.mark.integration
def test_clip_run_with_quick_gelu_weights_evaluates_as_it_trained(tmp_path):
    """Train 2 steps from a weights file with quick_gelu: true in its metadata, remove the file,
    then tools/evaluate.py --checkpoint gives the run's final evaluation to the last digit, and
    the rebuilt model embeds an image exactly as the trainer's model does."""
    from test_data_stream import make_shards
    from tiny_runs import train_two_steps

    from rskdist.build import build_model, load_trained_model
    from rskdist.config import load_config
    from rskdist.models import create_model
    from rskdist.models.fetch_weights import save_weights

    torch.manual_seed(0)
    tower = create_model("open_clip:ViT-B-16", image_size=32, embed_dim=16, backbone_kwargs=dict(TOWER, quick_gelu=True))
    tower.mean, tower.std = MEAN, STD
    weights = save_weights(tower, str(tmp_path / "weights" / "tower.safetensors"))
    root = make_shards(tmp_path / "shards", [4] * 8, samples_per_shard=10, image_size=32, test_counts=(4, 3, 5, 4))
    run = train_two_steps(tmp_path, "clip", root, "model.backbone=open_clip:ViT-B-16", f"model.pretrained={weights}",
                          "model.image_size=32", "model.embed_dim=16",
                          "model.backbone_kwargs={layers: 2, width: 64, patch_size: 16}")
    final = read_summary(run)["final_eval"]
    spec = json.loads((run / "model.json").read_text())
    assert spec["backbone_kwargs"]["quick_gelu"] is True and tuple(spec["mean"]) == MEAN
    assert (run / "checkpoints" / "step00000002" / "model.json").is_file()

    # The trainer's model: built from the config with the weights file, then the checkpoint's state.
    trainer_model = build_model(load_config(str(run / "config.yaml")).model)
    trainer_model.load_state_dict(load_trained_model(run).state_dict())
    image = torch.rand(1, 3, 32, 32)

    Path(weights).unlink()  # evaluation needs only the run folder
    rebuilt = load_trained_model(run)
    assert (rebuilt.mean, rebuilt.std) == (trainer_model.mean, trainer_model.std)

    def embed(model):
        mean, std = torch.tensor(model.mean)[:, None, None], torch.tensor(model.std)[:, None, None]
        with torch.no_grad():
            return model.eval()((image - mean) / std)

    torch.testing.assert_close(embed(rebuilt), embed(trainer_model), rtol=0, atol=0)

    import evaluate

    record = evaluate.main(["--checkpoint", str(run)])
    for key, value in final.items():
        if key in record["results"]:
            assert record["results"][key] == value, key
    assert {"recall@1", "map@r"} <= set(record["results"])

    # A run from before model.json: rebuilt from its config's model section, with a warning.
    for spec_file in run.rglob("model.json"):
        spec_file.unlink()
    with pytest.raises(ValueError, match="no model.json"):
        load_trained_model(run)
    model_cfg = load_config(str(run / "config.yaml"), ["model.pretrained="]).model
    with pytest.warns(UserWarning, match="rebuilt from the config alone"):
        from_config = load_trained_model(run, model_cfg=model_cfg)
    expected = rebuilt.state_dict()
    assert from_config.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in from_config.state_dict().items())


def test_spec_keeps_learned_gem_and_forced_normalisation():
    """model.normalization=imagenet (applied after create_model) and a learned GeM exponent
    are part of what a rebuilt model must have."""
    from rskdist.build import build_model
    from rskdist.config import load_config
    from rskdist.constants import IMAGENET_MEAN
    from rskdist.models import rebuild_model

    cfg = load_config(str(ROOT / "configs/debug.yaml"), [
        "model.backbone=resnet18", "model.pool=gem", "model.gem_learnable=true", "model.normalization=imagenet",
        "model.backbone_kwargs={}", "model.image_size=32"])
    model = build_model(cfg.model, pretrained=False)
    assert tuple(model.spec["mean"]) == IMAGENET_MEAN and model.spec["gem_learnable"] is True
    with torch.no_grad():
        model.pool.p.fill_(4.5)
    again = rebuild_model(model.spec)
    again.load_state_dict(model.state_dict())
    assert again.mean == IMAGENET_MEAN and float(again.pool.p.detach()) == 4.5


def test_learned_gem_exponent_loads_from_a_model_file(tmp_path):
    """A RetrievalModel file with a learned GeM exponent (pool.p) loads as model.pretrained into a
    model that learns it; into a fixed-p model it is refused with the key to set."""
    from rskdist.models import WeightsMismatchError, create_model

    trained = create_model("resnet18", embed_dim=16, image_size=32, gem_learnable=True)
    with torch.no_grad():
        trained.pool.p.fill_(3.7)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    again = create_model("resnet18", embed_dim=16, image_size=32, gem_learnable=True, pretrained=str(tmp_path / "model.pt"))
    assert float(again.pool.p.detach()) == pytest.approx(3.7)
    torch.testing.assert_close(again.head[1].weight, trained.head[1].weight)
    with pytest.raises(WeightsMismatchError, match="learned GeM exponent.*model.gem_learnable=true"):
        create_model("resnet18", embed_dim=16, image_size=32, pretrained=str(tmp_path / "model.pt"))
