"""Generated IRCD data: exact layout, determinism, and descriptions that single out their target image."""

from __future__ import annotations

import filecmp
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from contextblip_jax.data import imagecode, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def see(path: str) -> tuple[str, str, str, int]:
    """Reads (colour, shape, position, count) back from the pixels alone: an oracle independent of the generator."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    size = pixels.shape[1]
    background = np.median(pixels.reshape(-1, 3), axis=0)
    labels, n = ndimage.label(np.abs(pixels - background).max(-1) > 60)
    blobs = [labels == k for k in range(1, n + 1) if (labels == k).sum() >= 10]
    colours, shapes, xs = set(), set(), []
    for blob in blobs:
        mean = pixels[blob].mean(0)
        colours.add(min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum()))
        ys, x = np.nonzero(blob)
        fill = blob.sum() / ((ys.max() - ys.min() + 1) * (x.max() - x.min() + 1))
        shapes.add("square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle")
        xs.append(x.mean() / size)
    assert len(colours) == len(shapes) == 1, path
    position = "left" if np.mean(xs) < 1 / 3 else "middle" if np.mean(xs) < 2 / 3 else "right"
    return colours.pop(), shapes.pop(), position, len(blobs)


def parse(description: str) -> tuple[str, str, str, int]:
    words = description.replace(",", "").split()
    colour = next(w for w in words if w in synthetic.COLOURS)
    shape = next(w.rstrip("s") for w in words if w.rstrip("s") in synthetic.SHAPES)
    position = next(w for w in words if w in synthetic.POSITIONS)
    count = next(synthetic.COUNTS.index(w) + 1 for w in words if w in synthetic.COUNTS)
    return colour, shape, position, count


def test_each_description_matches_its_target_and_no_other_image(tmp_path):
    root = str(tmp_path)
    counts = synthetic.generate(root, seed=5, num_train_sets=6, num_valid_sets=3, num_test_sets=3, image_size=64)
    assert counts["train"]["video_descriptions"] and counts["train"]["static_descriptions"]
    for split in imagecode.SPLIT_FILES:
        examples = imagecode.read_split(root, split)
        seen = {}
        for example in examples:
            scenes = seen.setdefault(example.set_name, [see(p) for p in example.image_paths])
            assert len(set(scenes)) == 10  # the 10 candidates all differ
            matches = [k for k, scene in enumerate(scenes) if scene == parse(example.description)]
            assert len(matches) == 1, (example.set_name, example.description, scenes)
            if split != "test":
                assert matches == [example.target]
            if example.is_video:  # a smooth clip: consecutive frames differ in one attribute by one step
                for a, b in itertools.pairwise(scenes):
                    steps = abs(a[3] - b[3]) + abs(synthetic.POSITIONS.index(a[2]) - synthetic.POSITIONS.index(b[2]))
                    assert a[:2] == b[:2] and steps == 1


def test_layout_is_exactly_imagecode(generated_root):
    assert sorted(os.listdir(generated_root)) == [
        "image-sets",
        "test_data_unlabeled.json",
        "train_data.json",
        "valid_data.json",
    ]
    for split, file_name in imagecode.SPLIT_FILES.items():
        with open(os.path.join(generated_root, file_name)) as f:
            data = json.load(f)
        for name, entries in data.items():
            files = os.listdir(imagecode.set_dir(generated_root, name))
            assert len(files) == 10 and all(imagecode.frame_number(f) is not None for f in files)
            if split == "test":
                assert isinstance(entries, list) and 1 <= len(entries) <= 3
            else:
                assert 1 <= len(entries) <= 3 and all(k in [str(i) for i in range(10)] for k in entries)
            with Image.open(os.path.join(imagecode.set_dir(generated_root, name), files[0])) as image:
                assert image.format == "JPEG" and image.size == (32, 32)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    small = {"num_train_sets": 3, "num_valid_sets": 1, "num_test_sets": 1, "image_size": 16}
    a, b, c = (str(tmp_path / name) for name in "abc")
    synthetic.generate(a, seed=11, **small)
    synthetic.generate(b, seed=11, **small)
    synthetic.generate(c, seed=12, **small)
    comparison = filecmp.dircmp(a, b)
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for name in os.listdir(os.path.join(a, "image-sets")):
        _, mismatch, errors = filecmp.cmpfiles(
            os.path.join(a, "image-sets", name),
            os.path.join(b, "image-sets", name),
            os.listdir(os.path.join(a, "image-sets", name)),
            shallow=False,
        )
        assert not mismatch and not errors
    assert not filecmp.cmp(os.path.join(a, "train_data.json"), os.path.join(c, "train_data.json"), shallow=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate(a, seed=11, **small)
    synthetic.generate(a, seed=12, overwrite=True, **small)
    assert filecmp.cmp(os.path.join(a, "train_data.json"), os.path.join(c, "train_data.json"), shallow=False)


def test_cli_writes_and_reports_counts(tmp_path):
    root = str(tmp_path / "out")
    command = [
        sys.executable,
        "-m",
        "contextblip_jax.data.synthetic",
        f"--root={root}",
        "--train_sets=2",
        "--valid_sets=1",
        "--test_sets=1",
        "--image_size=16",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {split: c["sets"] for split, c in summary["splits"].items()} == {"train": 2, "valid": 1, "test": 1}
    assert len(imagecode.read_split(root, "train")) == summary["splits"]["train"]["descriptions"]


ALL_KINDS = "attributes:1,motion:1,relation:1,timeline:1"
_RELATION = re.compile(
    r"^(?:the|a|an|there is a|there is an) (\w+) (\w+) (?:is )?(to the left of|to the right of|above|below) "
    r"(?:the|a|an) (\w+) (\w+)$"
)
_MOMENTS = [
    (re.compile(r"^(?:just after|the moment) the (\w+) (\w+) (\w+) (?:appears|shows up)$"), "appears"),
    (re.compile(r"^(?:just before|the frame right before) the (\w+) (\w+) (\w+) appears$"), "before"),
    (re.compile(r"^(?:just after|right after) the (\w+) (\w+) (?:disappears|is gone)$"), "gone"),
    (re.compile(r"^the last (?:frame where there (?:is|are)|moment with) (\w+) (\w+) (\w+)$"), "last"),
]
_ORDINALS = ("first", "second", "third", "fourth")


def frames_described(description: str, scenes: list) -> set[int]:
    """The frames of a set that a description is true of, decided from the scene records and the words alone."""
    if relation := _RELATION.match(description):
        colour_a, shape_a, phrase, colour_b, shape_b = relation.groups()

        def true_of(scene) -> bool:
            for a, b in itertools.permutations(scene, 2):
                if (a.colour, a.shape, b.colour, b.shape) != (colour_a, shape_a, colour_b, shape_b):
                    continue
                if phrase in ("to the left of", "to the right of"):
                    if (a.column - b.column) * (1 if phrase == "to the right of" else -1) > 0:
                        return True
                elif a.column == b.column and (a.y - b.y) * (1 if phrase == "below" else -1) > 0:
                    return True
            return False

        return {i for i, scene in enumerate(scenes) if true_of(scene)}
    for pattern, moment in _MOMENTS:
        if match := pattern.match(description):
            *number, colour, shape = match.groups()
            shape = shape.removesuffix("s")
            n = [sum((t.colour, t.shape) == (colour, shape) for t in scene) for scene in scenes]
            k = (
                (_ORDINALS if moment in ("appears", "before") else synthetic.COUNTS).index(number[0]) + 1
                if number
                else 0
            )
            frames = range(len(scenes))
            if moment == "appears":
                return {i for i in frames if i and n[i - 1] == k - 1 and n[i] == k}
            if moment == "before":
                return {i for i in frames if i + 1 < len(n) and n[i] == k - 1 and n[i + 1] == k}
            if moment == "gone":
                return {i for i in frames if i and n[i - 1] and not n[i]}
            return {max(i for i in frames if n[i] == k)}
    colour, shape, position, count = parse(description)
    wanted = [(colour, shape, synthetic.POSITIONS.index(position))] * count
    return {i for i, scene in enumerate(scenes) if [(t.colour, t.shape, t.column) for t in scene] == wanted}


def test_every_kind_singles_out_its_target_on_the_records():
    sets = list(synthetic.sample_sets(seed=2, num_train_sets=120, num_valid_sets=0, num_test_sets=0, kinds=ALL_KINDS))
    assert {s.kind for s in sets} == set(synthetic.parse_kinds(ALL_KINDS))
    for image_set in sets:
        assert len(set(image_set.scenes)) == 10 and 1 <= len(image_set.descriptions) <= 3
        for target, description in image_set.descriptions.items():
            assert frames_described(description, image_set.scenes) == {target}, (image_set, description)
        if image_set.kind == "timeline":  # one shape appears or disappears per frame
            for a, b in itertools.pairwise(image_set.scenes):
                assert len(set(a) ^ set(b)) == 1
        if image_set.kind == "relation":
            assert all(len(scene) == 2 for scene in image_set.scenes)


def see_things(path: str) -> list[tuple[str, str, str]]:
    """(colour, shape, position) of every shape in an image, read from the pixels alone, sorted."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    labels, n = ndimage.label(np.abs(pixels - background).max(-1) > 60)
    things = []
    for k in range(1, n + 1):
        blob = labels == k
        if blob.sum() < 10:
            continue
        mean = pixels[blob].mean(0)
        colour = min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum())
        ys, xs = np.nonzero(blob)
        fill = blob.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
        things.append((colour, shape, synthetic.POSITIONS[min(int(3 * xs.mean() / pixels.shape[1]), 2)]))
    return sorted(things)


def test_written_sets_are_the_sampled_records_and_show_them(tmp_path):
    root = str(tmp_path)
    arguments = {"seed": 4, "num_train_sets": 8, "num_valid_sets": 4, "num_test_sets": 2, "kinds": ALL_KINDS}
    synthetic.generate(root, image_size=64, **arguments)
    records = {s.name: s for s in synthetic.sample_sets(**arguments)}
    for split in imagecode.SPLIT_FILES:
        examples = imagecode.read_split(root, split)
        assert {e.set_name for e in examples} == {s.name for s in records.values() if s.split == split}
        for example in examples:
            image_set = records[example.set_name]
            assert example.description in image_set.descriptions.values()
            if split != "test":
                assert image_set.descriptions[example.target] == example.description
            numbers = [imagecode.frame_number(os.path.basename(p)) for p in example.image_paths]
            assert numbers == image_set.frames and example.is_video == (image_set.kind in ("motion", "timeline"))
            for path, scene in zip(example.image_paths, image_set.scenes, strict=True):
                shown = sorted((t.colour, t.shape, synthetic.POSITIONS[t.column]) for t in scene)
                assert see_things(path) == shown, (path, scene)


def test_kinds_are_checked():
    assert synthetic.parse_kinds("relation:1,timeline:3") == {"relation": 0.25, "timeline": 0.75}
    with pytest.raises(ValueError, match="kinds"):
        synthetic.parse_kinds("attributes:1,colours:1")


def test_ensure_reuses_only_the_same_generator_and_arguments(tmp_path):
    root = str(tmp_path / "cache")
    small = {"num_train_sets": 2, "num_valid_sets": 1, "num_test_sets": 1, "image_size": 16}
    assert synthetic.ensure(root, seed=1, **small)
    with open(os.path.join(root, synthetic.MANIFEST)) as f:
        assert json.load(f)["version"] == synthetic.VERSION
    assert not synthetic.ensure(root, seed=1, **small)
    first = imagecode.read_split(root, "train")
    assert synthetic.ensure(root, seed=2, **small)  # other settings: regenerated, not reused
    assert [e.description for e in imagecode.read_split(root, "train")] != [e.description for e in first]
    with open(os.path.join(root, synthetic.MANIFEST)) as f:
        stale = {**json.load(f), "version": synthetic.VERSION - 1}
    with open(os.path.join(root, synthetic.MANIFEST), "w") as f:
        json.dump(stale, f)
    assert synthetic.ensure(root, seed=2, **small)  # another generator version: regenerated
    os.remove(os.path.join(root, synthetic.MANIFEST))
    with pytest.raises(FileExistsError, match="manifest"):
        synthetic.ensure(root, seed=2, **small)


def test_descriptions_mix_follows_imagecodes_shares():
    counts = {1: 0, 2: 0, 3: 0}
    for image_set in synthetic.sample_sets(0, 2000, 0, 0, descriptions_mix="imagecode"):
        counts[len(image_set.descriptions)] += 1
    expected = {k: v / sum(synthetic.IMAGECODE_MIX.values()) for k, v in synthetic.IMAGECODE_MIX.items()}
    for count, share in expected.items():
        assert abs(counts[count] / 2000 - share) < 0.03, (counts, expected)
    uniform = [len(s.descriptions) for s in synthetic.sample_sets(0, 300, 0, 0)]
    first = [len(s.descriptions) for s in synthetic.sample_sets(0, 300, 0, 0, descriptions_mix="")]
    assert uniform == first and abs(np.mean(uniform) - 2.0) < 0.15


def test_descriptions_mix_is_checked():
    assert synthetic.parse_mix("1:1,3:3") == {1: 0.25, 3: 0.75}
    assert synthetic.parse_mix("") is None
    for wrong in ("4:1", "1:-1,2:2", "1:0"):
        with pytest.raises(ValueError, match="descriptions mix"):
            synthetic.parse_mix(wrong)


NEW_KINDS = "recolour:1,detail:1"
_DETAILS = [
    (re.compile(r"^the plain (\w+) (\w+)$|^the (\w+) (\w+) without any marks$"), "plain"),
    (re.compile(r"^the (\w+) (\w+) with a (?:small dot|dot in the middle)$"), "dot"),
    (re.compile(r"^the (\w+) (\w+) (?:with a thin dark outline|drawn with a thin outline)$"), "outline"),
    (re.compile(r"^the striped (\w+) (\w+)$|^the (\w+) (\w+) with white stripes$"), "stripes"),
]
_TURNS = [  # (pattern, frame offset: 0 the change itself, -1 the frame before); groups: shape, colour[, ordinal]
    (re.compile(r"^just after the (\w+) turns (\w+)$|^the moment the (\w+) becomes (\w+)$"), 0),
    (re.compile(r"^just after the (\w+) turns (\w+) for the (\w+) time$"), 0),
    (re.compile(r"^just before the (\w+) turns (\w+)$|^the last frame before the (\w+) becomes (\w+)$"), -1),
    (re.compile(r"^just before the (\w+) turns (\w+) for the (\w+) time$"), -1),
]
_NTH_TIME = re.compile(r"^the (\w+) time the (\w+) turns (\w+)$")


def new_frames_described(description: str, scenes: list) -> set[int]:
    """The frames a `detail` or `recolour` description is true of, from the records and the words alone."""
    for pattern, detail in _DETAILS:
        if match := pattern.match(description):
            colour, shape = [g for g in match.groups() if g]
            return {
                i
                for i, s in enumerate(scenes)
                if [(t.colour, t.shape, t.detail) for t in s] == [(colour, shape, detail)]
            }
    if match := _NTH_TIME.match(description):
        ordinal, shape, colour = match.groups()
        found = (shape, colour, _ORDINALS.index(ordinal) + 1, 0)
    else:
        for pattern, offset in _TURNS:
            if match := pattern.match(description):
                shape, colour, *ordinal = [g for g in match.groups() if g]
                found = (shape, colour, _ORDINALS.index(ordinal[0]) + 1 if ordinal else 1, offset)
                break
        else:
            raise AssertionError(f"unparsed: {description}")
    shape, colour, k, offset = found
    moving = [[t for t in s if t.colour != "grey"] for s in scenes]
    assert all(len(m) == 1 and m[0].shape == shape for m in moving)
    colours = [m[0].colour for m in moving]
    changes = [i for i in range(1, len(colours)) if colours[i] == colour and colours[i - 1] != colour]
    return {changes[k - 1] + offset} if len(changes) >= k else set()


def test_the_new_kinds_single_out_their_target_on_the_records():
    sets = list(synthetic.sample_sets(seed=7, num_train_sets=150, num_valid_sets=0, num_test_sets=0, kinds=NEW_KINDS))
    assert {s.kind for s in sets} == {"recolour", "detail"}
    wordings = set()
    for image_set in sets:
        assert len(set(image_set.scenes)) == 10 and 1 <= len(image_set.descriptions) <= 3
        for target, description in image_set.descriptions.items():
            assert new_frames_described(description, image_set.scenes) == {target}, (image_set, description)
            wordings.add(re.sub(r"\b(red|green|blue|yellow|purple|orange|circle|square|triangle)\b", "X", description))
        if image_set.kind == "recolour":  # each target looks like another frame: only its neighbours tell it apart
            colours = [next(t.colour for t in s if t.colour != "grey") for s in image_set.scenes]
            assert all(colours.count(colours[target]) >= 2 for target in image_set.descriptions)
        else:  # most candidates share the target's colour and kind: only the detail tells them apart
            looks = [(s[0].colour, s[0].shape) for s in image_set.scenes]
            assert max(looks.count(look) for look in looks) == 6
    assert any("second time" in w for w in wordings) and len(wordings) >= 12


def test_every_detail_set_has_a_description_however_its_details_fall():
    # 1400 sets of the ablation grid's mix: its set 734 once came out with six images sharing their details pairwise
    # and so nothing to describe (the generator now draws such a set again)
    mix = "attributes:0.2,motion:0.2,recolour:0.3,detail:0.3"
    sets = synthetic.sample_sets(seed=0, num_train_sets=1000, num_valid_sets=200, num_test_sets=200, kinds=mix)
    for image_set in sets:
        assert image_set.descriptions, image_set.name
        if image_set.kind == "detail":
            looks = [(s[0].colour, s[0].shape, s[0].detail) for s in image_set.scenes]
            for target in image_set.descriptions:
                assert looks.count(looks[target]) == 1, image_set.name


def test_details_are_drawn_where_the_records_say(tmp_path):
    root = str(tmp_path)
    synthetic.generate(root, seed=7, num_train_sets=12, num_valid_sets=0, num_test_sets=0, kinds="detail:1")
    records = {s.name: s for s in synthetic.sample_sets(7, 12, 0, 0, "detail:1")}
    for example in imagecode.read_split(root, "train"):
        for path, scene in zip(example.image_paths, records[example.set_name].scenes, strict=True):
            (thing,) = scene
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
            x = round((0.2, 0.5, 0.8)[thing.column] * 64)
            strip = pixels[24:41, max(x - 6, 0) : x + 7]  # the shape and a little around it
            dark = (strip.max(-1) < 70).sum()
            white = (strip.min(-1) > 248).sum()  # brighter than any background (channels up to 245)
            assert (dark > 3) == (thing.detail in ("dot", "outline")), (path, thing)
            assert (white > 1) == (thing.detail == "stripes"), (path, thing)


def test_the_main_job_generates_the_kinds_its_config_names(tmp_path):
    from contextblip_jax.training import inputs
    from tests.runs import run_config

    inputs.ensure_synthetic_data(run_config(str(tmp_path), data__synthetic_kinds="recolour:1,detail:3"))
    with open(tmp_path / synthetic.MANIFEST) as f:
        assert json.load(f)["kinds"] == {"recolour": 0.25, "detail": 0.75}
    names = {e.set_name for e in imagecode.read_split(str(tmp_path), "train")}
    assert any(imagecode.is_static(n) for n in names) and not all(imagecode.is_static(n) for n in names)
