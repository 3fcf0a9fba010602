"""Generated file systems and template tasks over them, for InterCode-Bash (as spider.py's questions are for SQL).

The 24 shipped tasks make one episode 4 points, and nl2bash's tasks share few command shapes, so neither tells
whether a student carries what it learned to a folder tree it has never seen. File system `k` is a small tree
under a root of its own (`/data`, `/srv`, ...) with its own folder and file names, drawn from
`random.Random(k)` (the same on every machine); its tasks ask for commands of a dozen shapes (count, head, grep,
find by extension, copy, ...). Half of the tasks that work on a file name it without its folder, so that the
student has to look (`ls`) before it acts: the partial observability LEAP's expert teaches around.
"""

from __future__ import annotations

import posixpath
import random
from collections.abc import Callable
from dataclasses import dataclass

PREFIX = "generated:"
"""A task's `setup` that names a generated file system: `generated:fs-7`."""

_ROOTS = ("/data", "/srv", "/projects", "/archive", "/lab", "/site", "/notes", "/build", "/media", "/reports",
          "/shared", "/studio", "/office", "/field", "/depot", "/vault")
_FOLDERS = ("docs", "logs", "src", "config", "scripts", "images", "backup", "music", "papers", "drafts",
            "invoices", "tests", "assets", "plans", "photos", "letters", "recipes", "mail", "old", "team")
_STEMS = ("todo", "report", "summary", "budget", "readme", "server", "access", "errors", "setup", "deploy",
          "colors", "cities", "animals", "fruits", "scores", "names", "inventory", "schedule", "contacts", "songs",
          "books", "tasks", "ideas", "results", "plan", "draft", "journal", "orders", "guests", "prices")
_EXTS = ("txt", "log", "csv", "md", "sh", "conf")
_WORDS = ("apple", "river", "green", "server", "error", "alpha", "delta", "orange", "cloud", "stone", "paper",
          "window", "tiger", "music", "garden", "silver", "rocket", "planet", "coffee", "yellow", "winter",
          "summer", "bridge", "forest", "ocean", "copper", "lemon", "falcon", "maple", "harbor")


@dataclass(frozen=True)
class FileSystem:
    root: str
    folders: tuple[str, ...]
    files: dict[str, tuple[str, ...]]
    """Path -> its lines."""

    def script(self) -> str:
        """The bash setup script that builds it (run inside the sandbox, as the shipped setup scripts are)."""
        lines = ["set -e"] + [f"mkdir -p {d}" for d in self.folders]
        for path, content in self.files.items():
            lines.append("printf '%s\\n' " + " ".join(f"'{line}'" for line in content) + f" > {path}")
            if path.endswith(".sh"):
                lines.append(f"chmod +x {path}")
        return "\n".join(lines) + "\n"


def file_system(k: int) -> FileSystem:
    """File system `k`: a root, 3 folders below it with up to 2 folders each, and 12 files of unique names."""
    rng = random.Random(k)
    root = rng.choice(_ROOTS)
    tops = rng.sample(_FOLDERS, 3)
    folders = [f"{root}/{t}" for t in tops]
    for top in list(folders):
        rest = [f for f in _FOLDERS if f not in tops]
        folders += [f"{top}/{s}" for s in rng.sample(rest, rng.randint(0, 2))]
    files = {}
    for stem in rng.sample(_STEMS, 12):
        ext = rng.choice(_EXTS)
        files[f"{rng.choice([root, *folders])}/{stem}.{ext}"] = _content(rng, ext)
    return FileSystem(root, tuple(folders), files)


def _content(rng: random.Random, ext: str) -> tuple[str, ...]:
    lines = []
    for _ in range(rng.randint(4, 12)):
        words = rng.sample(_WORDS, rng.randint(2, 4))
        if ext == "csv":
            lines.append(f"{words[0]},{rng.randint(1, 99)},{words[1]}")
        elif ext == "log":
            lines.append(f"{rng.choice(['INFO', 'WARN', 'ERROR'])} {' '.join(words)}")
        elif ext == "conf":
            lines.append(f"{words[0]}={words[1]}")
        else:
            lines.append(" ".join(words))
    return tuple(lines)


# A task shape: (instruction, gold command) for a file's path and lines, a folder, and the file system.
_Shape = Callable[[random.Random, str, tuple[str, ...], str, FileSystem], tuple[str, str]]


def _count_lines(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    return f"Count the lines in {p}.", f"wc -l < {p}"


def _count_words(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    return f"Count the words in {p}.", f"wc -w < {p}"


def _head(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    n = rng.randint(2, 3)
    return f"Print the first {n} lines of {p}.", f"head -n {n} {p}"


def _tail(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    n = rng.randint(2, 3)
    return f"Print the last {n} lines of {p}.", f"tail -n {n} {p}"


def _grep(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    word = _word_in(rng, lines)
    return f"Print the lines of {p} that contain the word {word}.", f"grep {word} {p}"


def _grep_count(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    word = _word_in(rng, lines)
    return f"How many lines of {p} contain the word {word}?", f"grep -c {word} {p}"


def _sort(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    return f"Sort the lines of {p} alphabetically.", f"sort {p}"


def _copy(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    return f"Copy {p} into the folder {d}.", f"cp {p} {d}/"


def _delete(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    return f"Delete the file {p}.", f"rm {p}"


def _list_ext(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    ext = p.rsplit(".", 1)[1]
    return f"List the .{ext} files under {fs.root}.", f"find {fs.root} -type f -name '*.{ext}'"


def _count_ext(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    ext = p.rsplit(".", 1)[1]
    return f"How many .{ext} files are there under {fs.root}?", f"find {fs.root} -type f -name '*.{ext}' | wc -l"


def _mkdir(rng: random.Random, p: str, lines: tuple[str, ...], d: str, fs: FileSystem) -> tuple[str, str]:
    new = f"{d}/{rng.choice([f for f in _FOLDERS if not any(x.endswith('/' + f) for x in fs.folders)])}"
    return f"Create the directory {new}.", f"mkdir {new}"


_ON_FILE = (_count_lines, _count_words, _head, _tail, _grep, _grep_count, _sort, _copy, _delete)
"""Shapes that work on one file: their instruction names it by its path, or by its name under the root."""
_ON_TREE = (_list_ext, _count_ext, _mkdir)


def _word_in(rng: random.Random, lines: tuple[str, ...]) -> str:
    words = sorted({w for line in lines for w in line.replace(",", " ").replace("=", " ").split() if w.isalpha()
                    and w.islower()})
    return rng.choice(words)


def tasks(k: int, n: int = 24) -> list[tuple[str, str]]:
    """`n` (instruction, gold command) pairs on file system `k`, each shape in turn, the files drawn by `k`."""
    fs = file_system(k)
    rng = random.Random(10_000 + k)
    shapes = list(_ON_FILE + _ON_TREE)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(n * 3):
        if len(out) == n:
            break
        shape = shapes[i % len(shapes)]
        path = rng.choice(sorted(fs.files))
        folder = rng.choice([f for f in fs.folders if f != posixpath.dirname(path)])
        query, gold = shape(rng, path, fs.files[path], folder, fs)
        if shape in _ON_FILE and rng.random() < 0.5:  # the file by its name alone: look first
            named = f"the file {posixpath.basename(path)} (somewhere under {fs.root})"
            query = query.replace(f"the file {path}", named, 1).replace(path, named, 1)
        if query not in seen:
            seen.add(query)
            out.append((query, gold))
    return out


def setup_script(name: str) -> str:
    """The setup script of `generated:fs-K`."""
    tail = name.removeprefix(PREFIX)
    if not tail.startswith("fs-") or not tail[3:].isdigit():
        raise ValueError(f"{name!r} is not a generated file system (expected {PREFIX}fs-<number>)")
    return file_system(int(tail[3:])).script()
