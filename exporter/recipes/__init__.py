"""Recipes are data: an ordered list of passes with their configs, read from TOML.

Passes come in stages that must run in order: model passes change the torch checkpoint (pruning),
`export` turns it into a bundle, bundle passes rewrite the bundle (quantization), and checks judge the
final bundle (validate, eval) without changing it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from runtime.errors import KoedgeError

STAGES: dict[str, int] = {
    "prune-vocab": 0, "prune-structured": 0, "heal": 0,
    "export": 1,
    "quantize-int4": 2, "quantize-int8-static": 2,
    "validate": 3, "eval": 3,
}
STAGE_NAMES = ("model", "export", "bundle", "check")


@dataclass
class PassSpec:
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> int:
        return STAGES[self.name]


@dataclass
class Recipe:
    name: str
    description: str
    passes: list[PassSpec]

    def validate(self) -> None:
        """Unknown passes and orders that cannot work are refused before any work."""
        for spec in self.passes:
            if spec.name not in STAGES:
                raise KoedgeError(f"recipe '{self.name}': unknown pass '{spec.name}' (known: {', '.join(STAGES)})")
        names = [spec.name for spec in self.passes]
        if names.count("export") != 1:
            raise KoedgeError(f"recipe '{self.name}' needs exactly one 'export' pass")
        for before, after in zip(self.passes, self.passes[1:]):
            if after.stage < before.stage:
                raise KoedgeError(
                    f"recipe '{self.name}': '{after.name}' cannot come after '{before.name}' "
                    f"(order: pruning, export, quantization, then validate/eval)"
                )
        if "heal" in names and "prune-structured" not in names[: names.index("heal")]:
            raise KoedgeError(f"recipe '{self.name}': 'heal' needs a 'prune-structured' pass before it")
        if sum(spec.stage == 2 for spec in self.passes) > 1:
            raise KoedgeError(f"recipe '{self.name}': quantize once (INT8 static or INT4, not both)")


def parse_recipe(text: str, name: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise KoedgeError(f"recipe '{name}' is not valid TOML: {err}") from err
    raw_passes = data.get("passes")
    if not isinstance(raw_passes, list) or not raw_passes:
        raise KoedgeError(f"recipe '{name}' has no [[passes]]")
    passes = []
    for item in raw_passes:
        config = dict(item)
        pass_name = config.pop("pass", None)
        if not isinstance(pass_name, str):
            raise KoedgeError(f"recipe '{name}': every [[passes]] entry needs pass = \"...\"")
        passes.append(PassSpec(pass_name, config))
    recipe = Recipe(data.get("name", name), data.get("description", ""), passes)
    recipe.validate()
    return recipe


def shipped_recipes() -> list[str]:
    folder = resources.files("exporter") / "recipes"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise KoedgeError(f"recipe file not found: {path}")
        return parse_recipe(path.read_text(encoding="utf-8"), path.stem)
    shipped = resources.files("exporter") / "recipes" / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise KoedgeError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(shipped_recipes())}; or a .toml file)")
    return parse_recipe(shipped.read_text(encoding="utf-8"), name_or_path)
