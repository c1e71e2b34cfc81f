"""Fabricate small replicas of each real dataset's on-disk format.

Every `make_*` function writes into `root` exactly the layout that torchvision (or our own
loader) reads from the official download -- same folder names, file names, metadata formats
and pickle keys -- but with a few classes, a few images each and tiny images. The replicas
are *partial* copies: load them with ``SPARSEBENCH_ALLOW_PARTIAL_DATA=1``, otherwise the
official-size checks reject them. The loader tests use them, and `sparsebench sweep --smoke`
runs a suite on them (`fabricate`), so every entry is checked on the real on-disk format
before a real run.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from sparsebench.datasets._checks import PARTIAL_ENV


# --------------------------------------------------------------------------- helpers


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# Images at the sizes of the official downloads (width, height), for `sweep --rehearse`: decode and
# crop cost, file sizes and loader throughput are only meaningful at these sizes. ImageNet, Food-101
# (at most 512 px a side), Flowers-102 and Pets are photographs of about these sizes; Tiny ImageNet
# (64 px) and CIFAR (32 px) replicas are already at their real size.
REAL_IMAGE_SIZES: Dict[str, Tuple[int, int]] = {
    "imagenet": (500, 375), "food101": (512, 512), "flowers102": (500, 667), "pets": (500, 375),
}
PHOTO_CELL, PHOTO_GRAIN, PHOTO_QUALITY = 8, 12, 90   # see write_image


def write_image(path: Path, size: Tuple[int, int] = (12, 10), rng=None, mode: str = "RGB") -> None:
    """A random image; the format follows the suffix (JPEG for .jpg/.JPEG, PNG for .png). An image
    of photo size is coarse noise upsampled (PHOTO_CELL px cells) with grain (PHOTO_GRAIN grey levels)
    at JPEG quality PHOTO_QUALITY: about 95 KB at 500x375, like an ImageNet JPEG (~110 KB on average),
    and decoded at about the same speed; white noise would be several times larger and slower."""
    rng = rng if rng is not None else _rng()
    w, h = size
    channels = 3 if mode == "RGB" else 1
    options = {}
    if min(w, h) >= 8 * PHOTO_CELL:
        coarse = rng.integers(0, 256, size=(-(-h // PHOTO_CELL), -(-w // PHOTO_CELL), channels), dtype=np.uint8)
        smooth = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse).resize((w, h), Image.BILINEAR)
        grain = rng.normal(0, PHOTO_GRAIN, size=np.asarray(smooth).shape)
        img = Image.fromarray(np.clip(np.asarray(smooth) + grain, 0, 255).astype(np.uint8))
        if path.suffix.lower() in (".jpg", ".jpeg"):
            options["quality"] = PHOTO_QUALITY
    else:
        pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        img = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)


class Py2Str(bytes):
    """A Python 2 ``str``: pickled as (SHORT_)BINSTRING like the official CIFAR pickles.

    Loaded with ``encoding="latin1"`` (torchvision) it becomes a ``str``; with
    ``encoding="bytes"`` (the CIFAR web page's snippet) it becomes ``bytes`` -- b'data',
    b'labels', ... exactly as with the files written by Python 2's cPickle.
    """


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add one opcode writer
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def _py2(value):
    """Turn str keys / values (recursively, in dicts and lists) into Python 2 strings."""
    if isinstance(value, str):
        return Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def write_py2_pickle(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))


# --------------------------------------------------------------------------- CIFAR

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(n: int, rng) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)   # rows: R plane, G plane, B plane


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> Path:
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (Python 2 pickles)."""
    rng = _rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    label = 0
    for b in range(1, 6):
        labels = [(label + i) % 10 for i in range(per_batch)]
        label += per_batch
        write_py2_pickle(
            {
                "batch_label": f"training batch {b} of 5",
                "labels": labels,
                "data": _cifar_images(per_batch, rng),
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
            base / f"data_batch_{b}",
        )
    write_py2_pickle(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [i % 10 for i in range(n_test)],
            "data": _cifar_images(n_test, rng),
            "filenames": [f"test_{i}.png" for i in range(n_test)],
        },
        base / "test_batch",
    )
    write_py2_pickle(
        {"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072},
        base / "batches.meta",
    )
    (base / "readme.html").write_text("<html>replica</html>")
    return base


def make_cifar100(root: Path, num_classes: int = 4, n_train: int = 12, n_test: int = 8, seed: int = 0) -> Path:
    """cifar-100-python/train, test, meta with fine/coarse labels (Python 2 pickles)."""
    rng = _rng(seed)
    base = Path(root) / "cifar-100-python"
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [i % num_classes for i in range(n)]
        write_py2_pickle(
            {
                "filenames": [f"{split}_{i}.png" for i in range(n)],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": fine,
                "coarse_labels": [f // 2 for f in fine],
                "data": _cifar_images(n, rng),
            },
            base / split,
        )
    write_py2_pickle(
        {
            "fine_label_names": [f"fine_{i}" for i in range(num_classes)],
            "coarse_label_names": [f"coarse_{i}" for i in range((num_classes + 1) // 2)],
        },
        base / "meta",
    )
    return base


# --------------------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = ("n02124075", "n01443537", "n01629819")   # deliberately not sorted, like wnids.txt


def make_tiny_imagenet(
    root: Path, wnids: Sequence[str] = TINY_WNIDS, n_train: int = 4, n_val: int = 2, size: int = 64, seed: int = 0
) -> Path:
    """tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images, val/images, val/val_annotations.txt, test}."""
    rng = _rng(seed)
    base = Path(root) / "tiny-imagenet-200"
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}, object\n" for i, w in enumerate(wnids)))
    for w in wnids:
        boxes = []
        for i in range(n_train):
            name = f"{w}_{i}.JPEG"
            # the real data holds a few grayscale JPEGs: the loader must convert them to RGB
            write_image(base / "train" / w / "images" / name, (size, size), rng, mode="L" if i == 0 else "RGB")
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        (base / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    lines = []
    k = 0
    for _ in range(n_val):
        for w in wnids:
            name = f"val_{k}.JPEG"
            write_image(base / "val" / "images" / name, (size, size), rng)
            lines.append(f"{name}\t{w}\t1\t2\t{size - 2}\t{size - 3}\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    write_image(base / "test" / "images" / "test_0.JPEG", (size, size), rng)   # unlabelled official test
    return base


# --------------------------------------------------------------------------- Food-101

FOOD_CLASSES = ("apple_pie", "baby_back_ribs", "beignets")


def make_food101(
    root: Path, classes: Sequence[str] = FOOD_CLASSES, n_train: int = 4, n_test: int = 2, seed: int = 0,
    image_size: Tuple[int, int] = (20, 16),
) -> Path:
    """food-101/meta/{train,test}.json, classes.txt, labels.txt, {train,test}.txt, images/<class>/<id>.jpg."""
    rng = _rng(seed)
    base = Path(root) / "food-101"
    meta: Dict[str, Dict[str, List[str]]] = {"train": {}, "test": {}}
    image_id = 1000
    for cls in classes:
        for split, n in (("train", n_train), ("test", n_test)):
            for _ in range(n):
                write_image(base / "images" / cls / f"{image_id}.jpg", image_size, rng)
                meta[split].setdefault(cls, []).append(f"{cls}/{image_id}")
                image_id += 1
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
        (base / "meta" / f"{split}.txt").write_text("".join(f"{p}\n" for c in classes for p in meta[split][c]))
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    (base / "meta" / "labels.txt").write_text("".join(f"{c.replace('_', ' ').title()}\n" for c in classes))
    return base


# --------------------------------------------------------------------------- Flowers-102


def make_flowers102(
    root: Path, num_classes: int = 3, n_train: int = 2, n_val: int = 2, n_test: int = 2, seed: int = 0,
    image_size: Tuple[int, int] = (14, 18),
) -> Path:
    """flowers-102/jpg/image_00001.jpg..., imagelabels.mat (labels 1..K), setid.mat (trnid/valid/tstid)."""
    from scipy.io import savemat

    rng = _rng(seed)
    base = Path(root) / "flowers-102"
    labels: List[int] = []
    split_ids: Dict[str, List[int]] = {"trnid": [], "valid": [], "tstid": []}
    per_class = {"trnid": n_train, "valid": n_val, "tstid": n_test}
    for cls in range(1, num_classes + 1):
        for key, n in per_class.items():
            for _ in range(n):
                labels.append(cls)
                image_id = len(labels)
                split_ids[key].append(image_id)
                write_image(base / "jpg" / f"image_{image_id:05d}.jpg", image_size, rng)
    # the official files store 1 x N row vectors: uint8 labels, uint16 ids
    savemat(str(base / "imagelabels.mat"), {"labels": np.asarray([labels], dtype=np.uint8)})
    savemat(str(base / "setid.mat"), {k: np.asarray([v], dtype=np.uint16) for k, v in split_ids.items()})
    return base


# --------------------------------------------------------------------------- Oxford-IIIT Pets

# (image-name prefix, species 1 = cat / 2 = dog); class ids follow this order, 1-based
PETS_BREEDS = (("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1))


def make_pets(
    root: Path, breeds: Sequence[Tuple[str, int]] = PETS_BREEDS, n_trainval: int = 3, n_test: int = 2, seed: int = 0,
    image_size: Tuple[int, int] = (16, 12),
) -> Path:
    """oxford-iiit-pet/images/<Breed>_<n>.jpg, annotations/{trainval,test,list}.txt, annotations/trimaps/*.png."""
    rng = _rng(seed)
    base = Path(root) / "oxford-iiit-pet"
    breed_counter = {1: 0, 2: 0}
    lines: Dict[str, List[str]] = {"trainval": [], "test": []}
    for class_id, (prefix, species) in enumerate(breeds, 1):
        breed_counter[species] += 1
        for split, n in (("trainval", n_trainval), ("test", n_test)):
            for _ in range(n):
                k = sum(len(v) for v in lines.values()) + 1
                image_id = f"{prefix}_{k}"
                write_image(base / "images" / f"{image_id}.jpg", image_size, rng)
                write_image(base / "annotations" / "trimaps" / f"{image_id}.png", image_size, rng, mode="L")
                lines[split].append(f"{image_id} {class_id} {species} {breed_counter[species]}\n")
    for split in ("trainval", "test"):
        (base / "annotations" / f"{split}.txt").write_text("".join(lines[split]))
    header = (
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
        "#BREED ID: 1-25:Cat 1:12:Dog\n"
    )
    (base / "annotations" / "list.txt").write_text(header + "".join(lines["trainval"] + lines["test"]))
    return base


# --------------------------------------------------------------------------- ImageNet

IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850")


def make_imagenet(
    root: Path, wnids: Sequence[str] = IMAGENET_WNIDS, n_train: int = 3, n_val: int = 2, seed: int = 0,
    image_size: Tuple[int, int] = (18, 14),
) -> Path:
    """imagenet/train/<wnid>/<wnid>_<n>.JPEG and imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG (post valprep)."""
    rng = _rng(seed)
    base = Path(root) / "imagenet"
    k = 1
    for w in wnids:
        for i in range(n_train):
            write_image(base / "train" / w / f"{w}_{i + 1}.JPEG", image_size, rng)
        for _ in range(n_val):
            write_image(base / "val" / w / f"ILSVRC2012_val_{k:08d}.JPEG", image_size, rng)
            k += 1
    return base


# --------------------------------------------------------------------------- every dataset


# classes a replica has (`fabricate`'s per_class training images each, about): what a caller that needs
# N training images in all asks per class
REPLICA_CLASSES = {"cifar10": 10, "cifar100": 4, "tiny-imagenet": len(TINY_WNIDS), "food101": len(FOOD_CLASSES),
                   "flowers102": 3, "pets": len(PETS_BREEDS), "imagenet": len(IMAGENET_WNIDS)}


def fabricate(name: str, root: Path, per_class: int = 8, seed: int = 0, real_size: bool = False) -> None:
    """A replica of dataset `name` under `root` with about `per_class` training images per class
    (and a few test images); nothing for `digits`, which is embedded. `real_size`: images at the
    official download's size (`REAL_IMAGE_SIZES`), else tiny ones."""
    n = max(2, per_class)
    size = {"image_size": REAL_IMAGE_SIZES[name]} if real_size and name in REAL_IMAGE_SIZES else {}
    makers = {
        "cifar10": lambda: make_cifar10(root, per_batch=2 * n, n_test=10, seed=seed),   # 10 classes over 5 batches
        "cifar100": lambda: make_cifar100(root, num_classes=4, n_train=4 * n, n_test=8, seed=seed),
        "tiny-imagenet": lambda: make_tiny_imagenet(root, n_train=n, n_val=2, size=64, seed=seed),
        "food101": lambda: make_food101(root, n_train=n, n_test=2, seed=seed, **size),
        "flowers102": lambda: make_flowers102(root, n_train=n // 2, n_val=n - n // 2, n_test=2, seed=seed, **size),
        "pets": lambda: make_pets(root, n_trainval=n, n_test=2, seed=seed, **size),
        "imagenet": lambda: make_imagenet(root, n_train=n, n_val=2, seed=seed, **size),
    }
    if name == "digits":
        return
    if name not in makers:
        raise ValueError(f"no replica for dataset {name!r}; allowed: digits, {', '.join(sorted(makers))}")
    makers[name]()
