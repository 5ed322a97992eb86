"""The everyday chat tasks shipped with the package (``assets/tasks/everyday.jsonl``).

Requests whose answers reuse their input or earlier answers: edit or refactor
given code, fix given text, reformat given data, answer from a given document,
write SQL over a given schema, and an agent-like tool loop. They were written
for specjax (none comes from a dataset or from the embedded model's training
corpus) and are what ``specjax generate`` runs a chat model on by default.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from specjax.models.chat import ChatTemplateError, validate_messages

EVERYDAY_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tasks", "everyday.jsonl")


def load_tasks(path: Optional[str] = None) -> list[dict]:
    """Tasks as dicts with ``id``, ``category``, ``messages`` and ``max_new_tokens``; a malformed
    line is an error naming the line."""
    path = path or EVERYDAY_TASKS
    tasks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                tasks.append(_task(json.loads(line), f"{path}:{number}"))
    ids = [t["id"] for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: task ids repeat: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return tasks


def _task(raw: dict, where: str) -> dict:
    for key, kind in (("id", str), ("category", str), ("messages", list), ("max_new_tokens", int)):
        if not isinstance(raw.get(key), kind):
            raise ValueError(f"{where}: a task needs {key!r} ({kind.__name__}), got {raw.get(key)!r:.60}")
    if raw["max_new_tokens"] < 1:
        raise ValueError(f"{where}: max_new_tokens must be >= 1, got {raw['max_new_tokens']}")
    try:
        return dict(raw, messages=validate_messages(raw["messages"]))
    except ChatTemplateError as e:
        raise ValueError(f"{where}: {e}") from e
