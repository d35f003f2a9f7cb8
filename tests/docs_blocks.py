"""The fenced blocks of README.md and docs/*.md, and the ``docs-test`` notes next to them.

A fenced block may be preceded (directly, no blank line) by an HTML comment that tells the docs
test (tests/test_docs_run.py) how to run it; readers of the rendered page do not see it::

    <!-- docs-test
    add fortify train: train.epochs=1 data.train_subset=128    tiny size of the command
    skip fortify import: needs the released checkpoint (a download; no network here)
    exit fortify eval: 0,3                                     exit codes that are not errors
    vars RUN=runs/at-fsr SLURM_ARRAY_TASK_ID=0,1               placeholders ($X, ${X}, RUN)
    uses runs/at=at runs/at-fsr=at-fsr                         shared tiny runs to copy in
    given model=at-model x=test-x y=test-y                     names a Python snippet reads
    replace "train.epochs=2"] => "train.epochs=1"]             text swapped before running
    -->

``add``/``skip``/``exit`` apply to the commands of the block that start with the prefix before
the colon (``skip: reason`` alone skips a whole Python block). Every ``skip`` needs a reason, and
every note must apply to something in its block, so a stale note fails the test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOTE = re.compile(r"<!-- docs-test\b((?:(?!-->).)*)-->\n\Z", re.S)
KINDS = ("add", "skip", "exit", "vars", "uses", "given", "replace")


@dataclass
class Note:
    kind: str
    prefix: str  # add/skip/exit: command prefix ("" = whole block)
    value: str
    used: bool = False


@dataclass
class Block:
    where: str  # "docs/rift.md:10"
    doc: str  # "docs/rift.md"
    lang: str
    body: str
    notes: list[Note] = field(default_factory=list)

    def notes_of(self, kind: str) -> list[Note]:
        return [n for n in self.notes if n.kind == kind]

    def note_for(self, kind: str, line: str) -> Note | None:
        for n in self.notes_of(kind):
            if line.startswith(n.prefix) or (not n.prefix and self.lang == "python"):
                n.used = True
                return n
        return None

    def commands(self) -> list[str]:
        """Shell lines that run fortify (``fortify ...``, ``torchrun ... fortify.cli.main``)."""
        out = []
        for line in self.body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if line.startswith("fortify ") or line == "fortify" or "fortify.cli.main" in line:
                out.append(line)
        return out


def _parse_notes(text: str, where: str) -> list[Note]:
    notes = []
    for raw in text.strip().splitlines():
        raw = raw.strip()
        if not raw:
            continue
        kind, _, rest = raw.partition(" ")
        if kind.rstrip(":") not in KINDS:
            raise ValueError(f"{where}: unknown docs-test note {raw!r} (one of {KINDS})")
        whole_block = kind.endswith(":")
        kind = kind.rstrip(":")
        if whole_block:
            notes.append(Note(kind, "", rest.strip()))
        elif kind in ("add", "skip", "exit"):
            prefix, sep, value = rest.partition(":")
            if not sep:
                raise ValueError(f"{where}: {kind} needs 'PREFIX: VALUE', got {raw!r}")
            notes.append(Note(kind, prefix.strip(), value.strip()))
        else:
            notes.append(Note(kind, "", rest.strip()))
    return notes


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        for m in FENCE.finditer(text):
            where = f"{rel}:{text.count(chr(10), 0, m.start()) + 1}"
            note = NOTE.search(text[max(0, m.start() - 2000) : m.start()])
            notes = _parse_notes(note[1], where) if note else []
            out.append(Block(where, rel, m[1], m[2], notes))
    return out
