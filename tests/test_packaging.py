"""The distribution: folders stay top-level in the repository and land under one import root in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
# Only the checkout itself is hidden: a venv may live inside it (CI keeps .venv in the clone).
sys.path = [p for p in sys.path if p not in ("", {root!r})]
sys.path.insert(0, {target!r})
import leap_dspy, leap_dspy.signatures, leap_dspy.programs, leap_dspy.envs.alfworld, leap_dspy.envs.webshop
import leap_dspy.envs.intercode, leap_dspy.cli, leap_dspy.teleprompt
for module in (leap_dspy, leap_dspy.signatures, leap_dspy.programs, leap_dspy.envs.alfworld):
    assert module.__file__.startswith({target!r}), module.__file__
print("ok", leap_dspy.LEAP.__name__)
"""


def test_wheel_maps_the_top_level_folders_under_leap_dspy(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist),
                    str(ROOT)], check=True)
    wheel = next(dist.glob("leap_dspy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("leap_dspy/signatures/__init__.py", "leap_dspy/programs/student.py",
                     "leap_dspy/envs/base.py", "leap_dspy/envs/alfworld/env.py", "leap_dspy/envs/webshop/env.py",
                     "leap_dspy/envs/intercode/sandbox.py", "leap_dspy/teleprompt.py"):
        assert expected in names, expected
    top = {name.split("/")[0] for name in names}
    assert not top & {"envs", "programs", "signatures", "tests", "bench"}, top
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "leap-dspy = leap_dspy.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    check = CHECK.format(target=str(target), root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok LEAP"


def test_importing_leap_dspy_keeps_litellm_and_dspy_price_lists_off_the_network() -> None:
    """Both fetch a model price list from GitHub when first used (retrying, with warnings, where there is no
    network); leap-dspy runs offline on the copies they ship."""
    import os

    code = ("import leap_dspy, dspy\nfrom dspy.clients import model_metadata\n"
            "print(model_metadata.source_info()['source'], model_metadata.source_info()['is_env_forced'])")
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["local", "True"] and "refresh failed" not in done.stderr
