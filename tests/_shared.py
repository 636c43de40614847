"""Where the reference data is: ``../shared`` beside the repository (the authors' certification TSVs,
the one-step oracle of their code, real MNIST/CIFAR-10).

Found, in order: ``$SMOOTHMIX_SHARED``; ``shared/`` beside this checkout (by the path as given and
as resolved through symbolic links); ``shared/`` beside the main checkout when this is a git
worktree. Tests that need it call :func:`require`: without the data they are skipped, unless
``SMOOTHMIX_REQUIRE_SHARED=1`` (set by ``.ci/run``), where a missing file fails the test — so the
reference-parity tests cannot silently stop running in CI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).absolute().parents[1]


def _git_main_checkout() -> Path | None:
    """The main checkout of a git worktree (``git rev-parse --git-common-dir``/..), if any."""
    try:
        done = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                              cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(done.stdout.strip()).parent if done.returncode == 0 and done.stdout.strip() else None


def _find_shared() -> Path:
    if os.environ.get("SMOOTHMIX_SHARED"):
        return Path(os.environ["SMOOTHMIX_SHARED"])
    candidates = [REPO.parent / "shared", REPO.resolve().parent / "shared"]
    main = _git_main_checkout()
    if main is not None:
        candidates.append(main.parent / "shared")
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED = _find_shared()


def require(path: Path) -> Path:
    """``path`` (under SHARED) if it exists; otherwise skip the test — or fail it in CI."""
    if path.exists():
        return path
    message = (f"{path} is missing: the reference data lives in ../shared beside the repository "
               f"(or set SMOOTHMIX_SHARED)")
    if os.environ.get("SMOOTHMIX_REQUIRE_SHARED") == "1":
        pytest.fail(message)
    pytest.skip(message)
