"""UCF-101's layout: <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi and <root>/ucfTrainTestlist/
{classInd.txt, trainlist0K.txt, testlist0K.txt}, for split K in 1..3.

The official list files have CRLF line endings; train lines carry a 1-based label, test lines
none (the class is the folder; file names may differ from it in case, as
HandstandPushups/v_HandStandPushups_g01_c01.avi does). UCF-101 has no validation split: ours is the train clips of
every `val_every`-th group (g05, g10, ...), so no actor appears in two splits (if none of those
groups is on disk, every val_every-th of the train groups present, and the listing says so). Clips a list
names but the disk lacks (a partial download) are counted and the first few named; the rest
are used.

The root is a local folder or an object-store URI: the clips are listed once (a set of present
names), never probed one listed clip at a time, and the list files are read through their paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from storage import AnyPath, StoragePath
from tasks.base import BadDataRoot
from tasks.inputs import input_path, unreadable

VIDEO_DIR = "UCF-101"
LIST_DIR = "ucfTrainTestlist"
CLASS_INDEX = "classInd.txt"
NAME = re.compile(r"^v_(?P<cls>[A-Za-z0-9]+)_g(?P<group>\d+)_c(?P<clip>\d+)\.avi$")




@dataclass(frozen=True)
class Clip:
    """One listed clip that is on disk (in the store): its path comes from the folder's listing."""

    path: AnyPath
    label: int  # 0-based, classInd's number minus one
    class_name: str
    group: int  # gXX: clips of one group share actors and scene

    @property
    def clip_id(self) -> str:
        return self.path.stem


@dataclass
class ClipListing:
    clips: list[Clip]
    problems: list[str] = field(default_factory=list)


def read_class_index(root: AnyPath | str) -> list[str]:
    """Class names in label order, from classInd.txt ('1 ApplyEyeMakeup' per line)."""
    root = input_path(root)
    path = root / LIST_DIR / CLASS_INDEX
    if not path.is_file():
        raise BadDataRoot(f"{root}: not in UCF-101's layout (expected {LIST_DIR}/{CLASS_INDEX} and {VIDEO_DIR}/)")
    names: dict[int, str] = {}
    for number, line in enumerate(_lines(path), start=1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise BadDataRoot(f"{path}:{number}: expected '<index> <ClassName>', got {line!r}")
        names[int(parts[0])] = parts[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise BadDataRoot(f"{path}: class indices must run 1..{len(names)} without gaps")
    return [names[i] for i in range(1, len(names) + 1)]


def list_split(root: AnyPath | str, split: str, split_number: int = 1, val_every: int = 5) -> ClipListing:
    """The clips of `split` (train, val or test) of official split `split_number`."""
    if split_number not in (1, 2, 3):
        raise BadDataRoot(f"UCF-101 has splits 1, 2 and 3, not {split_number}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}")
    root = input_path(root)
    classes = read_class_index(root)
    index = {name: i for i, name in enumerate(classes)}
    kind = "test" if split == "test" else "train"
    path = root / LIST_DIR / f"{kind}list{split_number:02d}.txt"
    if not path.is_file():
        raise BadDataRoot(f"{path}: split list not found")
    lines = _lines(path)
    present = clips_on_disk(root / VIDEO_DIR)  # one listing, not one request per listed clip
    clips, problems, missing, listed = [], [], [], []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        where = f"{path.name}:{number}"
        if len(parts) not in (1, 2):
            problems.append(f"{where}: expected '<Class>/<clip>.avi [label]', got {line!r}")
            continue
        rel = parts[0]
        folder, _, name = rel.partition("/")
        match = NAME.match(name)
        # the official lists spell one class two ways (HandstandPushups/v_HandStandPushups_...)
        if not match or match["cls"].lower() != folder.lower() or folder not in index:
            problems.append(f"{where}: {rel!r} is not <Class>/v_<Class>_gXX_cYY.avi of a class in {CLASS_INDEX}")
            continue
        label = index[folder]
        if len(parts) == 2 and (not parts[1].isdigit() or int(parts[1]) - 1 != label):
            problems.append(f"{where}: label {parts[1]} does not match {folder} (index {label + 1} in {CLASS_INDEX})")
            continue
        listed.append((rel, present.get(f"{folder}/{name}"), label, folder, int(match["group"])))
    if kind == "train":
        held_out = _validation_groups({entry[4] for entry in listed},
                                      {entry[4] for entry in listed if entry[1] is not None}, val_every)
        if held_out.note and split == "val":
            problems.append(held_out.note)
        listed = [entry for entry in listed if (entry[4] in held_out.groups) == (split == "val")]
    for rel, clip_path, label, folder, group in listed:
        if clip_path is None:
            missing.append(rel)
            continue
        clips.append(Clip(path=clip_path, label=label, class_name=folder, group=group))
    if missing:
        problems.append(f"{path.name}: {len(missing)} listed {split} clips not on disk (partial download?), "
                        f"e.g. {', '.join(missing[:3])}")
    return ClipListing(clips=clips, problems=problems)


@dataclass
class _HeldOut:
    groups: set[int]
    note: str | None = None


def _validation_groups(listed: set[int], present: set[int], val_every: int) -> _HeldOut:
    """The train groups that form the validation split: every val_every-th group (g05, g10, ...);
    when none of those has a clip on disk (a partial download), every val_every-th of the groups
    present instead (at least one, if two are present), said in one line."""
    usual = {g for g in listed if g % val_every == 0}
    if usual & present or len(present) < 2:
        return _HeldOut(usual)
    ordered = sorted(present)
    chosen = set(ordered[val_every - 1::val_every]) or {ordered[-1]}
    return _HeldOut(chosen, f"no train clips on disk in groups g{val_every:02d}, g{2 * val_every:02d}, ...: "
                            f"validation takes group(s) {', '.join(f'g{g:02d}' for g in sorted(chosen))} of the "
                            f"{len(ordered)} train groups present")


def clips_on_disk(video_dir: AnyPath) -> dict[str, AnyPath]:
    """{"<Class>/<clip>": path} of every file one folder below `video_dir`, from one listing of
    the tree on an object store (one listing per class folder locally); {} when there is none."""
    found: dict[str, AnyPath] = {}
    try:
        if isinstance(video_dir, StoragePath):
            for path in video_dir.files():  # recursive: one paged listing, each child keeps its stat
                rel = path.relative_to(video_dir).parts
                if len(rel) == 2:
                    found["/".join(rel)] = path
        else:
            for folder in video_dir.iterdir():
                if folder.is_dir():
                    found.update({f"{folder.name}/{p.name}": p for p in folder.iterdir() if p.is_file()})
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return found


def _lines(path: AnyPath) -> list[str]:
    """Non-empty lines, with CRLF or LF endings and an optional UTF-8 byte-order mark."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:  # listed a moment ago: gone, no permission, or the store refused
        raise BadDataRoot(str(unreadable(path, err))) from None
    except UnicodeDecodeError:
        raise BadDataRoot(f"{path}: not a UTF-8 text file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
