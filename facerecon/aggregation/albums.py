"""Finding albums (one person's photos) in the inputs of ``facerecon aggregate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from facerecon.io.images import IMAGE_EXTENSIONS, collect_inputs


@dataclass
class Album:
    """One identity: a name and its photos as ``(path, key)`` pairs, or, for an album taken
    from a detections file, that file and the keys of its images."""

    name: str
    folder: Path
    photos: list[tuple[Path, str]] = field(default_factory=list)
    detections: Path | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.keys) if self.detections is not None else len(self.photos)


def _direct_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def albums_in_detections(path: Path) -> tuple[list[Album], list[tuple[str, str]]]:
    """Albums of a detections file: images grouped by the first folder of their key (the
    sub-folder of the detected folder, i.e. one identity per sub-folder); keys without a
    folder form one album named after the file, unless there are two or more sub-folders:
    then they are stray photos of a people folder, returned as ``(key, reason)`` and skipped."""
    from facerecon.stages.detect import ITEMS_GROUP
    from facerecon.io.store import read_index

    groups: dict[str, list[str]] = {}
    loose: list[str] = []
    for key in sorted(read_index(path, ITEMS_GROUP)):
        parts = key.split("/")
        if len(parts) > 1:
            groups.setdefault(parts[0], []).append(key)
        else:
            loose.append(key)
    problems = []
    if len(groups) >= 2:
        problems = [(f"{path}:{key}", _stray_reason(len(groups))) for key in loose]
    elif loose:
        groups[path.stem] = groups.get(path.stem, []) + loose
    albums = [Album(name, path.parent, detections=path, keys=keys) for name, keys in sorted(groups.items())]
    return albums, problems


def _stray_reason(people: int) -> str:
    return (f"skipped: a photo beside the {people} person sub-folders of a people folder (each sub-folder is "
            "one person's album); move it into its person's sub-folder")


def _folder_with_photos(folder: Path, subfolders: list[Path]) -> list[tuple[Path, list[tuple[Path, str]]]]:
    """``[(folder, its photos)]`` for a folder with photos of its own: one album, its sub-folders
    included; or, when two or more ``subfolders`` hold photos, ``[(sub-folder, its photos)]``
    for those (a people folder). The folder is walked once; a linked sub-folder, which that
    walk does not enter, on its own."""
    whole = list(collect_inputs([str(folder)]))
    below: dict[str, list[tuple[Path, str]]] = {}
    for path, key in whole:  # keys are relative to the folder: "<sub-folder>/<key below it>"
        sub, _, rest = key.partition("/")
        if rest:
            below.setdefault(sub, []).append((path, rest))
    people = [(p, list(collect_inputs([str(p)])) if p.is_symlink() else below.get(p.name, [])) for p in subfolders]
    people = [(p, photos) for p, photos in people if photos]
    return people if len(people) >= 2 else [(folder, whole)]


def find_albums(inputs: list[str]) -> tuple[list[Album], list[tuple[str, str]]]:
    """Albums from folder or detections-file arguments, and ``(argument, reason)`` for
    arguments that give none.

    A folder holding image files is one album named after the folder (its sub-folders
    included). A folder holding only sub-folders is a parent: each sub-folder with images is
    one album (one identity per sub-folder). A folder with two or more sub-folders of photos
    is a parent too even when photos lie beside them: those stray top-level photos are not
    merged into an album of several people but reported (``folder/photo``, reason) and
    skipped. A detections ``.h5`` (``facerecon detect``) gives one album per first-level
    sub-folder of its keys (:func:`albums_in_detections`; keys beside two or more sub-folders
    are reported and skipped as stray photos too).
    """
    albums: list[Album] = []
    problems: list[tuple[str, str]] = []
    for argument in inputs:
        folder = Path(argument).expanduser()
        if folder.is_file() and folder.suffix.lower() in (".h5", ".hdf5"):
            from facerecon.stages.fit import check_detections_file

            try:
                check_detections_file(folder)
                found, strays = albums_in_detections(folder)
            except (ValueError, OSError) as exc:
                problems.append((argument, str(exc)))
                continue
            problems += strays
            if found:
                albums += found
            else:
                problems.append((argument, "no images in this detections file"))
            continue
        if not folder.is_dir():
            problems.append((argument, "not a folder or detections file (an album is a folder of one "
                                       "person's photos)"))
            continue
        direct = _direct_images(folder)
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if direct:
            groups = _folder_with_photos(folder, subfolders)
            if len(groups) > 1:
                problems += [(str(Path(argument) / stray.name), _stray_reason(len(groups))) for stray in direct]
        else:
            groups = [(p, list(collect_inputs([str(p)]))) for p in subfolders]
        found = False
        for group, photos in groups:
            if photos:
                albums.append(Album(group.resolve().name, group, photos))
                found = True
        if not found:
            problems.append((argument, "no photos found"))
    names: dict[str, int] = {}
    for album in albums:  # keep names unique
        count = names.get(album.name, 0)
        names[album.name] = count + 1
        if count:
            album.name = f"{album.name}_{count + 1}"
    return albums, problems
