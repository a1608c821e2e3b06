"""The inference API (rskdist/inference.py): embed() applies the evaluation loader's transform
and normalisation, and the exported ONNX / TorchScript models give the same embeddings as
torch for a timm ViT, a timm CNN and an open_clip tower (random init, tiny)."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rskdist.data.transforms import decode_eval, normalize
from rskdist.inference import InferenceModel, card_path, export, load, read_card
from rskdist.models import create_model, write_spec

SIZE = 32
TINY = {
    "timm_vit": dict(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(patch_size=8, depth=2, embed_dim=64,
                                                                           num_heads=2)),
    "timm_cnn": dict(backbone="resnet18", backbone_kwargs=dict(layers=[1, 1, 1, 1])),  # GeM-pooled
    "open_clip": dict(backbone="open_clip:ViT-B-16", backbone_kwargs=dict(layers=2, width=64, patch_size=16)),
}


def tiny(kind: str) -> InferenceModel:
    torch.manual_seed(0)
    return InferenceModel(create_model(embed_dim=16, image_size=SIZE, **TINY[kind]))


def real_images(n: int = 6, size: int = 80) -> list[bytes]:
    """JPEGs of the demo dataset's renderer (objects on textured backgrounds), 80 px: large
    enough for the loaders' draft-mode JPEG decoding to apply at image size 32."""
    from rskdist.data.demo_images import render_jpeg

    return [render_jpeg(0, c, k, size) for c in range(n // 2) for k in range(2)]


def test_embed_of_pil_images_equals_the_evaluation_loader(tmp_path):
    """What evaluation computes for a shard split (EvalLoader + embed_dataset) equals embed()
    of the same images opened with PIL."""
    from test_data_stream import make_shards

    from rskdist.data import build_eval_loader
    from rskdist.eval import embed_dataset
    from rskdist.search.images import ShardImages

    model = tiny("timm_vit")
    root = make_shards(tmp_path / "shards", [2] * 4, image_size=80, test_counts=(3, 2, 4))
    loader = build_eval_loader(root, split="test", rank=0, world_size=1, batch_size=4, image_size=SIZE,
                               num_workers=0, mean=model.mean, std=model.std)
    want, _ = embed_dataset(model.model, loader, device="cpu")
    source = ShardImages(root, "test")
    got = model.embed([Image.open(io.BytesIO(source.read(i))) for i in range(len(source))], batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (9, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(9))
    # Informative: an image decoded in full first (no JPEG draft mode) embeds differently.
    loaded = Image.open(io.BytesIO(source.read(0)))
    loaded.load()
    assert float((model.embed([loaded]) - want[:1]).abs().max()) > 1e-4
    # Paths and encoded bytes take the same route.
    path = tmp_path / "a.jpg"
    path.write_bytes(source.read(1))
    torch.testing.assert_close(model.embed([path, source.read(1)]), want[[1, 1]], rtol=0, atol=1e-6)


def test_embed_of_a_uint8_tensor_normalises_only():
    model = tiny("timm_cnn")
    images = torch.from_numpy(np.stack([decode_eval(b, SIZE) for b in real_images()]))
    with torch.no_grad():
        want = model.model(normalize(images, model.mean, model.std))
    torch.testing.assert_close(model.embed(images), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed(images, batch_size=4), want, rtol=0, atol=1e-6)
    assert model.embed([]).shape == (0, 16)
    with pytest.raises(ValueError, match=r"uint8 \[n, 3, 32, 32\]"):
        model.embed(images.float())
    with pytest.raises(ValueError, match=r"uint8 \[n, 3, 32, 32\]"):
        model.embed(images[:, :, :16])
    with pytest.raises(ValueError, match="cannot read an image from int"):
        model.embed([3])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_onnx_and_torchscript_exports_agree_with_torch(kind, tmp_path):
    import onnxruntime as ort

    model = tiny(kind)
    real = torch.from_numpy(np.stack([decode_eval(b, SIZE) for b in real_images()]))
    inputs = [torch.randint(0, 256, (1, 3, SIZE, SIZE), dtype=torch.uint8), real,
              torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))]
    export(model, tmp_path / "m.onnx", fmt="onnx")
    export(model, tmp_path / "m.ts", fmt="torchscript")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    for x in inputs:  # batches of 1, 6 and 5: the batch dimension is free
        want = model.embed(x).numpy()
        got_onnx = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            got_ts = scripted(x).numpy()
        assert got_onnx.shape == got_ts.shape == want.shape
        np.testing.assert_allclose(got_onnx, want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got_ts, want, rtol=0, atol=1e-4)
    card = read_card(tmp_path / "m.onnx")
    assert card["format"] == "onnx" and card["image_size"] == SIZE and card["embedding_size"] == 16
    assert card["backbone"] == TINY[kind]["backbone"] and tuple(card["mean"]) == model.mean
    assert card["input"]["dtype"] == "uint8" and card["onnx_opset"] >= 18
    assert card["spec"] == model.model.spec


def test_load_a_weights_file_with_its_card_or_model_json(tmp_path):
    model = tiny("open_clip")
    images = torch.from_numpy(np.stack([decode_eval(b, SIZE) for b in real_images(2)]))
    path = export(model, tmp_path / "m.safetensors", fmt="safetensors")
    again = load(path, device="cpu")
    assert again.source == str(path.resolve())
    torch.testing.assert_close(again.embed(images), model.embed(images), rtol=0, atol=0)

    bare = tmp_path / "bare" / "m.safetensors"
    bare.parent.mkdir()
    shutil.copy(path, bare)
    with pytest.raises(ValueError, match="holds weights but not the architecture"):
        load(bare)
    write_spec(model.model.spec, bare.parent)  # the run's model.json beside it
    torch.testing.assert_close(load(bare, device="cpu").embed(images), model.embed(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="names a checkpoint of a run"):
        load(bare, "best")

    export(model, tmp_path / "m.ts", fmt="torchscript")
    with pytest.raises(ValueError, match="is an exported model"):
        load(tmp_path / "m.ts")
    with pytest.raises(ValueError, match="neither a run or checkpoint folder"):
        load(tmp_path / "nothing.npy")
    card_path(tmp_path / "m.safetensors").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(path)
    assert json.loads(card_path(tmp_path / "m.ts").read_text())["format"] == "torchscript"
