"""TFDS builders writing array_record files, and grain sources reading them back; TensorFlow is never needed.

    python -m contextblip_jax.data.records --dataset=imagecode --root=IMAGECODE_DIR --data_dir=OUT
    python -m contextblip_jax.data.records --dataset=captions --root=IMAGE_ROOT \
        --annotations=coco_karpathy_train.json,vg.json --data_dir=OUT

Why records at all: on a TPU pod the data sit in a bucket, where 94k small files are slow and array_record
gives random access (global shuffles, resumable iterators) in a few large files. Records hold the JPEG bytes as
downloaded, not pixels: decoding and resizing happen in the pipeline, so one build serves every image size and
augmentation. TFDS 4.9 writes array_record through its generator builders with numpy only, so features are plain
numpy-typed tensors (no `tfds.features.Image`, whose encoder would re-encode the JPEGs).

ImageCoDe stores one record per description with its set's 10 JPEGs in target-index order. Sets with 2-3
descriptions thus store their images 2-3 times (train: about 2.3x the image folder); in exchange every record is
a complete example, which is what global shuffling over descriptions needs. Captions store one record per image
with all its captions. Records keep the direct sources' order (`disable_shuffling`), so record i is example i.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from contextblip_jax.data import captions, imagecode

IMAGECODE_NAME = "imagecode"
CAPTIONS_NAME = "blip_captions"
RECORDS_VERSION = "1.0.0"


class _CodePath:
    """`code_path` of a builder class: its source file.

    TFDS 4.9.10 first probes `importlib_resources`, which it only installs on Python < 3.9, so on 3.11 the probe
    fails for builders defined inside a package; its own fallback is this file path, which is all it needs.
    """

    def __get__(self, instance: Any, owner: type) -> Any:
        return tfds.core.Path(inspect.getfile(owner))


class Imagecode(tfds.core.GeneratorBasedBuilder):
    """ImageCoDe (Krojer et al., 2022) from the folder users download; splits whose JSON file exists are built."""

    name = IMAGECODE_NAME
    code_path = _CodePath()
    VERSION = tfds.core.Version(RECORDS_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        RECORDS_VERSION: "One record per description; the set's 10 JPEGs in target-index order."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download train_data.json, valid_data.json, test_data_unlabeled.json and image-sets.zip from Zenodo record "
        "6518944 or the Hugging Face dataset BennoKrojer/ImageCoDe, unpack image-sets.zip next to the JSON files, "
        "and pass that folder as the manual directory."
    )

    def __init__(self, *, on_error: str = "raise", **kwargs: Any):
        self._on_error = on_error
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        n = imagecode.NUM_CANDIDATES
        features = tfds.features.FeaturesDict(
            {
                "example_id": tfds.features.Scalar(dtype=np.int64),
                "set_name": tfds.features.Text(),
                "description": tfds.features.Text(),
                "description_index": tfds.features.Scalar(dtype=np.int32),
                "target": tfds.features.Scalar(dtype=np.int32),
                "is_video": tfds.features.Scalar(dtype=np.bool_),
                "image_names": tfds.features.Tensor(shape=(n,), dtype=np.object_),
                "images": tfds.features.Tensor(shape=(n,), dtype=np.object_),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image retrieval from contextual descriptions: 1 description, 10 candidate images.",
            features=features,
            homepage="https://github.com/McGill-NLP/imagecode",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = os.fspath(dl_manager.manual_dir)
        splits = [s for s in imagecode.SPLIT_FILES if os.path.exists(imagecode.split_path(root, s))]
        if not splits:
            raise FileNotFoundError(f"{root}: none of {list(imagecode.SPLIT_FILES.values())} exists")
        return {split: self._generate_examples(root, split) for split in splits}

    def _generate_examples(self, root: str, split: str):
        examples = imagecode.read_split(root, split, self._on_error)
        for index, example in enumerate(examples):
            yield f"{index:09d}", imagecode.example_record(example, index)


class BlipCaptions(tfds.core.GeneratorBasedBuilder):
    """BLIP caption files (COCO, Visual Genome); the manual directory is the image root. One split: train."""

    name = CAPTIONS_NAME
    code_path = _CodePath()
    VERSION = tfds.core.Version(RECORDS_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        RECORDS_VERSION: "One record per image: its JPEG bytes and all its captions."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder the annotation files' image paths are relative to as the manual directory, and the "
        "BLIP annotation JSONs (e.g. coco_karpathy_train.json, vg.json) as annotation_files."
    )

    def __init__(self, *, annotation_files: Sequence[str] = (), on_error: str = "raise", **kwargs: Any):
        self._annotation_files = list(annotation_files)
        self._on_error = on_error
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "example_id": tfds.features.Scalar(dtype=np.int64),
                "image_name": tfds.features.Text(),
                "captions": tfds.features.Tensor(shape=(None,), dtype=np.object_),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self, description="Captioned images, BLIP format.", features=features, disable_shuffling=True
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        if not self._annotation_files:
            raise ValueError("BlipCaptions needs annotation_files")
        return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

    def _generate_examples(self, image_root: str):
        examples = captions.read_captions(self._annotation_files, image_root, self._on_error)
        for index, example in enumerate(examples):
            record = captions.caption_record(example, index)
            yield f"{index:09d}", {**record, "captions": list(record["captions"])}


def _prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str, data_dir: str) -> str:
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return os.fspath(builder.data_dir)


def build_imagecode(root: str, data_dir: str, on_error: str = "raise") -> str:
    """Writes `<data_dir>/imagecode/1.0.0/*.array_record` from an ImageCoDe folder; returns that folder."""
    builder = Imagecode(data_dir=data_dir, file_format="array_record", on_error=on_error)
    return _prepare(builder, root, data_dir)


def build_captions(annotation_files: Sequence[str], image_root: str, data_dir: str, on_error: str = "raise") -> str:
    """Writes `<data_dir>/blip_captions/1.0.0/*.array_record`; returns that folder."""
    builder = BlipCaptions(
        data_dir=data_dir, file_format="array_record", annotation_files=annotation_files, on_error=on_error
    )
    return _prepare(builder, image_root, data_dir)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _RecordSource:
    """A grain source over one split of a built dataset; the TFDS reader opens lazily in each worker process."""

    dataset_name = ""

    def __init__(self, data_dir: str, split: str):
        self.builder_dir = os.path.join(data_dir, self.dataset_name, RECORDS_VERSION)
        self.split = split
        if not os.path.isdir(self.builder_dir):
            raise FileNotFoundError(f"{self.builder_dir}: no built {self.dataset_name} dataset (see records.py)")
        self._reader = None
        self._length = len(self._open())

    def _open(self):
        if self._reader is None:
            builder = tfds.builder_from_directory(self.builder_dir)
            if self.split not in builder.info.splits:
                raise ValueError(f"{self.builder_dir}: no split {self.split!r} (has {list(builder.info.splits)})")
            self._reader = builder.as_data_source(split=self.split)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._open()[index]
        if int(record["example_id"]) != index:
            raise ValueError(f"{self.builder_dir}: record {index} holds example {record['example_id']}")
        return self._convert(record)

    def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.builder_dir!r}, split={self.split!r}, records={len(self)})"


class ImageCodeRecords(_RecordSource):
    """Same elements as `imagecode.ImageCodeSource`, read from `build_imagecode`'s array_record files."""

    dataset_name = IMAGECODE_NAME

    def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "example_id": int(record["example_id"]),
            "set_name": _text(record["set_name"]),
            "description": _text(record["description"]),
            "description_index": int(record["description_index"]),
            "target": int(record["target"]),
            "is_video": bool(record["is_video"]),
            "image_names": tuple(_text(name) for name in record["image_names"]),
            "images": tuple(bytes(data) for data in record["images"]),
        }


class CaptionRecords(_RecordSource):
    """Same elements as `captions.CaptionSource`, read from `build_captions`'s array_record files."""

    dataset_name = CAPTIONS_NAME

    def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "example_id": int(record["example_id"]),
            "image_name": _text(record["image_name"]),
            "captions": tuple(_text(c) for c in record["captions"]),
            "image": bytes(record["image"]),
        }


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _DATASET.value == "imagecode":
        path = build_imagecode(_ROOT.value, _DATA_DIR.value, _ON_ERROR.value)
    else:
        if not _ANNOTATIONS.value:
            raise app.UsageError("--dataset=captions needs --annotations")
        path = build_captions(_ANNOTATIONS.value, _ROOT.value, _DATA_DIR.value, _ON_ERROR.value)
    logging.info("wrote %s", path)


if __name__ == "__main__":
    from absl import app, flags

    _DATASET = flags.DEFINE_enum("dataset", "imagecode", ["imagecode", "captions"], "What to build.")
    _ROOT = flags.DEFINE_string("root", None, "ImageCoDe folder, or the caption files' image root.", required=True)
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder to write into.", required=True)
    _ANNOTATIONS = flags.DEFINE_list("annotations", [], "BLIP caption JSON files (--dataset=captions).")
    _ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Stop at damaged input or skip it.")
    app.run(_main)
