"""lora_name cannot write outside models/loras, on POSIX or Windows; saving never replaces a file."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from lora_lab.training.network import kohya

TENSORS = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(3, 2),
           "lora_unet_x.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("name, fragment", [
    ("..", "'..'"), ("../x", "'..'"), ("..\\x", "'..'"), ("a\\..\\..\\x", "'..'"), ("styles/../../x", "'..'"),
    ("/abs/x", "absolute"), ("\\\\server\\share\\x", "absolute"), ("C:\\x", "absolute"), ("c:x", "absolute"),
    ("C:/loras/x", "absolute"), ("CON", "device name"), ("nul.safetensors", "device name"),
    ("styles/COM1", "device name"), ("lpt9.backup", "device name"), ("Aux/x", "device name"),
    ("name.", "end with '.'"), ("folder./x", "end with '.'"), ("x" * 201, "longer than"),
    ("a\tb", "forbid"), ("a\x7fb", "forbid"), ("what?", "forbid"), ("a*b", "forbid"), ('say"hi"', "forbid"),
    ("ab:c", "forbid"), ("a:b", "absolute"), ("a<b>", "forbid"), ("a|b", "forbid"), ("   ", "empty"), ("a/ /b", "empty folder"),
])
def test_names_that_escape_or_that_windows_cannot_store_are_refused(name, fragment):
    with pytest.raises(ValueError, match="lora_name") as caught:
        kohya.sanitize_lora_name(name)
    assert fragment in str(caught.value)
    assert "Use a plain name" in str(caught.value)           # every refusal says how to fix it


@pytest.mark.parametrize("name, expected", [
    ("  spaced name  ", "spaced name"), ("styles\\alice", "styles/alice"), ("styles / alice ", "styles/alice"),
    ("console", "console"), ("con_style", "con_style"), ("com10", "com10"), ("v1.5-style", "v1.5-style"),
    ("élan/日本語", "élan/日本語"), ("a..b", "a..b"),
])
def test_ordinary_names_are_kept_or_visibly_tidied(name, expected):
    assert kohya.sanitize_lora_name(name) == expected


def test_a_folder_link_that_points_outside_loras_is_refused(tmp_path):
    loras, outside = tmp_path / "loras", tmp_path / "elsewhere"
    loras.mkdir()
    outside.mkdir()
    (loras / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="resolves outside"):
        kohya.save_lora(TENSORS, {}, loras, "link/x")
    assert list(outside.iterdir()) == []


def test_without_hard_links_a_file_made_meanwhile_is_still_not_replaced(tmp_path, monkeypatch):
    """File systems without hard links (exFAT, some shares): the name is claimed with an exclusive create."""
    real_link = os.link

    def no_links(source, target):
        # Another program creates the chosen name just before we would take it (first try only).
        if not (tmp_path / "race.safetensors").exists():
            (tmp_path / "race.safetensors").write_bytes(b"theirs")
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    saved = kohya.save_lora(TENSORS, {}, tmp_path, "race")
    monkeypatch.setattr(os, "link", real_link)
    assert saved.name == "race_2.safetensors"
    assert (tmp_path / "race.safetensors").read_bytes() == b"theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["race.safetensors", "race_2.safetensors"]


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "not writable"),
                                       (errno.EROFS, "read-only")])
def test_a_failed_write_names_the_file_the_reason_and_the_fix_and_leaves_nothing(tmp_path, monkeypatch, code, fix):
    import safetensors.torch

    def failing(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(code, os.strerror(code), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(kohya.SaveError) as caught:
        kohya.save_lora(TENSORS, {}, tmp_path, "style")
    assert str(tmp_path / "style.safetensors") in str(caught.value) and fix in str(caught.value)
    assert caught.value.errno == code
    assert list(tmp_path.iterdir()) == []
