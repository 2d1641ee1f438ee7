"""Captions (pure functions): tags, the trigger word, per-step shuffle and dropout, side-car files, tag counts."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from .options import DatasetError


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def place_trigger_word(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word first, unless it already starts with it.

    "Starts with" means the caption equals the trigger word or continues after it with a comma or a
    space ("sks, dog", "sks dog"); a missing caption becomes the trigger word alone.
    """
    caption = caption.strip()
    trigger_word = trigger_word.strip()
    if not trigger_word:
        return caption
    if not caption:
        return trigger_word
    if caption.startswith(trigger_word) and (len(caption) == len(trigger_word)
                                             or caption[len(trigger_word)] in ", "):
        return caption
    return f"{trigger_word}, {caption}"


def caption_for_step(caption: str, rng: random.Random, trigger_word: str = "",
                     shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0) -> str:
    """The caption used for one training step.

    1. Dropout (drawn first, only when ``dropout > 0``): with probability ``dropout`` the step's
       caption is "" (kohya's caption_dropout_rate; the trigger word is dropped too).
    2. The trigger word is put first (:func:`place_trigger_word`).
    3. Shuffle (only when ``shuffle``): the comma-separated tags after the first ``keep_tokens`` are
       shuffled. ``keep_tokens`` counts tags of the caption *with the trigger word already first*,
       so ``keep_tokens=1`` keeps the trigger word in front (as kohya does when the trigger word is
       written in the caption files). Tags are re-joined with ", ".
    No shuffle and no dropout: the caption is deterministic and ``rng`` is not used.
    """
    if dropout > 0.0 and rng.random() < dropout:
        return ""
    text = place_trigger_word(caption, trigger_word)
    if not shuffle:
        return text
    tags = split_tags(text)
    kept, shuffled = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)


def read_caption(path: Path) -> str | None:
    """The caption in a side-car file: its first non-empty line, stripped; None when there is no file.

    Like kohya, only the first line is used. Files are UTF-8 (a BOM is accepted).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DatasetError(f"caption file {str(path)!r} cannot be read: {error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"caption file {str(path)!r} is not UTF-8 text ({error}): "
                           f"save it as UTF-8") from error
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def tag_frequency(groups: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {group (folder name): {tag lower-cased: images with it}}."""
    frequency: dict[str, dict[str, int]] = {}
    for group, caption in groups:
        counts = frequency.setdefault(group, {})
        for tag in split_tags(caption):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return frequency
