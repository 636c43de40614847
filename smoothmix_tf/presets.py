"""The paper's training recipes as TOML presets (``smoothmix_tf/recipes/*.toml``, package data).

A preset is a ``TrainConfig`` in TOML: top-level fields plus an ``[objective]`` table. Any field can be
overridden with ``KEY=VALUE`` strings (``sigma=0.5``, ``objective.eta=2``); values are parsed as TOML.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from smoothmix_tf._checks import fail

RECIPES_FOLDER = "recipes"  # package data: one TOML file per preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def preset_dir() -> Path:
    """The folder of the preset TOML files: ``recipes/`` inside the installed package (the same
    folder in a source checkout, an editable install and a wheel)."""
    return Path(__file__).resolve().parent / RECIPES_FOLDER


def list_presets() -> dict[str, str]:
    """name -> one-line description (the first comment line of each file)."""
    out = {}
    for path in sorted(preset_dir().glob("*.toml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def read_preset_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise fail(f"preset file {path} does not exist", "Check the path passed to --preset-file.")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise fail(f"preset file {path} is not valid TOML ({e})", "Fix the syntax of that file.")


def load_preset(name: str) -> dict[str, Any]:
    """The configuration dict of the preset called ``name``."""
    path = preset_dir() / f"{name}.toml"
    if not path.exists():
        names = list(list_presets())
        close = [n for n in names if all(part in n for part in name.split("-")[:2])][:8]
        raise fail(f"unknown preset {name!r}",
                   "Run `smoothmix train --list-presets` to see them all"
                   + (f"; similar: {', '.join(close)}." if close else "."))
    return read_preset_file(path)


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides (dotted keys reach into tables; VALUE parsed as TOML)."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    for item in overrides:
        if "=" not in item:
            raise fail(f"override {item!r} is not KEY=VALUE",
                       "Write e.g. --set sigma=0.5 or --set objective.eta=2.")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare word: keep it as a string
        *parents, leaf = key.strip().split(".")
        target = config
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise fail(f"override {item!r}: {p!r} is not a table", "Check the key.")
        target[leaf] = value
    return config


def dumps_toml(config: dict[str, Any], comment: str = "") -> str:
    """Serialize a flat config with one-level tables (the preset format) as TOML."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"# {comment}"] if comment else []
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines += [f"{k} = {value(v)}" for k, v in config.items() if k not in tables and v is not None]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
