"""The workspace's YAML files, validated by pydantic: what every schema shares, and how a file is loaded.

Each stage's schema lives next to the stage (SECTIONS names them; a stage of your own adds its section):

configs/forge_config.yaml      forge/config.py    ForgeConfig       (the Data Forge)
configs/train_config.yaml      kernel/config.py   TrainConfig       (the training kernel; Axolotl's key names) and the
                                                                    keys the training recipes share (LoraKeys, ...)
configs/eval_config.yaml       judge/config.py    EvalConfig        (the Judge)
configs/cpt_config.yaml        cpt/config.py      CptConfig         (continued pre-training)
configs/preference_config.yaml prefs/config.py    PreferenceConfig  (preference pairs and DPO/ORPO)
configs/export_config.yaml     export/config.py   ExportConfig      (exports and their round-trip check)
configs/launch_config.yaml     launch/config.py   LaunchConfig      (`opensem launch --cloud`)
configs/pipeline_config.yaml   here               PipelineConfig    (the stages `opensem run` runs)

Here: ``Strict`` (every schema's base: unknown keys are errors), ``LLMSpec`` (a teacher or judge endpoint),
prices, the sections, renamed keys, and the loader. Unknown keys, wrong types and out-of-range values fail
before any work starts, with the file, the dotted key path and, for a misspelled key, the closest valid one.
Any value can be overridden from the command line with ``--set train.learning_rate=1e-4`` (the first part names
the file).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from opensem.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"


class Strict(BaseModel):
    # allow_inf_nan: `.inf` or `.nan` for a number is a config error naming the key, never an OverflowError later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------------
# Teacher / judge model endpoint (shared by the forge and the judge)
# --------------------------------------------------------------------------------------------------
class LLMSpec(Strict):
    """A chat model the tool talks to: a hosted API, an OpenAI-compatible server, or an in-process model."""

    provider: str = Field("local", description="openai, openai-compatible, anthropic, local, a plugin's name, or package.module:Class")
    model: Optional[str] = Field(None, description="Model name; defaults per provider")
    base_url: Optional[str] = Field(None, description="For openai-compatible (Ollama, vLLM, LM Studio...)")
    api_key_env: Optional[str] = Field(None, description="Name of the environment variable with the key")
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=1, le=200_000)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0, le=50)
    concurrency: int = Field(8, ge=1, le=256)
    requests_per_minute: Optional[int] = Field(None, ge=1)
    tokens_per_minute: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "LLMSpec":
        cls = self.provider_class()  # ValueError: unknown provider, listing the known ones
        if cls.needs_base_url and not self.base_url:
            raise ValueError(f"provider '{self.provider}' needs base_url (e.g. http://localhost:11434/v1)")
        return self

    def provider_class(self):
        from opensem.llm.registry import provider_class

        return provider_class(self.provider)

    def in_process(self) -> bool:
        """A model in this process: free, and its own tokenizer counts the prompts."""
        return self.provider_class().in_process

    def resolved_model(self) -> str:
        return self.model or self.provider_class().default_model

    def resolved_key_env(self) -> Optional[str]:
        return self.api_key_env or self.provider_class().key_env


class Price(Strict):
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # USD per million tokens, list prices; edit forge_config.yaml `cost.prices` to change or add.
    "gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.60},
    "gpt-4o": {"input_per_mtok": 2.50, "output_per_mtok": 10.00},
    "gpt-4.1-mini": {"input_per_mtok": 0.40, "output_per_mtok": 1.60},
    "gpt-4.1": {"input_per_mtok": 2.00, "output_per_mtok": 8.00},
    "claude-3-5-haiku-latest": {"input_per_mtok": 0.80, "output_per_mtok": 4.00},
    "claude-sonnet-4-5": {"input_per_mtok": 3.00, "output_per_mtok": 15.00},
}


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------
class PipelineConfig(Strict):
    stages: list[str] = Field(
        default_factory=lambda: ["forge", "baseline", "train", "fine-tuned"],
        description="What `opensem run` runs, in order: forge, baseline, cpt, train, fine-tuned, pairs, preference, preferred, "
        "or package.module:attribute",
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one stage")
        bad = [x for x in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*(:[A-Za-z_][A-Za-z0-9_]*)?", x)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a stage name (a registered stage, or package.module:attribute)")
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"stage(s) listed twice: {', '.join(dup)}")
        return v


@dataclass(frozen=True)
class Section:
    """One config file: its name (the first part of a ``--set`` key), its file in the workspace, its schema (a
    pydantic model, or ``"package.module:Class"``, imported on first use)."""

    name: str
    file: str
    schema: Union[type[BaseModel], str]

    @property
    def model(self) -> type[BaseModel]:
        if isinstance(self.schema, str):
            import importlib

            module, _, attr = self.schema.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.schema


# The built-in sections; each schema lives next to its stage and is imported when first used.
SECTIONS: dict[str, Section] = {s.name: s for s in (
    Section("forge", "configs/forge_config.yaml", "opensem.forge.config:ForgeConfig"),
    Section("train", "configs/train_config.yaml", "opensem.kernel.config:TrainConfig"),
    Section("eval", "configs/eval_config.yaml", "opensem.judge.config:EvalConfig"),
    Section("cpt", "configs/cpt_config.yaml", "opensem.cpt.config:CptConfig"),
    Section("preference", "configs/preference_config.yaml", "opensem.prefs.config:PreferenceConfig"),
    Section("export", "configs/export_config.yaml", "opensem.export.config:ExportConfig"),
    Section("launch", "configs/launch_config.yaml", "opensem.launch.config:LaunchConfig"),
    Section("pipeline", "configs/pipeline_config.yaml", "opensem.config:PipelineConfig"),
)}


def register_section(section: Section) -> None:
    """A stage's own config section (stages.py: ``config_section``): its file and ``--set`` keys become known."""
    known = SECTIONS.get(section.name)
    if known is not None and known != section:
        raise ConfigError(f"config section {section.name!r} is already {known.file} ({known.model.__name__}): "
                          f"give the stage's section another name")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", section.name):
        raise ConfigError(f"config section {section.name!r}: use lower-case letters, digits and _ (it is a --set prefix)")
    SECTIONS[section.name] = section


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# --------------------------------------------------------------------------------------------------
def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at the place ``loc`` (the path to the unknown key) in the model tree."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = _model_in(ann)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}).keys())


def _model_in(ann: Any) -> Optional[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found:
            return found
    return None


def format_validation_error(err: ValidationError, file: str, model: type[BaseModel],
                            overrides: Optional[dict[tuple, str]] = None) -> str:
    """One line naming where the bad value came from: the file and key, or the --set flag that set it."""
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    for keys, text in (overrides or {}).items():
        if tuple(str(p) for p in loc[: len(keys)]) == keys:
            file = f"--set {text}"
            break
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "extra_forbidden":
        candidates = _valid_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), candidates, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(candidates)}"
        return f"{file}: unknown key '{key}': {hint}{more}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{file}: key '{key}': {msg}{shown}{more}"


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """``train.learning_rate=1e-4`` -> ("train", ["learning_rate"], 0.0001)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. train.learning_rate=1e-4")
    path, raw = text.split("=", 1)
    parts = [p for p in path.strip().split(".") if p]
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"--set {text!r}: the key must start with one of {', '.join(SECTIONS)} (e.g. train.num_epochs=2)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {text[:60]!r}...: nested too deeply to be a config value") from None
    return parts[0], parts[1:], value


def _apply(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}): keep one", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    from opensem.encoding import read_text

    try:
        data = yaml.load(read_text(path), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML: {getattr(e, 'problem', e)}") from e
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config: a config is a few levels of keys") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


# Renamed keys, one line each: "section.old.path": "new.path" (a path inside the same section). A config file or --set that
# still uses the old name keeps working, with a warning naming the new one; the line goes two releases later. A key
# renamed in a schema gets its line here in the same change.
RENAMED_KEYS: dict[str, str] = {}


def _get(data: dict, keys: list[str]) -> tuple[bool, Any]:
    node: Any = data
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False, None
        node = node[k]
    return True, node


def _pop(data: dict, keys: list[str]) -> None:
    node = data
    for k in keys[:-1]:
        node = node[k]
    del node[keys[-1]]


def renamed(section: str, data: dict, where: str, warn: Callable[[str], None]) -> dict:
    """``data`` with every old key of ``section`` moved to its new name (RENAMED_KEYS); both set is an error."""
    for old, new in RENAMED_KEYS.items():
        sec, _, old_path = old.partition(".")
        if sec != section:
            continue
        found, value = _get(data, old_path.split("."))
        if not found:
            continue
        if _get(data, new.split("."))[0]:
            raise ConfigError(f"{where}: key '{old_path}' is the old name of '{new}', and both are set: keep '{new}' only")
        _pop(data, old_path.split("."))
        _apply(data, new.split("."), value)
        warn(f"{where}: key '{old_path}' is now '{new}': rename it (the old name will stop working)")
    return data


def renamed_path(section: str, keys: list[str], where: str, warn: Callable[[str], None]) -> list[str]:
    """A ``--set`` key path under its new name, when it (or a key above it) was renamed."""
    for old, new in RENAMED_KEYS.items():
        sec, _, old_path = old.partition(".")
        n = len(old_path.split("."))
        if sec == section and keys[:n] == old_path.split("."):
            warn(f"{where}: key '{old_path}' is now '{new}': use the new name (the old one will stop working)")
            return new.split(".") + keys[n:]
    return keys


_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """Once per message and process (configs are read more than once by a command)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    from opensem.terminal import Console

    Console(stderr=True).print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True, markup=True)


def load_section(section: str, root: Path, overrides: list[str] | None = None, path: Path | None = None):
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}: use one of {', '.join(SECTIONS)}, or a stage's own section "
                          f"(its stage in configs/pipeline_config.yaml)")
    rel, model = SECTIONS[section].file, SECTIONS[section].model
    file = path or (root / rel)
    data = renamed(section, read_yaml(file), str(file), _warn)
    applied: dict[tuple, str] = {}
    for text in overrides or []:
        sec, keys, value = parse_override(text)
        if sec == section:
            keys = renamed_path(section, keys, f"--set {text}", _warn)
            _apply(data, keys, value)
            applied[tuple(keys)] = text
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ConfigError(f"{file}: nested too deeply to be a config: a config is a few levels of keys") from None
    except ValidationError as e:
        shown = file if file.exists() else f"{file} (defaults)"
        raise ConfigError(format_validation_error(e, str(shown), model, applied)) from None


def check_overrides(overrides: list[str] | None, root: Path | None = None) -> None:
    """Every ``--set`` well formed and naming a known section. A section no built-in has may be a stage's own: the
    workspace's pipeline stages are loaded first (which registers their sections) when ``root`` is given."""
    def section_of(text: str) -> str:
        return text.split("=", 1)[0].strip().split(".", 1)[0]

    if root is not None and any(section_of(t) not in SECTIONS for t in overrides or []):
        from opensem.stages import load_stage

        try:
            names = load_section("pipeline", root, [t for t in overrides or [] if section_of(t) == "pipeline"]).stages
        except ConfigError:
            names = []  # the pipeline config's own error comes when it is used
        for name in names:
            try:
                load_stage(name)
            except ConfigError:
                pass
    for text in overrides or []:
        parse_override(text)
