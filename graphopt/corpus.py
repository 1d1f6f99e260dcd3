"""Where the shared English corpus lives. Read from ../shared/corpus (never copied in)."""
from __future__ import annotations

import os

from .errors import GraphoptError


def corpus_dir() -> str:
    env = os.environ.get("GRAPHOPT_CORPUS_DIR")
    candidates = [env] if env else []
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates += [os.path.join(repo, "..", "shared", "corpus"), os.path.join(os.getcwd(), "..", "shared", "corpus")]
    for path in candidates:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    raise GraphoptError("corpus not found: set GRAPHOPT_CORPUS_DIR or place shared/corpus beside the repository")


def corpus_file(name: str) -> str:
    path = os.path.join(corpus_dir(), name)
    if not os.path.isfile(path):
        raise GraphoptError(f"corpus file {path} not found")
    return path


def read_text(name: str, max_chars: int | None = None) -> str:
    with open(corpus_file(name), encoding="utf-8") as f:
        return f.read(max_chars) if max_chars else f.read()
