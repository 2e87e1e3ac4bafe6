"""Spoken-scenes generator: captions true of pixels, real speech, deterministic complete shards."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import webdataset
from PIL import Image

from pipeline.synth import SynthConfig, run
from pipeline.synth.scenes import (
    COLOURS,
    MIN_IMAGE_SIZE,
    RELATIONS,
    SHAPE_KINDS,
    Scene,
    Shape,
    caption,
    draw_scene,
    layout_scene,
    render_scene,
    sample_scene,
    shape_mask,
)
from pipeline.synth.speech import VOICES, EspeakError, Speaker
from pipeline.synth.writer import file_sha256, plan_sample, split_assignment

IMAGE_SIZE = 64
PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float64)  # (C, 3)
SMALL = SynthConfig(num_samples=24, seed=3, val_fraction=0.25, samples_per_shard=8)


def _scenes(count: int, seed: int = 0):
    """Yield (scene, placements, image) drawn like the generator does, for `count` seeds."""
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = sample_scene(rng)
        placements = layout_scene(scene, IMAGE_SIZE, rng)
        yield scene, placements, draw_scene(scene, placements, IMAGE_SIZE, rng)


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _relation_holds(relation: str, a: tuple, b: tuple) -> bool:
    """True if box ``a`` (x0, y0, x1, y1) is strictly `relation` box ``b``, with a pixel between."""
    return {
        "left of": a[2] < b[0] - 1,
        "right of": a[0] > b[2] + 1,
        "above": a[3] < b[1] - 1,
        "below": a[1] > b[3] + 1,
    }[relation]


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Palette name index nearest to each (N, 3) pixel."""
    distances = np.linalg.norm(pixels[:, None, :].astype(np.float64) - PALETTE[None], axis=-1)
    return distances.argmin(axis=1)


# --- scenes -----------------------------------------------------------------------------------


def test_caption_names_every_shape_in_order_with_the_relation():
    scene = Scene(
        shapes=(
            Shape("circle", "red", "small"),
            Shape("square", "blue", "large"),
            Shape("star", "green", "small"),
        ),
        relation="left of",
    )
    assert caption(scene) == "a small red circle left of a large blue square and a small green star"
    assert caption(Scene((Shape("star", "white", "large"),), None)) == "a large white star"


def test_sampled_scenes_cover_counts_and_relations_with_distinct_colours():
    scenes = [sample_scene(np.random.default_rng([1, i])) for i in range(300)]
    assert Counter(len(s.shapes) for s in scenes).keys() == {1, 2, 3}
    assert {s.relation for s in scenes if len(s.shapes) > 1} == set(RELATIONS)
    for scene in scenes:
        assert len({shape.colour for shape in scene.shapes}) == len(scene.shapes)
        assert (scene.relation is None) == (len(scene.shapes) == 1)


def test_relation_words_are_true_of_the_drawn_pixels():
    checked = 0
    for scene, placements, _ in _scenes(400):
        boxes = [
            _extent(shape_mask(s.kind, p, IMAGE_SIZE)) for s, p in zip(scene.shapes, placements)
        ]
        for other in boxes[1:]:
            assert _relation_holds(scene.relation, boxes[0], other), caption(scene)
            checked += 1
    assert checked > 300  # the loop really compared pairs


def test_shapes_never_touch():
    for scene, placements, _ in _scenes(300, seed=5):
        masks = [shape_mask(s.kind, p, IMAGE_SIZE) for s, p in zip(scene.shapes, placements)]
        covered = np.sum(masks, axis=0)
        assert covered.max() == 1, caption(scene)


def test_named_colour_dominates_each_shapes_pixels():
    for scene, placements, image in _scenes(200, seed=7):
        for shape, placement in zip(scene.shapes, placements):
            mask = shape_mask(shape.kind, placement, IMAGE_SIZE)
            nearest = _nearest_colour(image[mask])
            share = np.mean(nearest == PALETTE_NAMES.index(shape.colour))
            assert share > 0.95, f"{shape.colour} covers {share:.0%} of its {shape.kind}"


def test_small_and_large_differ_in_area_for_every_kind():
    areas: dict[tuple[str, str], list[int]] = {}
    for scene, placements, _ in _scenes(400, seed=11):
        for shape, placement in zip(scene.shapes, placements):
            area = int(shape_mask(shape.kind, placement, IMAGE_SIZE).sum())
            areas.setdefault((shape.kind, shape.size), []).append(area)
    for kind in SHAPE_KINDS:
        assert max(areas[kind, "small"]) < min(areas[kind, "large"]), kind


def test_render_scene_is_layout_then_draw_and_depends_on_the_rng():
    scene = sample_scene(np.random.default_rng(0))
    rendered = render_scene(scene, IMAGE_SIZE, np.random.default_rng(42))
    rng = np.random.default_rng(42)
    drawn = draw_scene(scene, layout_scene(scene, IMAGE_SIZE, rng), IMAGE_SIZE, rng)
    assert rendered.dtype == np.uint8 and rendered.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(rendered, drawn)
    assert not np.array_equal(rendered, render_scene(scene, IMAGE_SIZE, np.random.default_rng(43)))


def test_background_is_textured_not_flat():
    scene = Scene((Shape("circle", "red", "small"),), None)
    for seed in range(20):
        image = render_scene(scene, IMAGE_SIZE, np.random.default_rng(seed))
        assert image.reshape(-1, 3).std(axis=0).max() > 3.0


def test_layout_rejects_images_too_small_for_three_shapes():
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGE_SIZE}"):
        layout_scene(scene, MIN_IMAGE_SIZE - 1, np.random.default_rng(0))


# --- speech -----------------------------------------------------------------------------------

TEXT = "a small red circle above a large blue square"


@pytest.fixture(scope="module")
def speaker():
    with Speaker(sample_rate=16000) as instance:
        yield instance


def test_speech_is_deterministic_nonsilent_and_plausibly_long(speaker):
    first = speaker.speak(TEXT, voice="en+f3", rate_wpm=160, pitch=55, seed=9)
    other_text = speaker.speak("a green star", voice="en", rate_wpm=160, pitch=55)
    again = speaker.speak(TEXT, voice="en+f3", rate_wpm=160, pitch=55, seed=9)
    assert first.dtype == np.float32 and first.ndim == 1
    np.testing.assert_array_equal(first, again)  # even with another utterance in between
    assert 1.0 < len(first) / 16000 < 6.0
    assert np.sqrt(np.mean(first**2)) > 0.02 and np.abs(first).max() <= 1.0
    assert len(other_text) < len(first)


def test_voice_rate_and_pitch_change_the_audio(speaker):
    base = speaker.speak(TEXT, voice="en", rate_wpm=150, pitch=50)
    faster = speaker.speak(TEXT, voice="en", rate_wpm=200, pitch=50)
    assert len(faster) < 0.85 * len(base)
    variants = {speaker.speak(TEXT, voice=v, rate_wpm=150, pitch=50).tobytes() for v in VOICES}
    assert len(variants) == len(VOICES)
    higher = speaker.speak(TEXT, voice="en", rate_wpm=150, pitch=70)
    assert higher.tobytes() != base.tobytes()


def test_speech_is_resampled_to_the_requested_rate(speaker):
    with Speaker(sample_rate=speaker.native_rate) as native:
        original = native.speak(TEXT, voice="en-us", rate_wpm=170, pitch=40)
    resampled = speaker.speak(TEXT, voice="en-us", rate_wpm=170, pitch=40)
    assert speaker.native_rate == 22050
    assert abs(len(resampled) - len(original) * 16000 / 22050) <= 2


def test_unknown_voice_is_a_clear_error_and_the_speaker_recovers(speaker):
    with pytest.raises(EspeakError, match="variant 'nope'"):
        speaker.speak(TEXT, voice="en+nope")
    with pytest.raises(EspeakError, match="unknown eSpeak NG voice 'xx-none'"):
        speaker.speak(TEXT, voice="xx-none")
    assert len(speaker.speak("square")) > 1000


def test_missing_library_or_data_is_a_clear_error(tmp_path):
    with pytest.raises(EspeakError, match="phondata"):
        Speaker(data_path=tmp_path)
    with pytest.raises(EspeakError, match="library not found"):
        Speaker(library_path=tmp_path / "libespeak-ng.so")


# --- dataset ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "out"
    return root, run(SMALL, root, progress=False)


def _shard_paths(root: Path, manifest: dict) -> list[Path]:
    return [
        root / record["path"] for split in ("train", "val") for record in manifest["shards"][split]
    ]


def test_manifest_counts_shards_and_hashes_match_the_files(dataset):
    root, manifest = dataset
    num_val = round(SMALL.num_samples * SMALL.val_fraction)
    assert manifest["counts"] == {"train": SMALL.num_samples - num_val, "val": num_val}
    assert manifest["config"] == dataclasses.asdict(SMALL)
    assert json.loads((root / "manifest.json").read_text()) == manifest
    for split, records in manifest["shards"].items():
        assert [r["samples"] for r in records[:-1]] == [SMALL.samples_per_shard] * (
            len(records) - 1
        )
        assert sum(r["samples"] for r in records) == manifest["counts"][split]
        for index, record in enumerate(records):
            assert record["path"] == f"{split}/shard-{index:06d}.tar"
            assert file_sha256(root / record["path"]) == record["sha256"]
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*"))
    assert on_disk == sorted(p.relative_to(root).as_posix() for p in _shard_paths(root, manifest))


def test_tar_members_of_each_key_are_contiguous_and_complete(dataset):
    root, manifest = dataset
    keys: list[str] = []
    for path in _shard_paths(root, manifest):
        with tarfile.open(path) as archive:
            members = archive.getmembers()
        runs = [member.name.split(".", 1) for member in members]
        shard_keys = [
            key for index, (key, _) in enumerate(runs) if index == 0 or runs[index - 1][0] != key
        ]
        assert len(shard_keys) == len(set(shard_keys)), f"a key's members are split up in {path}"
        for key in shard_keys:
            assert sorted(ext for k, ext in runs if k == key) == ["flac", "json", "png", "txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "mmvq" for m in members)
        keys += shard_keys
    assert sorted(keys) == [f"scene-{i:06d}" for i in range(SMALL.num_samples)]


def test_samples_read_back_with_consistent_image_text_audio_and_metadata(dataset):
    root, manifest = dataset
    urls = [str(p) for p in _shard_paths(root, manifest)]
    seen = 0
    for sample in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["split"] == Path(sample["__url__"]).parent.name
        assert meta["caption"] == sample["txt"].decode("utf-8")
        assert (meta["source"], meta["license"], meta["seed"]) == (
            "mmvq-synth",
            "CC0-1.0",
            SMALL.seed,
        )
        assert meta["voice"] in VOICES and 130 <= meta["rate"] <= 200 and 30 <= meta["pitch"] <= 70
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.shape == (SMALL.image_size, SMALL.image_size, 3)
        _check_scene_metadata(meta["scene"], image)
        _check_audio(sample["flac"])
        seen += 1
    assert seen == SMALL.num_samples


def _check_scene_metadata(scene: dict, image: np.ndarray) -> None:
    boxes = [shape["box"] for shape in scene["shapes"]]
    for box in boxes[1:]:
        assert _relation_holds(scene["relation"], boxes[0], box)
    for shape in scene["shapes"]:
        x0, y0, x1, y1 = shape["box"]
        nearest = _nearest_colour(image[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3))
        # Shapes fill 35-100% of their box; the rest is muted background, never a palette colour.
        assert np.mean(nearest == PALETTE_NAMES.index(shape["colour"])) > 0.3


def _check_audio(flac: bytes) -> None:
    info = soundfile.info(io.BytesIO(flac))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    audio, _ = soundfile.read(io.BytesIO(flac), dtype="float32")
    assert 0.5 <= len(audio) / 16000 <= 8.0
    assert np.sqrt(np.mean(audio**2)) > 0.02  # speech, not silence


def test_split_counts_are_exact_and_come_from_the_seed():
    for num_samples, fraction in [(24, 0.25), (768, 0.125), (10, 0.0), (7, 0.5)]:
        config = SynthConfig(num_samples=num_samples, val_fraction=fraction)
        assert split_assignment(config).sum() == round(num_samples * fraction)
    a, b = (split_assignment(SynthConfig(seed=s)) for s in (0, 1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, split_assignment(SynthConfig(seed=0)))


def test_same_config_gives_byte_identical_shards(dataset, tmp_path):
    _, manifest = dataset
    assert run(SMALL, tmp_path / "again", progress=False) == manifest
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (
        dataset[0] / "manifest.json"
    ).read_bytes()


def test_another_seed_gives_other_samples(dataset, tmp_path):
    _, manifest = dataset
    other = run(dataclasses.replace(SMALL, seed=SMALL.seed + 1), tmp_path / "other", progress=False)
    hashes = {r["sha256"] for records in manifest["shards"].values() for r in records}
    assert hashes.isdisjoint(r["sha256"] for records in other["shards"].values() for r in records)
    assert (
        plan_sample(SMALL, 0).caption != plan_sample(dataclasses.replace(SMALL, seed=4), 0).caption
    )


def test_samples_do_not_depend_on_shard_size(dataset, tmp_path):
    root, manifest = dataset
    resharded = dataclasses.replace(SMALL, samples_per_shard=5)
    other = run(resharded, tmp_path / "resharded", progress=False)
    assert [r["samples"] for r in other["shards"]["train"]] == [5, 5, 5, 3]
    assert _members(root, manifest) == _members(tmp_path / "resharded", other)


def _members(root: Path, manifest: dict) -> dict[str, bytes]:
    contents = {}
    for path in _shard_paths(root, manifest):
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                contents[member.name] = archive.extractfile(member).read()
    return contents


def test_run_refuses_a_directory_with_previous_output(dataset):
    root, _ = dataset
    with pytest.raises(FileExistsError, match="already holds synth output"):
        run(SMALL, root, progress=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_samples", 0, "num_samples"),
        ("val_fraction", 1.0, "val_fraction"),
        ("samples_per_shard", 0, "samples_per_shard"),
        ("seed", -1, "seed"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**{field: value})
