"""What changed since the last run in a run folder, from its recipe.lock.yaml and the new one.

An edited recipe is fine — job ids keep old and new apart — but a user re-running a folder
should hear what differs. Weights or init images that changed under the same name are worth
a loud warning: the folder then holds images made from other inputs under the same labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The lock's keys that decide neither pixels nor which jobs exist; every other key does.
_VIEW_KEYS = frozenset({"batchgen_version", "name", "recipe", "intermediates", "grids"})


@dataclass(frozen=True)
class LockChanges:
    changed: list[str] = field(default_factory=list)  # "strength: [0.4] → [0.4, 0.7]"
    content_changed: list[str] = field(default_factory=list)  # same name, other bytes

    def __bool__(self) -> bool:
        return bool(self.changed or self.content_changed)


def _as_list(value: Any) -> list[Any]:
    """Older locks hold one model as a mapping; newer ones a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _contents(entries: Any, name_key: str, content_key: str) -> dict[str, Any]:
    return {
        str(entry.get(name_key)): entry.get(content_key)
        for entry in _as_list(entries)
        if isinstance(entry, dict)
    }


def _short(value: Any, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def lock_changes(old: dict[str, Any], new: dict[str, Any]) -> LockChanges:
    """What differs between the lock of the last run (`old`, {} when there was none) and
    this run's."""
    if not old:
        return LockChanges()
    changes = LockChanges()
    for what, key, name_key, content_key in (
        ("model weights", "model", "reference", "identity"),
        ("refiner weights", "refiner", "reference", "identity"),
        ("VAE weights", "vae", "reference", "identity"),
        ("init image", "init_images", "path", "sha256"),
    ):
        before = _contents(old.get(key), name_key, content_key)
        after = _contents(new.get(key), name_key, content_key)
        for name in before.keys() & after.keys():
            if before[name] != after[name]:
                changes.content_changed.append(
                    f"the {what} behind `{name}` changed since the last run in this folder "
                    f"({before[name]} → {after[name]}): its jobs get new ids and are made "
                    "again; the images made before stay, made from the old content"
                )
    for key in new:
        # A key the last run's lock lacks came with a newer version, not with an edit.
        if key not in _VIEW_KEYS and key in old and old[key] != new[key]:
            changes.changed.append(f"{key}: {_short(old.get(key))} → {_short(new.get(key))}")
    return changes
