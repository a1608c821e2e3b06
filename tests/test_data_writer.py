"""Shard writer: every source format round-trips through tars + index; bad input is handled."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rskdist.data import shards as S
from rskdist.data.sources import DataSourceError, Item, Listing, list_source
from rskdist.data.writer import write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_SHARDS = os.path.join(REPO, "tools", "make_shards.py")


def _cli_main(argv: list[str]) -> int:
    """tools/make_shards.py main(), run in this process (the tools folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", MAKE_SHARDS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _image_bytes(seed: int, fmt: str = "JPEG", size=(20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _put(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _read_back(out: str, splits=("train", "test")) -> dict:
    """split -> list of (key, label, class_name, image_id, image bytes, ext), via webdataset."""
    import webdataset as wds

    result = {}
    for split in splits:
        urls = sorted(glob.glob(os.path.join(out, split, "*.tar")))
        samples = []
        for s in wds.WebDataset(urls, shardshuffle=False):
            ext = "jpg" if "jpg" in s else "png"
            meta = json.loads(s["json"])
            assert int(s["cls"]) == meta["label"]
            samples.append((s["__key__"], meta["label"], meta["class_name"], meta["image_id"], s[ext], ext))
        result[split] = samples
    return result


def _check_round_trip(out: str, expected: dict) -> dict:
    """expected: split -> {image_id: (class_name, file bytes)}; checks tars, index and sample table."""
    index = S.load_index(out)
    assert sorted(index["splits"]) == sorted(expected)
    got = _read_back(out, tuple(expected))
    for split, exp in expected.items():
        samples = got[split]
        assert {s[3] for s in samples} == set(exp), split
        info = index["splits"][split]
        assert info["num_samples"] == len(samples) == sum(sh["num_samples"] for sh in info["shards"])
        for n, (key, label, class_name, image_id, data, _) in enumerate(samples):
            assert key == S.sample_key(n)  # key = stable global index
            assert info["classes"][label] == class_name == exp[image_id][0]
            assert data == exp[image_id][1]  # bytes as stored
        assert sorted({s[1] for s in samples}) == list(range(info["num_classes"]))
        # The sample table points at the same bytes, and matches a scan of the tar headers.
        table = S.load_split(out, split)
        reader = S.ShardReader(table.shard_paths)
        for n, row in enumerate(table.samples):
            assert reader.read(int(row["shard"]), int(row["offset"]), int(row["size"])) == samples[n][4]
            assert row["label"] == samples[n][1]
        scanned = S.scan_shards(table.shard_paths)
        for f in ("shard", "offset", "size", "label"):
            np.testing.assert_array_equal(scanned[f], table.samples[f])
    train_classes = set(index["splits"]["train"]["classes"])
    for split in expected.keys() - {"train"}:
        assert not train_classes & set(index["splits"][split]["classes"])  # class-disjoint
    return index


# ---------------------------------------------------------------------------- fixtures


def make_inat(root: str) -> dict:
    expected: dict = {"train": {}, "test": {}}
    lists = {"train": [], "test": []}
    for i, (kingdom, cid) in enumerate([("Plantae", "7477"), ("Plantae", "812"), ("Aves", "3"), ("Aves", "40")]):
        split = "train" if i < 2 else "test"
        for k in range(3):
            rel = f"train_val2018/{kingdom}/{cid}/{i}{k}abc.jpg"
            data = _image_bytes(i * 10 + k)
            _put(os.path.join(root, rel), data)
            lists[split].append(rel)
            expected[split][rel] = (f"train_val2018/{kingdom}/{cid}", data)
    for split, name in (("train", "Inaturalist_train_set1.txt"), ("test", "Inaturalist_test_set1.txt")):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lists[split]) + "\n")
    return expected


def make_sop(root: str) -> dict:
    expected: dict = {"train": {}, "test": {}}
    image_id = 0
    for split, classes in (("train", [1, 2, 11]), ("test", [12, 13])):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(2):
                image_id += 1
                rel = f"bicycle_final/{c}_{k}.JPG"
                data = _image_bytes(image_id)
                _put(os.path.join(root, rel), data)
                lines.append(f"{image_id} {c} 1 {rel}")
                expected[split][str(image_id)] = (str(c), data)
        with open(os.path.join(root, f"Ebay_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return expected


def make_cars(root: str) -> dict:
    import scipy.io

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 2012"]
    rows, expected = [], {"train": {}, "test": {}}
    n = 0
    for cid in (1, 2, 3, 4):  # 4 classes: 1-2 train, 3-4 test (first/second half)
        for k in range(3):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            data = _image_bytes(100 + n)
            _put(os.path.join(root, rel), data)
            rows.append((rel, 1, 2, 10, 12, cid, k % 2))
            expected["train" if cid <= 2 else "test"][rel] = (f"{cid:03d} {names[cid - 1]}", data)
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        ann[0, i] = r
    scipy.io.savemat(
        os.path.join(root, "cars_annos.mat"),
        {"annotations": ann, "class_names": np.array(names, dtype=object).reshape(1, -1)},
    )
    return expected


def make_cub(root: str) -> dict:
    base = os.path.join(root, "CUB_200_2011")
    expected: dict = {"train": {}, "test": {}}
    images, labels, classes = [], [], []
    n = 0
    for cid in (1, 2, 3, 4):
        cname = f"{cid:03d}.Bird_{cid}"
        classes.append(f"{cid} {cname}")
        for k in range(2):
            n += 1
            rel = f"{cname}/Bird_{cid}_{k}.jpg"
            data = _image_bytes(200 + n, fmt="PNG" if k else "JPEG")  # a png among jpgs
            _put(os.path.join(base, "images", rel), data)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {cid}")
            expected["train" if cid <= 2 else "test"][rel] = (cname, data)
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes)):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return expected


def make_vehicleid(root: str) -> dict:
    """VehicleID's layout: train_test_split/*.txt lines '<image id> <vehicle id>', image/<id>.jpg.
    The test lists are nested (800 within 1600 within 2400), as in the real dataset."""
    expected: dict = {"train": {}, "test_800": {}, "test_1600": {}, "test_2400": {}}
    vehicles = {"train": ["0002", "0010", "0031"], "test_800": ["0005"], "test_1600": ["0005", "0017"],
                "test_2400": ["0005", "0017", "0100"]}
    lists: dict = {split: [] for split in expected}
    for v, vehicle in enumerate(["0002", "0010", "0031", "0005", "0017", "0100"]):
        for k in range(2):
            image_id = f"{100 * v + k:07d}"
            data = _image_bytes(500 + 10 * v + k)
            _put(os.path.join(root, "image", f"{image_id}.jpg"), data)
            for split, members in vehicles.items():
                if vehicle in members:
                    # the 1600 list gives its ids without the files' zero padding
                    lists[split].append(f"{int(image_id) if split == 'test_1600' else image_id} {vehicle}")
                    expected[split][str(int(image_id)) if split == "test_1600" else image_id] = (vehicle, data)
    names = {"train": "train_list.txt", "test_800": "test_list_800.txt", "test_1600": "test_list_1600.txt",
             "test_2400": "test_list_2400.txt"}
    for split, name in names.items():
        _put(os.path.join(root, "train_test_split", name), ("\n".join(lists[split]) + "\n").encode())
    return expected


def make_folder(root: str) -> dict:
    expected: dict = {"train": {}, "test": {}}
    for i, c in enumerate(["ant", "bee", "cat", "dog", "eel"]):  # 5 -> 3 train (round half up), 2 test
        for k in range(2):
            rel = f"{c}/sub/{k}.png" if k else f"{c}/{k}.jpg"
            data = _image_bytes(300 + 10 * i + k, fmt="PNG" if k else "JPEG")
            _put(os.path.join(root, rel), data)
            expected["train" if i < 3 else "test"][rel] = (c, data)
        _put(os.path.join(root, c, "notes.txt"), b"not an image")
    return expected


def make_csv(root: str, with_split: bool) -> tuple[str, dict]:
    expected: dict = {"train": {}, "test": {}}
    rows = ["path,label,split" if with_split else "path,label"]
    for i, c in enumerate(["10", "2", "33", "4"]):  # numeric labels sort numerically: 2, 4 | 10, 33
        for k in range(2):
            rel = f"img/{c}_{k}.jpg"
            data = _image_bytes(400 + 10 * i + k)
            _put(os.path.join(root, rel), data)
            split = "train" if int(c) < 10 else "test"
            rows.append(f"{rel},{c},{split}" if with_split else f"{rel},{c}")
            expected[split][rel] = (c, data)
    path = os.path.join(root, "labels.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path, expected


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("source", ["inat", "sop", "cars196", "cub", "vehicleid", "folder", "csv", "csv_split"])
def test_round_trip(tmp_path, source):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    os.makedirs(src)
    if source.startswith("csv"):
        root, expected = make_csv(src, with_split=source == "csv_split")
        listing = list_source("csv", root)
    else:
        expected = {"inat": make_inat, "sop": make_sop, "cars196": make_cars, "cub": make_cub,
                    "vehicleid": make_vehicleid, "folder": make_folder}[source](src)
        listing = list_source(source, src)
    write_shards(listing, out, samples_per_shard=3, num_workers=1, progress=False)
    index = _check_round_trip(out, expected)
    assert index["skipped"]["count"] == 0
    assert index["splits"]["train"]["image_size"]["width"]["max"] == 20


def test_vehicleid_cli_writes_the_train_split_and_three_test_splits(tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    expected = make_vehicleid(src)
    assert _cli_main(["vehicleid", "--root", src, "--out", out, "--quiet", "--workers", "1"]) == 0
    index = _check_round_trip(out, expected)
    assert [index["splits"][s]["num_classes"] for s in ("train", "test_800", "test_1600", "test_2400")] == [3, 1, 2, 3]
    assert index["splits"]["test_2400"]["classes"] == ["0005", "0017", "0100"]
    assert index["skipped"]["count"] == 0
    err = capsys.readouterr().err
    assert "test_1600: 4 images, 2 classes" in err and "warning" not in err
    table = S.load_split(out, "test_800")  # the readers take any split name
    assert len(table) == 2 and table.classes == ["0005"]


def test_vehicleid_bad_layout_is_one_clear_message(tmp_path, capsys):
    src = str(tmp_path / "src")
    make_vehicleid(src)
    os.remove(os.path.join(src, "train_test_split", "test_list_2400.txt"))
    assert _cli_main(["vehicleid", "--root", src, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: VehicleID test_2400 list not found") and "fix:" in err
    with open(os.path.join(src, "train_test_split", "test_list_2400.txt"), "w") as f:
        f.write("0000100 0005 extra\n")
    with pytest.raises(DataSourceError, match=r"test_list_2400.txt:1: expected '<image id> <vehicle id>'"):
        list_source("vehicleid", src)


def test_labels_follow_sorted_class_ids(tmp_path):
    root, _ = make_csv(str(tmp_path), with_split=False)
    listing = list_source("csv", root)
    assert listing.classes == {"train": ["2", "4"], "test": ["10", "33"]}


def test_folder_split_options(tmp_path):
    make_folder(str(tmp_path))
    assert list_source("folder", str(tmp_path), train_fraction=0.2).classes["train"] == ["ant"]
    listfile = tmp_path / "train_classes.txt"
    listfile.write_text("bee\neel\n")
    listing = list_source("folder", str(tmp_path), train_classes_file=str(listfile))
    assert listing.classes == {"train": ["bee", "eel"], "test": ["ant", "cat", "dog"]}


def test_deterministic_output(tmp_path):
    """Same input -> byte-identical shards and index, whatever the number of workers."""
    src = str(tmp_path / "src")
    make_folder(src)
    outs = []
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        write_shards(list_source("folder", src), out, samples_per_shard=2, num_workers=workers, progress=False)
        outs.append(out)
    files = sorted(os.path.relpath(p, outs[0]) for p in glob.glob(os.path.join(outs[0], "**", "*"), recursive=True))
    assert any(f.endswith(".tar") for f in files)
    for rel in files:
        if os.path.isfile(os.path.join(outs[0], rel)):
            with open(os.path.join(outs[0], rel), "rb") as a, open(os.path.join(outs[1], rel), "rb") as b:
                assert a.read() == b.read(), rel


def test_corrupt_images_skipped_and_reported(tmp_path, capsys):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    expected = make_folder(src)
    good = _image_bytes(1)
    _put(os.path.join(src, "ant", "garbage.jpg"), b"this is not a jpeg")
    _put(os.path.join(src, "bee", "truncated.jpg"), good[: len(good) // 2])
    _put(os.path.join(src, "eel", "empty.png"), b"")
    rc = _cli_main(["folder", "--root", src, "--out", out, "--workers", "2", "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "skipped 3" in err and "skipped.txt" in err
    index = _check_round_trip(out, expected)  # the good images all made it, nothing else
    assert index["skipped"]["count"] == 3
    assert index["splits"]["train"]["num_skipped"] == 2 and index["splits"]["test"]["num_skipped"] == 1
    report = open(os.path.join(out, "skipped.txt")).read().splitlines()
    assert sorted(line.split("\t")[1].split("/")[-1] for line in report) == ["empty.png", "garbage.jpg", "truncated.jpg"]
    assert all("corrupt" in line for line in report)


def test_missing_listed_image_is_skipped(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_sop(src)
    with open(os.path.join(src, "Ebay_test.txt"), "a") as f:
        f.write("99 13 1 bicycle_final/missing.JPG\n")
    index = write_shards(list_source("sop", src), out, num_workers=1, progress=False)
    assert index["skipped"]["count"] == 1
    assert "unreadable" in open(os.path.join(out, "skipped.txt")).read()


def test_non_jpeg_png_is_reencoded_as_png(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    for c in ("a", "b"):
        _put(os.path.join(src, c, "x.bmp"), _image_bytes(5, fmt="BMP"))
    write_shards(list_source("folder", src), out, num_workers=1, progress=False)
    samples = _read_back(out)
    assert [s[5] for s in samples["train"]] == ["png"]
    with Image.open(io.BytesIO(samples["train"][0][4])) as im:
        assert im.format == "PNG" and im.size == (20, 14)


def test_max_size_downscales(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    for c in ("a", "b"):
        _put(os.path.join(src, c, "x.jpg"), _image_bytes(5, size=(40, 30)))
    index = write_shards(list_source("folder", src), out, num_workers=1, progress=False, max_size=20)
    assert index["splits"]["train"]["image_size"]["width"]["max"] == 20
    assert index["splits"]["train"]["image_size"]["height"]["max"] == 15


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "source,setup,needle",
    [
        ("sop", "sop_no_test", "Ebay_test.txt"),
        ("inat", "empty", "Inaturalist_train_set1.txt"),
        ("cars196", "empty", "cars_annos.mat"),
        ("cub", "empty", "images.txt"),
        ("folder", "missing_root", "nope"),
        ("csv", "empty", "is a folder"),
    ],
)
def test_bad_input_message(tmp_path, capsys, source, setup, needle):
    src = str(tmp_path / "src")
    os.makedirs(src)
    if setup == "sop_no_test":
        make_sop(src)
        os.remove(os.path.join(src, "Ebay_test.txt"))
    elif setup == "missing_root":
        src = str(tmp_path / "nope")
    rc = _cli_main([source, "--root", src, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    if setup != "missing_root" and source != "csv":
        assert "fix:" in err


def test_cli_exit_code_and_no_traceback(tmp_path):
    """The real command line: a missing split file is one clear message and exit code 2."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    make_sop(src)
    os.remove(os.path.join(src, "Ebay_train.txt"))
    proc = subprocess.run(
        [sys.executable, MAKE_SHARDS, "sop", "--root", src, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Ebay_train.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_output_needs_overwrite(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_folder(src)
    write_shards(list_source("folder", src), out, num_workers=1, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(list_source("folder", src), out, num_workers=1, progress=False)
    write_shards(list_source("folder", src), out, num_workers=1, progress=False, overwrite=True, samples_per_shard=1)
    assert len(glob.glob(os.path.join(out, "train", "*.tar"))) == 6  # stale shards removed, new ones written


def test_csv_split_must_be_class_disjoint(tmp_path):
    _put(os.path.join(str(tmp_path), "a.jpg"), _image_bytes(1))
    path = tmp_path / "x.csv"
    path.write_text("a.jpg,1,train\na.jpg,1,test\n")
    with pytest.raises(DataSourceError, match="class-disjoint"):
        list_source("csv", str(path))


def test_unknown_option_rejected():
    with pytest.raises(DataSourceError, match="does not take"):
        list_source("sop", "/x", train_fraction=0.3)


# ---------------------------------------------------------------------------- demo


def test_demo_cli_small(tmp_path):
    out = str(tmp_path / "demo")
    proc = subprocess.run(
        [sys.executable, MAKE_SHARDS, "demo", "--out", out, "--num-classes", "6", "--images-per-class", "3",
         "--image-size", "32", "--samples-per-shard", "4", "--workers", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 9 images, 3 classes, 3 shards" in proc.stderr
    index = S.load_index(out)
    assert index["splits"]["test"]["num_samples"] == 9
    samples = _read_back(out)
    with Image.open(io.BytesIO(samples["train"][0][4])) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
    # Generation is deterministic: same arguments, same bytes.
    from rskdist.data.demo_images import render_jpeg

    assert render_jpeg(0, 3, 1, 32) == render_jpeg(0, 3, 1, 32) != render_jpeg(0, 3, 2, 32)


def test_demo_classes_are_distinct_compositions():
    from rskdist.data.demo_images import NUM_COMBINATIONS, class_names

    names = class_names(200)
    assert len(set(names)) == 200 and NUM_COMBINATIONS >= 200
    train, test = names[:100], names[100:]
    # Test classes are new combinations of factor values that training also shows.
    for part in range(4):
        assert {n.split("-")[part] for n in test} <= {n.split("-")[part] for n in train}


@pytest.mark.slow
def test_demo_default_builds(tmp_path):
    # Its build time is measured, not asserted: README and docs/data.md give the figure.
    proc = subprocess.run([sys.executable, MAKE_SHARDS, "demo", "--out", str(tmp_path / "d"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    index = S.load_index(str(tmp_path / "d"))
    assert index["splits"]["train"]["num_classes"] == 100 == index["splits"]["test"]["num_classes"]


def test_manual_listing_through_writer(tmp_path):
    """Listings built in code (what the stream tests use) go through the same writer."""
    items = [Item(0, "a", "a0", None, (0, 0, 0, 16)), Item(1, "b", "b0", None, (0, 1, 0, 16))]
    listing = Listing("demo", {"train": ["a", "b"]}, {"train": items})
    index = write_shards(listing, str(tmp_path / "o"), num_workers=1, progress=False)
    assert index["splits"]["train"]["class_counts"] == [1, 1]


# ---------------------------------------------------------------------------- digits


def test_digits_cli_writes_scikit_learns_digits_class_disjoint(tmp_path, capsys):
    """The real package data: 1797 images, digits 0-5 train and 6-9 test, each sample the
    upsampled RGB image of its scikit-learn digit."""
    from sklearn.datasets import load_digits

    out = str(tmp_path / "digits")
    assert _cli_main(["digits", "--out", out, "--image-size", "24", "--workers", "1", "--quiet"]) == 0
    index = S.load_index(out)
    train, test = index["splits"]["train"], index["splits"]["test"]
    assert train["classes"] == ["0", "1", "2", "3", "4", "5"] and test["classes"] == ["6", "7", "8", "9"]
    digits = load_digits()
    counts = np.bincount(digits.target, minlength=10)
    assert train["class_counts"] == counts[:6].tolist() and test["class_counts"] == counts[6:].tolist()
    assert index["options"]["image_size"] == 24 and index["skipped"]["count"] == 0
    samples = _read_back(out)
    for split, rows in samples.items():
        for key, label, class_name, image_id, data, ext in rows[::97]:
            assert ext == "png" and class_name == str(digits.target[int(image_id)])
            assert index["splits"][split]["classes"][label] == class_name
            with Image.open(io.BytesIO(data)) as im:
                assert im.mode == "RGB" and im.size == (24, 24)
                back = np.asarray(im.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
            # The image shrunk back to 8x8 is its source digit, not another one.
            corr = [np.corrcoef(back.ravel(), d.ravel())[0, 1] for d in digits.images]
            assert int(np.argmax(corr)) == int(image_id) or corr[int(image_id)] > 0.95


def test_digits_bad_image_size_is_one_clear_message(tmp_path, capsys):
    assert _cli_main(["digits", "--out", str(tmp_path / "d"), "--image-size", "4", "--quiet"]) == 2
    assert "--image-size >= 8" in capsys.readouterr().err
    with pytest.raises(DataSourceError, match="does not take"):
        list_source("digits", train_fraction=0.5)
