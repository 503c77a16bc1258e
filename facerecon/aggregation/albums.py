"""Finding albums (one person's photos) in the inputs of ``facerecon aggregate``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from facerecon.io.images import IMAGE_EXTENSIONS, collect_inputs


@dataclass
class Album:
    """One identity: a name and its photos as ``(path, key)`` pairs."""

    name: str
    folder: Path
    photos: list[tuple[Path, str]] = field(default_factory=list)


def _direct_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def find_albums(inputs: list[str]) -> tuple[list[Album], list[tuple[str, str]]]:
    """Albums from folder arguments, and ``(argument, reason)`` for arguments that give none.

    A folder holding image files is one album named after the folder (its sub-folders
    included). A folder holding only sub-folders is a parent: each sub-folder with images is
    one album (one identity per sub-folder).
    """
    albums: list[Album] = []
    problems: list[tuple[str, str]] = []
    for argument in inputs:
        folder = Path(argument).expanduser()
        if not folder.is_dir():
            problems.append((argument, "not a folder (an album is a folder of one person's photos)"))
            continue
        if _direct_images(folder):
            groups = [folder]
        else:
            groups = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = False
        for group in groups:
            collected = collect_inputs([str(group)])
            if len(collected):
                albums.append(Album(group.resolve().name, group, list(collected)))
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
