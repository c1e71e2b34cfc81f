"""Transfer datasets read with torchvision: `food101`, `flowers102`, `pets`.

All three are trained at 224 px by default (or `img_size`): RandomResizedCrop + flip for
train, Resize(int(size / 0.875)) + CenterCrop(size) for evaluation, ImageNet mean/std.

Layouts under the data root (what torchvision's download extracts):

* Food-101: ``food-101/meta/{train,test}.json`` (class -> ["class/id", ...]),
  ``food-101/meta/classes.txt``, ``food-101/images/<class>/<id>.jpg``.
  Official split train 75,750 / test 25,250, 101 classes.
* Flowers-102: ``flowers-102/jpg/image_00001.jpg ...``, ``flowers-102/imagelabels.mat``
  (labels 1..102), ``flowers-102/setid.mat`` (trnid, valid, tstid). The official train and
  val (1,020 + 1,020) are both our train; test is the official 6,149-image test set.
* Oxford-IIIT Pets: ``oxford-iiit-pet/images/<Breed_name>_<n>.jpg``,
  ``oxford-iiit-pet/annotations/{trainval,test}.txt`` (``<id> <class 1..37> <species> <breed id>``).
  trainval 3,680 is our train, test 3,669, 37 classes.

The metadata is parsed and checked before the torchvision dataset is built: every listed
image must exist (one directory listing per folder, no image is decoded), labels must be
in range, and counts must equal the official sizes unless
``SPARSEBENCH_ALLOW_PARTIAL_DATA=1`` (see `sparsebench.datasets._checks`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import ConcatDataset, Dataset
from torchvision.datasets import Flowers102, Food101, OxfordIIITPet
from torchvision.datasets.utils import check_integrity

from sparsebench.datasets._checks import (
    check_count,
    check_listed_exist,
    corrupt,
    guarded,
    guarded_download,
    listdir,
    not_found,
    partial_data_allowed,
    require_files,
)
from sparsebench.datasets.base import DatasetInfo, LoadedSplits, register_dataset
from sparsebench.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, transfer_transforms, image_splits

DEFAULT_SIZE = 224

FOOD_EXPECTED = {"classes": 101, "train": 75_750, "test": 25_250}
FLOWERS_EXPECTED = {"classes": 102, "train": 2_040, "test": 6_149}     # train = official train + val
PETS_EXPECTED = {"classes": 37, "train": 3_680, "test": 3_669}         # train = official trainval

FOOD_SOURCE = (
    "Food-101, Bossard, Guillaumin & Van Gool, ECCV 2014, "
    "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/; images from foodspotting.com, "
    "copyright of their owners, provided for non-commercial research use"
)
FLOWERS_SOURCE = (
    "Oxford 102 Category Flower Dataset, Nilsback & Zisserman, ICVGIP 2008, "
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/; no licence stated, research use, cite the paper"
)
PETS_SOURCE = (
    "Oxford-IIIT Pet Dataset, Parkhi, Vedaldi, Zisserman & Jawahar, CVPR 2012, "
    "https://www.robots.ox.ac.uk/~vgg/data/pets/; CC BY-SA 4.0, image copyright remains with the owners"
)


def _splits(
    name: str,
    train: Dataset,
    test: Dataset,
    targets: Sequence[int],
    num_classes: int,
    img_size: Optional[int],
    source: str,
) -> LoadedSplits:
    size = img_size or DEFAULT_SIZE
    train_tf, eval_tf = transfer_transforms(size)
    info = DatasetInfo(
        name=name, num_classes=num_classes, img_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, source=source
    )
    return image_splits(train, test, targets, (train_tf, eval_tf), info)


def _check_range(name: str, base: Path, split: str, labels: Sequence[int], num_classes: int) -> None:
    if len(labels) == 0:
        raise corrupt(name, base, f"the {split} split is empty")
    if min(labels) < 0 or max(labels) >= num_classes:
        raise corrupt(name, base, f"{split} labels outside 1..{num_classes}")


def _check_same_length(name: str, base: Path, split: str, ds: Dataset, expected: int) -> None:
    if len(ds) != expected:
        raise corrupt(name, base, f"torchvision read {len(ds)} {split} samples, the metadata lists {expected}")


# --------------------------------------------------------------------------- Food-101


def _food_meta(base: Path, split: str) -> Dict[str, List[str]]:
    rel = f"meta/{split}.json"
    meta = guarded("food101", base, f"parsing {rel}", lambda: json.loads((base / rel).read_text(encoding="utf-8")))
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v) for k, v in meta.items()
    ):
        raise corrupt("food101", base, f"{rel} is not a mapping class -> list of 'class/id'")
    return meta


@register_dataset("food101", "Food-101, 101 classes, 75,750 train / 25,250 test, 224 px (data root, --download)")
def load_food101(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    name = "food101"
    root = Path(root)
    base = root / "food-101"
    if download and not base.is_dir():
        guarded_download(name, root, Food101._URL, lambda: Food101(str(root), split="train", download=True))
    if not base.is_dir():
        raise not_found(name, base, root)
    require_files(name, base, "meta/train.json", "meta/test.json", "images")

    metas = {split: _food_meta(base, split) for split in ("train", "test")}
    classes = sorted(metas["train"])
    if sorted(metas["test"]) != classes:
        raise corrupt(name, base, "meta/train.json and meta/test.json list different classes")
    if (base / "meta" / "classes.txt").is_file():
        listed = guarded(name, base, "reading meta/classes.txt", lambda: (base / "meta" / "classes.txt").read_text())
        if sorted(line.strip() for line in listed.splitlines() if line.strip()) != classes:
            raise corrupt(name, base, "meta/classes.txt and meta/train.json list different classes")
    check_count(name, base, "the number of classes", len(classes), FOOD_EXPECTED["classes"])
    class_to_idx = {c: i for i, c in enumerate(classes)}

    listings: Dict[str, set] = {}
    labels: Dict[str, List[int]] = {}
    for split, meta in metas.items():
        labels[split] = []
        for cls, rel_paths in meta.items():       # same order as torchvision: json order
            labels[split] += [class_to_idx[cls]] * len(rel_paths)
            by_dir: Dict[str, List[str]] = {}
            for rel in rel_paths:
                folder, _, stem = f"{rel}.jpg".rpartition("/")
                by_dir.setdefault(folder, []).append(stem)
            for folder, stems in by_dir.items():
                if folder not in listings:
                    listings[folder] = listdir(base / "images" / folder)
                check_listed_exist(name, base, stems, listings[folder], f"images/{folder}/")
        check_count(name, base, f"the number of {split} images", len(labels[split]), FOOD_EXPECTED[split])

    train = guarded(name, base, "building torchvision Food101", lambda: Food101(str(root), split="train"))
    test = guarded(name, base, "building torchvision Food101", lambda: Food101(str(root), split="test"))
    _check_same_length(name, base, "train", train, len(labels["train"]))
    _check_same_length(name, base, "test", test, len(labels["test"]))
    return _splits(name, train, test, labels["train"], len(classes), img_size, FOOD_SOURCE)


# --------------------------------------------------------------------------- Flowers-102


class _Flowers102NoMD5(Flowers102):
    """torchvision's Flowers102 with the .mat MD5 checks turned into existence checks.

    The checksums are verified by `load_flowers102` for a full copy and skipped for a
    deliberate partial copy.
    """

    _file_dict = {key: (filename, None) for key, (filename, _) in Flowers102._file_dict.items()}


def _loadmat(base: Path, filename: str) -> dict:
    from scipy.io import loadmat

    return guarded("flowers102", base, f"parsing {filename}", lambda: loadmat(str(base / filename), squeeze_me=True))


def _mat_ints(base: Path, mat: dict, filename: str, key: str) -> np.ndarray:
    if key not in mat:
        raise corrupt("flowers102", base, f"{filename} has no '{key}' array")
    try:
        return np.atleast_1d(np.asarray(mat[key])).astype(np.int64).ravel()
    except (TypeError, ValueError) as exc:
        raise corrupt("flowers102", base, f"{filename}['{key}'] is not an integer array ({exc})") from exc


@register_dataset("flowers102", "Oxford Flowers-102, 102 classes, 2,040 train+val / 6,149 test, 224 px (--download)")
def load_flowers102(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    name = "flowers102"
    root = Path(root)
    base = root / "flowers-102"
    if download and not base.is_dir():
        url = Flowers102._download_url_prefix
        guarded_download(name, root, url, lambda: Flowers102(str(root), split="train", download=True))
    if not base.is_dir():
        raise not_found(name, base, root)
    require_files(name, base, "jpg", "imagelabels.mat", "setid.mat")
    if not partial_data_allowed():
        for filename, md5 in (Flowers102._file_dict["label"], Flowers102._file_dict["setid"]):
            if not check_integrity(str(base / filename), md5):
                raise corrupt(name, base, f"{filename} does not match the official MD5")

    all_labels = _mat_ints(base, _loadmat(base, "imagelabels.mat"), "imagelabels.mat", "labels")
    setid = _loadmat(base, "setid.mat")
    ids = {key: _mat_ints(base, setid, "setid.mat", key) for key in ("trnid", "valid", "tstid")}
    if len(all_labels) == 0 or all_labels.min() < 1:
        raise corrupt(name, base, "imagelabels.mat labels must be 1-based class numbers")
    num_classes = int(all_labels.max())
    check_count(name, base, "the number of classes", num_classes, FLOWERS_EXPECTED["classes"])

    present = listdir(base / "jpg")
    labels: Dict[str, List[int]] = {}
    for split, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        split_ids = np.concatenate([ids[k] for k in keys])
        if len(split_ids) and (split_ids.min() < 1 or split_ids.max() > len(all_labels)):
            raise corrupt(name, base, f"setid.mat {'/'.join(keys)} holds image ids outside 1..{len(all_labels)}")
        check_listed_exist(name, base, [f"image_{i:05d}.jpg" for i in split_ids], present, "jpg/")
        labels[split] = (all_labels[split_ids - 1] - 1).tolist()
        check_count(name, base, f"the number of {split} images", len(labels[split]), FLOWERS_EXPECTED[split])
        _check_range(name, base, split, labels[split], num_classes)

    def build(split: str) -> Dataset:
        return guarded(name, base, "building torchvision Flowers102", lambda: _Flowers102NoMD5(str(root), split=split))

    train = ConcatDataset([build("train"), build("val")])
    test = build("test")
    _check_same_length(name, base, "train", train, len(labels["train"]))
    _check_same_length(name, base, "test", test, len(labels["test"]))
    return _splits(name, train, test, labels["train"], num_classes, img_size, FLOWERS_SOURCE)


# --------------------------------------------------------------------------- Oxford-IIIT Pets


def _pets_annotations(base: Path, split: str) -> Tuple[List[str], List[int]]:
    rel = f"annotations/{split}.txt"
    text = guarded("pets", base, f"reading {rel}", lambda: (base / rel).read_text(encoding="utf-8"))
    image_ids, labels = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4 or not all(f.lstrip("-").isdigit() for f in fields[1:]):
            raise corrupt("pets", base, f"{rel} line {lineno} is not '<image id> <class> <species> <breed id>'")
        image_ids.append(fields[0])
        labels.append(int(fields[1]) - 1)
    return image_ids, labels


@register_dataset("pets", "Oxford-IIIT Pets, 37 classes, 3,680 trainval / 3,669 test, 224 px (data root, --download)")
def load_pets(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    name = "pets"
    root = Path(root)
    base = root / "oxford-iiit-pet"
    if download and not base.is_dir():
        url = OxfordIIITPet._RESOURCES[0][0].rsplit("/", 1)[0] + "/"
        guarded_download(name, root, url, lambda: OxfordIIITPet(str(root), split="trainval", download=True))
    if not base.is_dir():
        raise not_found(name, base, root)
    require_files(name, base, "images", "annotations/trainval.txt", "annotations/test.txt")

    parsed = {split: _pets_annotations(base, split) for split in ("trainval", "test")}
    all_labels = parsed["trainval"][1] + parsed["test"][1]
    if not all_labels or min(all_labels) < 0:
        raise corrupt(name, base, "annotation class numbers must be 1-based")
    num_classes = max(all_labels) + 1
    check_count(name, base, "the number of classes", num_classes, PETS_EXPECTED["classes"])
    present = listdir(base / "images")
    for split, ours in (("trainval", "train"), ("test", "test")):
        image_ids, labels = parsed[split]
        check_listed_exist(name, base, [f"{i}.jpg" for i in image_ids], present, "images/")
        check_count(name, base, f"the number of {split} images", len(labels), PETS_EXPECTED[ours])
        _check_range(name, base, split, labels, num_classes)

    def build(split: str) -> Dataset:
        return guarded(name, base, "building torchvision OxfordIIITPet", lambda: OxfordIIITPet(str(root), split=split))

    train, test = build("trainval"), build("test")
    _check_same_length(name, base, "trainval", train, len(parsed["trainval"][1]))
    _check_same_length(name, base, "test", test, len(parsed["test"][1]))
    return _splits(name, train, test, parsed["trainval"][1], num_classes, img_size, PETS_SOURCE)
