"""The layout's rules, read from the code: only nodes/comfy/ imports ComfyUI's modules; the node modules
may use ComfyUI's public comfy_api; training/ is ComfyUI-agnostic."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution")


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_comfy_package_imports_comfyui_and_training_imports_no_comfy_api():
    runtime = sorted([*(ROOT / "training").rglob("*.py"), *(ROOT / "nodes").rglob("*.py"), ROOT / "__init__.py"])
    assert len(runtime) > 40
    wrong = []
    for path in runtime:
        roots = imported_roots(path)
        inside_bridge = (ROOT / "nodes" / "comfy") in path.parents
        if roots & set(COMFYUI_MODULES) and not inside_bridge:
            wrong.append(f"{path.relative_to(ROOT)} imports {sorted(roots & set(COMFYUI_MODULES))}")
        if "comfy_api" in roots and (ROOT / "training") in path.parents:
            wrong.append(f"{path.relative_to(ROOT)} imports comfy_api")
    assert not wrong, wrong
