"""The model catalogue (`models.toml`): limits, prices, aliases and tokenizers. Pure but for
reading the tokenizer files it names, once, at load.

`[[models]]` entries describe models the fleet serves: limits that override
or fill in what upstreams report, prices in USD per 1M tokens (kept for the
money caps), and the residency hints the fleet lifecycle reads. `[aliases]`
maps public names to model ids, so a client's default model name (Claude
Code asks for `claude-sonnet-4-5`) is served by an open-weight model. An
alias resolves before the estimate, the budget and routing.

A model may name its tokenizer, `tokenizer = "DIR/tokenizer.json"`, and
`tokenizer_config = "DIR/tokenizer_config.json"` for its chat template (by
default the sibling file; a relative path is from the catalogue file's
directory). cortex then counts that model's prompts exactly
(cortex/budget/exact_count.py). The files are read and the template
compiled here, at load, so a reload that would break counting is refused.

Every mistake is refused at load time with the key that is wrong: an alias
to an unknown model, an alias cycle, a duplicate id, a bad number, a
tokenizer file that is missing or not valid, a template that does not
compile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import tomlfile
from common.chat_template import TokenizerFiles, TokenizerFilesError, load_files

LIMIT_MAX = 2**40
COST_MAX_USD_PER_M = 1e6


class CatalogueError(ValueError):
    pass


@dataclass(frozen=True)
class Cost:
    input: float
    output: float
    cached_input: float | None = None

    def view(self) -> dict[str, float]:
        out = {"input": self.input, "output": self.output}
        if self.cached_input is not None:
            out["cached_input"] = self.cached_input
        return out


@dataclass(frozen=True)
class ModelDef:
    id: str
    display_name: str | None = None
    context_tokens: int | None = None
    output_tokens: int | None = None
    cost: Cost | None = None  # None: unpriced
    memory_mb: int | None = None
    residency_priority: int = 100
    pinned_on: tuple[str, ...] = ()
    max_in_flight_per_key: int | None = None  # None: fleet.max_in_flight_per_key
    # The model's tokenizer and chat template, loaded and checked; None: not named (the byte bound holds).
    tokenizer: TokenizerFiles | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Catalogue:
    models: dict[str, ModelDef] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # public name -> model id

    def resolve(self, name: str) -> str:
        """The model id a request for `name` is served by (itself if no alias)."""
        return self.aliases.get(name, name)

    def model(self, model_id: str) -> ModelDef | None:
        return self.models.get(model_id)


MODEL_KEYS = frozenset({
    "id", "display_name", "limit", "cost", "memory_mb", "residency_priority", "pinned_on", "max_in_flight_per_key",
    "tokenizer", "tokenizer_config",
})
IN_FLIGHT_PER_KEY_MAX = 1_000_000


def _positive_int(where: str, value: Any, maximum: int = LIMIT_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise CatalogueError(f"'{where}' must be an integer from 1 to {maximum}, got {value!r}")
    return value


def _price(where: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not 0 <= value <= COST_MAX_USD_PER_M:
        raise CatalogueError(f"'{where}' must be a price in USD per 1M tokens from 0 to {COST_MAX_USD_PER_M:g}, got {value!r}")
    return float(value)


def _table(where: str, value: Any, known: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CatalogueError(f"'{where}' must be a table, got {value!r}")
    for key in value:
        if key not in known:
            raise CatalogueError(f"unknown key '{where}.{key}' (known: {', '.join(sorted(known))})")
    return value


def _path(where: str, value: Any, base_dir: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise CatalogueError(f"'{where}' must be a file path, got {value!r}")
    path = os.path.expanduser(value)
    return path if os.path.isabs(path) or base_dir is None else os.path.join(base_dir, path)


def _tokenizer(where: str, entry: dict[str, Any], base_dir: str | None) -> TokenizerFiles | None:
    """The files `tokenizer` and `tokenizer_config` name, loaded; errors name the key and the file."""
    if "tokenizer" not in entry:
        if "tokenizer_config" in entry:
            raise CatalogueError(f"'{where}.tokenizer_config' needs '{where}.tokenizer' (the tokenizer.json)")
        return None
    tokenizer_path = _path(f"{where}.tokenizer", entry["tokenizer"], base_dir)
    config_path = _path(f"{where}.tokenizer_config", entry["tokenizer_config"], base_dir) if "tokenizer_config" in entry else None
    try:
        files = load_files(tokenizer_path, config_path, tokenizer_what=f"'{where}.tokenizer'",
                           config_what=f"'{where}.tokenizer_config'")
    except TokenizerFilesError as exc:
        raise CatalogueError(str(exc)) from None
    if files.template is None:
        raise CatalogueError(
            f"'{where}.tokenizer_config': {files.config_path or 'no tokenizer_config.json beside the tokenizer'} "
            "has no 'chat_template' (nor a chat_template.jinja beside it): a chat prompt cannot be counted"
        )
    return files


def _model(where: str, raw: Any, base_dir: str | None = None) -> ModelDef:
    entry = _table(where, raw, MODEL_KEYS)
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise CatalogueError(f"'{where}.id' is required and must be a non-empty string")
    name = entry.get("display_name")
    if name is not None and not isinstance(name, str):
        raise CatalogueError(f"'{where}.display_name' must be a string")
    limit = _table(f"{where}.limit", entry.get("limit", {}), frozenset({"context", "output"}))
    context = _positive_int(f"{where}.limit.context", limit["context"]) if "context" in limit else None
    output = _positive_int(f"{where}.limit.output", limit["output"]) if "output" in limit else None
    if context is not None and output is not None and output > context:
        raise CatalogueError(f"'{where}.limit.output' ({output}) is larger than its limit.context ({context})")
    cost = None
    if "cost" in entry:
        prices = _table(f"{where}.cost", entry["cost"], frozenset({"input", "output", "cached_input"}))
        for required in ("input", "output"):
            if required not in prices:
                raise CatalogueError(f"'{where}.cost.{required}' is required when a model has a cost")
        cached = _price(f"{where}.cost.cached_input", prices["cached_input"]) if "cached_input" in prices else None
        cost = Cost(_price(f"{where}.cost.input", prices["input"]), _price(f"{where}.cost.output", prices["output"]), cached)
    memory = _positive_int(f"{where}.memory_mb", entry["memory_mb"]) if "memory_mb" in entry else None
    priority = entry.get("residency_priority", 100)
    if not isinstance(priority, int) or isinstance(priority, bool) or not 0 <= priority <= 10_000:
        raise CatalogueError(f"'{where}.residency_priority' must be an integer from 0 to 10000, got {priority!r}")
    pinned = entry.get("pinned_on", [])
    if not isinstance(pinned, list) or not all(isinstance(p, str) and p for p in pinned):
        raise CatalogueError(f"'{where}.pinned_on' must be a list of upstream URLs")
    fair = entry.get("max_in_flight_per_key")
    fair = _positive_int(f"{where}.max_in_flight_per_key", fair, IN_FLIGHT_PER_KEY_MAX) if fair is not None else None
    tokenizer = _tokenizer(where, entry, base_dir)
    return ModelDef(model_id, name, context, output, cost, memory, priority, tuple(p.rstrip("/") for p in pinned), fair,
                    tokenizer)


def parse(data: Any, base_dir: str | None = None) -> Catalogue:
    """A TOML-shaped mapping -> a checked catalogue, or CatalogueError naming the key.
    Relative tokenizer paths are from `base_dir` (the catalogue file's directory), else the cwd."""
    top = _table("catalogue", data, frozenset({"models", "aliases"}))
    raw_models = top.get("models", [])
    if not isinstance(raw_models, list):
        raise CatalogueError("'models' must be an array of tables ([[models]])")
    models: dict[str, ModelDef] = {}
    for i, raw in enumerate(raw_models):
        model = _model(f"models[{i}]", raw, base_dir)
        if model.id in models:
            raise CatalogueError(f"'models[{i}].id': {model.id!r} is defined twice")
        models[model.id] = model
    raw_aliases = top.get("aliases", {})
    if not isinstance(raw_aliases, dict):
        raise CatalogueError("'aliases' must be a table of public name = model id")
    aliases: dict[str, str] = {}
    for name, target in raw_aliases.items():
        if not isinstance(target, str) or not target:
            raise CatalogueError(f"'aliases.{name}' must be a model id, got {target!r}")
        if name in models:
            raise CatalogueError(f"'aliases.{name}': {name!r} is already a model id")
        aliases[name] = target
    for name, target in aliases.items():
        seen = [name]
        while target in aliases:  # an alias of an alias is followed, a cycle refused
            if target in seen:
                raise CatalogueError(f"'aliases.{name}': the aliases form a cycle ({' -> '.join([*seen, target])})")
            seen.append(target)
            target = aliases[target]
        if target not in models:
            raise CatalogueError(f"'aliases.{name}': {target!r} is not a model in [[models]]")
    flat = {name: _final(aliases, name) for name in aliases}
    return Catalogue(models, flat)


def _final(aliases: dict[str, str], name: str) -> str:
    target = aliases[name]
    while target in aliases:
        target = aliases[target]
    return target


def load(path: str | Path) -> Catalogue:
    return parse(tomlfile.read(path, "the model catalogue", CatalogueError), os.path.dirname(os.path.abspath(path)))


def listing(served: list[dict[str, Any]], catalogue: Catalogue) -> list[dict[str, Any]]:
    """`/v1/models` entries: what healthy upstreams serve, with the catalogue's limits,
    names and prices, then every alias of a served model (`alias_of`)."""
    entries = []
    for entry in served:
        model = catalogue.model(entry["id"])
        if model is not None:
            entry = {**entry, "limit": apply_limits(entry["limit"], model)}
            if model.display_name:
                entry["display_name"] = model.display_name
            if model.cost is not None:
                entry["cost"] = model.cost.view()
        entries.append(entry)
    by_id = {e["id"]: e for e in entries}
    for name, target in sorted(catalogue.aliases.items()):
        if target in by_id:
            entries.append({**by_id[target], "id": name, "alias_of": target})
    return entries


def apply_limits(limit: dict[str, int], model: ModelDef) -> dict[str, int]:
    """The catalogue's limits override the upstreams' where it sets them."""
    context = model.context_tokens or limit["context"]
    output = min(model.output_tokens or limit["output"], context)
    return {"context": context, "output": output}
