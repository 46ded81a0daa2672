"""Problems with a user's input, each naming the file, the line and the field, with a hint;
and YAML read so that every key and item knows its line."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from batchgen.errors import BatchgenError


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    field: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        text = (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class RecipeError(BatchgenError):
    """Bad input: one or more problems, all reported at once."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems

    def report(self) -> str:
        count = len(self.problems)
        lines = [f"error: {problem}" for problem in self.problems]
        return "\n".join([*lines, f"{count} problem{'s' if count != 1 else ''}; nothing was run"])


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


PathKey = tuple[str | int, ...]


def field_name(path: PathKey) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


class YamlDocument:
    """The parsed YAML and the line of every key and item in it."""

    def __init__(self, file: Path, text: str) -> None:
        self.file = file
        self.lines: dict[PathKey, int] = {}
        self.problems: list[Problem] = []
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = mark.line + 1 if mark else None
            reason = getattr(error, "problem", None) or str(error)
            self.problems.append(Problem(file, line, "", f"not valid YAML: {reason}"))
            self.data = None
            return
        if node is not None:
            self._index(node, ())

    def _index(self, node: yaml.Node, path: PathKey) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    self.problems.append(
                        Problem(
                            self.file,
                            key_node.start_mark.line + 1,
                            field_name((*path, key)),
                            "given twice; the later value would silently win",
                            "keep one",
                        )
                    )
                seen.add(key)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                self._index(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._index(item, (*path, index))

    def line(self, path: PathKey) -> int | None:
        """The line of `path`, or of its nearest parent written in the file; the document's
        own first line says nothing about a key that is missing, so that is None."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path) if path else None

    def problem(self, path: PathKey, message: str, hint: str | None = None) -> Problem:
        return Problem(self.file, self.line(path), field_name(path), message, hint)
