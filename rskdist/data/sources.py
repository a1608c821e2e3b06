"""Source datasets -> class-disjoint train/test listings (no image is opened here).

Each `list_<source>` function reads the dataset's own metadata and returns a `Listing`:
for every split, the items (class name, image id, file path) and the class order that
defines the labels. `tools/make_shards.py` turns a listing into shards.

Splits (docs/method.md section 6):
- inat:    Smooth-AP split files (one image path per line); class = image's folder.
- sop:     Ebay_train.txt / Ebay_test.txt (image_id class_id super_class_id path).
- cars196: cars_annos.mat; classes 1-98 train, 99-196 test (first/second half).
- cub:     images.txt + image_class_labels.txt; classes 1-100 / 101-200.
- vehicleid: train_test_split/train_list.txt and the test lists of 800, 1600 and 2400
           vehicles (splits test_800, test_1600, test_2400); class = vehicle id.
- folder:  one sub-folder per class; first half of the sorted class names train.
- csv:     path,label[,split] rows; without a split column, classes split as `folder`.
- demo:    the embedded synthetic dataset (rskdist.data.demo_images).
- digits:  scikit-learn's handwritten digits (`load_digits`, shipped with the package:
           1797 8x8 grey images); digits 0-5 train, 6-9 test, upsampled to RGB.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field, replace

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCES = ("inat", "sop", "cars196", "cub", "vehicleid", "folder", "csv", "demo", "digits")


class DataSourceError(ValueError):
    """A user-fixable problem with the source dataset (missing file, bad layout)."""


@dataclass(frozen=True)
class Item:
    label: int  # contiguous within the split
    class_name: str
    image_id: str
    path: str | None = None  # image file to read; None for generated images
    synth: tuple | None = None  # generator arguments (demo source)
    data: bytes | None = None  # the encoded image itself (sources whose images ship in a package)


@dataclass
class Listing:
    source: str
    classes: dict[str, list[str]] = field(default_factory=dict)  # split -> class names by label
    items: dict[str, list[Item]] = field(default_factory=dict)  # split -> items sorted by (label, id)
    options: dict = field(default_factory=dict)  # effective generator settings (demo), recorded in index.json


def natural_key(name: str) -> tuple:
    """Sort numeric class ids numerically ("2" < "10"), other names alphabetically."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _build(source: str, rows: dict[str, list[tuple[str, str, str | None]]], class_sort=natural_key) -> Listing:
    """rows: split -> [(class_name, image_id, path)]. Assigns labels, sorts, checks disjointness."""
    listing = Listing(source)
    for split, split_rows in rows.items():
        classes = sorted({r[0] for r in split_rows}, key=class_sort)
        label_of = {c: i for i, c in enumerate(classes)}
        items = [Item(label_of[c], c, image_id, path) for c, image_id, path in split_rows]
        items.sort(key=lambda it: (it.label, natural_key(it.image_id)))
        listing.classes[split] = classes
        listing.items[split] = items
    train = set(listing.classes.get("train", ()))
    for split, classes in listing.classes.items():
        both = train & set(classes) if split != "train" else set()
        if both:
            print(
                f"warning: {len(both)} classes are in both train and {split} (e.g. {sorted(both)[:3]}); "
                "retrieval protocols expect class-disjoint splits",
                file=sys.stderr,
            )
    return listing


def _need_file(path: str, what: str, fix: str) -> str:
    if not os.path.isfile(path):
        raise DataSourceError(f"{what} not found: {path}\n  fix: {fix}")
    return path


def _need_dir(path: str | None, what: str, fix: str) -> str:
    if not path or not os.path.isdir(path):
        raise DataSourceError(f"{what} not found: {path}\n  fix: {fix}")
    return path


def split_classes(classes: list[str], train_fraction: float = 0.5, train_classes: list[str] | None = None):
    """Class-disjoint split of sorted class names: the first round(n * fraction) are train.

    With `train_classes` given, exactly those are train and the rest test.
    """
    if train_classes is not None:
        unknown = sorted(set(train_classes) - set(classes))
        if unknown:
            raise DataSourceError(f"--train-classes names classes that do not exist: {unknown[:5]}")
        chosen = set(train_classes)
        return [c for c in classes if c in chosen], [c for c in classes if c not in chosen]
    if not 0.0 < train_fraction < 1.0:
        raise DataSourceError(f"--train-fraction must be in (0, 1), got {train_fraction}")
    if len(classes) < 2:
        raise DataSourceError(f"need at least 2 classes for a class-disjoint split, found {len(classes)}")
    num_train = min(max(int(math.floor(len(classes) * train_fraction + 0.5)), 1), len(classes) - 1)
    return classes[:num_train], classes[num_train:]


def _read_class_list(path: str | None) -> list[str] | None:
    if path is None:
        return None
    _need_file(path, "train class list", "pass a text file with one class name per line")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------- sources


def list_inat(root: str, train_list: str | None = None, test_list: str | None = None) -> Listing:
    """iNaturalist 2018, Smooth-AP split: files listing image paths relative to `root`."""
    _need_dir(root, "iNaturalist root", "pass --root pointing at the folder holding train_val2018/")
    lists = {
        "train": train_list or "Inaturalist_train_set1.txt",
        "test": test_list or "Inaturalist_test_set1.txt",
    }
    rows: dict[str, list] = {}
    for split, name in lists.items():
        path = _need_file(
            os.path.join(root, name),
            f"iNaturalist {split} split file",
            f"put the Smooth-AP split file in --root or pass --{split}-list FILE",
        )
        rows[split] = []
        with open(path) as f:
            for line in f:
                rel = line.strip().split()[0] if line.strip() else ""
                if not rel:
                    continue
                rel = rel[2:] if rel.startswith("./") else rel
                rows[split].append((os.path.dirname(rel), rel, os.path.join(root, rel)))
    return _build("inat", rows, class_sort=lambda c: c)


def list_sop(root: str) -> Listing:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt (header + id class super path)."""
    _need_dir(root, "Stanford Online Products root", "pass --root pointing at Stanford_Online_Products/")
    rows: dict[str, list] = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = _need_file(
            os.path.join(root, name), f"SOP {split} split file", "pass --root pointing at Stanford_Online_Products/"
        )
        rows[split] = []
        with open(path) as f:
            for n, line in enumerate(f):
                parts = line.split()
                if not parts or (n == 0 and not parts[0].isdigit()):
                    continue  # header "image_id class_id super_class_id path"
                if len(parts) < 4:
                    raise DataSourceError(f"{path}:{n + 1}: expected 'image_id class_id super_class_id path'")
                rows[split].append((parts[1], parts[0], os.path.join(root, parts[3])))
    return _build("sop", rows)


def list_cars196(root: str) -> Listing:
    """Cars196: cars_annos.mat; the first half of the class ids (1-98) train, the rest test.

    The `test` field of the annotations (the classification split) is ignored.
    """
    import scipy.io

    _need_dir(root, "Cars196 root", "pass --root pointing at the folder holding cars_annos.mat and car_ims/")
    path = _need_file(
        os.path.join(root, "cars_annos.mat"), "Cars196 annotation file", "download cars_annos.mat into --root"
    )
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=True)
    if "annotations" not in mat:
        raise DataSourceError(f"{path} has no 'annotations' variable")
    import numpy as np

    ann = np.atleast_1d(mat["annotations"])
    names = [str(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
    ids = sorted({int(a["class"]) for a in ann})
    train_ids, _ = split_classes([str(i) for i in ids])
    train_ids = {int(i) for i in train_ids}
    rows: dict[str, list] = {"train": [], "test": []}
    for a in ann:
        cid = int(a["class"])
        rel = str(a["relative_im_path"])
        name = f"{cid:03d} {names[cid - 1]}" if cid - 1 < len(names) else f"{cid:03d}"
        rows["train" if cid in train_ids else "test"].append((name, rel, os.path.join(root, rel)))
    return _build("cars196", rows, class_sort=lambda c: c)


def list_cub(root: str) -> Listing:
    """CUB-200-2011: images.txt + image_class_labels.txt; classes 1-100 train, 101-200 test."""
    _need_dir(root, "CUB-200-2011 root", "pass --root pointing at CUB_200_2011/")
    if not os.path.isfile(os.path.join(root, "images.txt")) and os.path.isdir(os.path.join(root, "CUB_200_2011")):
        root = os.path.join(root, "CUB_200_2011")
    fix = "pass --root pointing at CUB_200_2011/ (the folder holding images.txt and images/)"
    images_txt = _need_file(os.path.join(root, "images.txt"), "CUB images.txt", fix)
    labels_txt = _need_file(os.path.join(root, "image_class_labels.txt"), "CUB image_class_labels.txt", fix)
    paths = _read_pairs(images_txt)
    labels = _read_pairs(labels_txt)
    classes_txt = os.path.join(root, "classes.txt")
    names = _read_pairs(classes_txt) if os.path.isfile(classes_txt) else {}
    ids = sorted(set(labels.values()), key=natural_key)
    train_ids, _ = split_classes(ids)
    train_ids = set(train_ids)
    rows: dict[str, list] = {"train": [], "test": []}
    for image_id, cid in labels.items():
        if image_id not in paths:
            raise DataSourceError(f"{labels_txt}: image {image_id} is not in {images_txt}")
        rel = paths[image_id]
        name = names.get(cid, cid)
        rows["train" if cid in train_ids else "test"].append((name, rel, os.path.join(root, "images", rel)))
    order = {names.get(c, c): i for i, c in enumerate(ids)}
    return _build("cub", rows, class_sort=lambda c: order[c])


def _read_pairs(path: str) -> dict[str, str]:
    """'key value' lines (value may contain spaces) -> {key: value}."""
    out = {}
    with open(path) as f:
        for n, line in enumerate(f):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            if len(parts) != 2:
                raise DataSourceError(f"{path}:{n + 1}: expected 'id value', got {line.strip()!r}")
            out[parts[0]] = parts[1]
    return out


# VehicleID's split files (train_test_split/) and the splits they become; the three test
# lists are nested sets of 800, 1600 and 2400 vehicles, each evaluated on its own.
VEHICLEID_LISTS = {
    "train": "train_list.txt",
    "test_800": "test_list_800.txt",
    "test_1600": "test_list_1600.txt",
    "test_2400": "test_list_2400.txt",
}


def list_vehicleid(root: str) -> Listing:
    """PKU VehicleID: train_test_split/<list>.txt lines '<image id> <vehicle id>', images in
    image/<image id>.jpg; one split per list (VEHICLEID_LISTS), class = vehicle id."""
    fix = "pass --root pointing at the VehicleID folder that holds train_test_split/ and image/"
    _need_dir(root, "VehicleID root", fix)
    image_dir = _need_dir(os.path.join(root, "image"), "VehicleID image folder", fix)
    present = set(os.listdir(image_dir))
    rows: dict[str, list] = {}
    for split, name in VEHICLEID_LISTS.items():
        path = _need_file(os.path.join(root, "train_test_split", name), f"VehicleID {split} list", fix)
        rows[split] = []
        with open(path) as f:
            for n, line in enumerate(f):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise DataSourceError(f"{path}:{n + 1}: expected '<image id> <vehicle id>', got {line.strip()!r}")
                image_id, vehicle = parts
                file = f"{image_id}.jpg"
                if file not in present and image_id.isdigit() and f"{int(image_id):07d}.jpg" in present:
                    file = f"{int(image_id):07d}.jpg"  # lists written without the files' zero padding
                rows[split].append((vehicle, image_id, os.path.join(image_dir, file)))
    return _build("vehicleid", rows)


def list_folder(root: str, train_fraction: float = 0.5, train_classes_file: str | None = None) -> Listing:
    """One sub-folder per class (images found recursively); class-disjoint split of the names."""
    _need_dir(root, "image folder", "pass --root pointing at a folder with one sub-folder per class")
    classes = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))), key=natural_key)
    if not classes:
        raise DataSourceError(f"no class sub-folders in {root}\n  fix: put each class's images in root/<class>/")
    train, test = split_classes(classes, train_fraction, _read_class_list(train_classes_file))
    rows: dict[str, list] = {"train": [], "test": []}
    for split, split_classes_ in (("train", train), ("test", test)):
        for c in split_classes_:
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_SUFFIXES):
                        rel = os.path.relpath(os.path.join(dirpath, fn), root)
                        rows[split].append((c, rel, os.path.join(root, rel)))
    return _build("folder", rows)


def list_csv(
    root: str, image_root: str | None = None, train_fraction: float = 0.5, train_classes_file: str | None = None
) -> Listing:
    """A CSV of `path,label[,split]` rows (optional header). Paths are relative to the CSV's folder
    (or `image_root`). Without a split column the classes are split as for `folder`."""
    if root and os.path.isdir(root):
        raise DataSourceError(f"{root} is a folder\n  fix: for the csv source pass --root path/to/file.csv")
    _need_file(root, "CSV file", "pass --root path/to/file.csv with rows 'path,label[,split]'")
    base = image_root or os.path.dirname(os.path.abspath(root))
    with open(root, newline="") as f:
        table = [r for r in csv.reader(f) if r and any(x.strip() for x in r)]
    if table and table[0][0].strip().lower() in ("path", "file", "filename", "image"):
        table = table[1:]
    if not table:
        raise DataSourceError(f"{root} has no rows")
    width = {len(r) for r in table}
    if not width <= {2, 3} or len(width) != 1:
        raise DataSourceError(f"{root}: every row must be 'path,label' or 'path,label,split' (found widths {sorted(width)})")
    rows: dict[str, list] = {"train": [], "test": []}
    if width == {3}:
        for n, (path, label, split) in enumerate(table):
            split = split.strip()
            if split not in rows:
                raise DataSourceError(f"{root}: row {n + 1}: split must be 'train' or 'test', got {split!r}")
            rows[split].append((label.strip(), path.strip(), os.path.join(base, path.strip())))
        both = {r[0] for r in rows["train"]} & {r[0] for r in rows["test"]}
        if both:
            raise DataSourceError(
                f"{root}: classes {sorted(both)[:5]} are in both train and test; the split must be class-disjoint"
            )
    else:
        classes = sorted({r[1].strip() for r in table}, key=natural_key)
        train, _ = split_classes(classes, train_fraction, _read_class_list(train_classes_file))
        train = set(train)
        for path, label in table:
            label = label.strip()
            rows["train" if label in train else "test"].append((label, path.strip(), os.path.join(base, path.strip())))
    return _build("csv", rows)


def list_demo(num_classes: int = 200, images_per_class: int = 24, image_size: int = 64, seed: int = 0) -> Listing:
    """The embedded synthetic dataset: first half of the classes train, second half test."""
    from .demo_images import class_names

    if num_classes < 2 or images_per_class < 1 or image_size < 16:
        raise DataSourceError("demo needs --num-classes >= 2, --images-per-class >= 1, --image-size >= 16")
    names = class_names(num_classes, seed)
    train, test = split_classes([str(i) for i in range(num_classes)])
    listing = Listing("demo")
    listing.options = dict(num_classes=num_classes, images_per_class=images_per_class, image_size=image_size, seed=seed)
    for split, ids in (("train", train), ("test", test)):
        items = []
        for label, cid in enumerate(ids):
            c = int(cid)
            for k in range(images_per_class):
                items.append(Item(label, names[c], f"{c:04d}_{k:03d}", None, (seed, c, k, image_size)))
        listing.classes[split] = [names[int(c)] for c in ids]
        listing.items[split] = items
    return listing


DIGITS_TRAIN = tuple(str(d) for d in range(6))  # digits 0-5 train, 6-9 test


def list_digits(image_size: int = 32) -> Listing:
    """scikit-learn's handwritten digits (1797 images, 8x8, 17 grey levels; no download):
    digits 0-5 train, 6-9 test, each image upsampled (bilinear) to `image_size` px RGB PNG."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise DataSourceError(f"digits needs --image-size >= 8 (the images are 8x8), got {image_size}")
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    rows: dict[str, list] = {"train": [], "test": []}
    data: dict[str, bytes] = {}
    for n, (pixels, target) in enumerate(zip(grey, digits.target)):
        image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR).convert("RGB")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image_id = f"{n:04d}"
        data[image_id] = buf.getvalue()
        rows["train" if str(target) in DIGITS_TRAIN else "test"].append((str(target), image_id, None))
    listing = _build("digits", rows)
    listing.items = {split: [replace(it, data=data[it.image_id]) for it in items]
                     for split, items in listing.items.items()}
    listing.options = dict(image_size=image_size, train_digits=list(DIGITS_TRAIN))
    return listing


def list_source(source: str, root: str | None = None, **options) -> Listing:
    """Dispatch to `list_<source>`; options that a source does not take are an error if set."""
    funcs = {
        "inat": list_inat,
        "sop": list_sop,
        "cars196": list_cars196,
        "cub": list_cub,
        "vehicleid": list_vehicleid,
        "folder": list_folder,
        "csv": list_csv,
        "demo": list_demo,
        "digits": list_digits,
    }
    if source not in funcs:
        raise DataSourceError(f"unknown source {source!r}; choose one of {list(funcs)}")
    import inspect

    params = inspect.signature(funcs[source]).parameters
    options = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(options) - set(params))
    if unused:
        flags = ["--train-classes" if k == "train_classes_file" else "--" + k.replace("_", "-") for k in unused]
        raise DataSourceError(f"source {source!r} does not take option(s) {', '.join(flags)}")
    if source not in ("demo", "digits"):
        if root is None:
            raise DataSourceError(f"source {source!r} needs --root SRC")
        options["root"] = root
    elif root is not None:
        print(f"note: --root {root} is not used by the {source} source", file=sys.stderr)
    return funcs[source](**options)
