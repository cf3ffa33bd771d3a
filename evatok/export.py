"""One plain file per trained model, loadable by ``evatok`` alone.

A file is ``torch.save`` of a dict of plain types and tensors::

    {"format": 1, "kind": "tokenizer" | "router" | "ar",
     "config": {...dataclass fields...}, "state_dict": {...}, "meta": {...}}

so it loads with ``torch.load(weights_only=True)``: no pickled classes, no code execution on load
(the released EVATok checkpoints need ``weights_only=False``; ours never do). ``meta`` holds
provenance (MLflow run id, step, data digests) as strings and numbers only.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import IO, Any

import torch

FORMAT = 1

# kind -> (module, config class, model class). Imported lazily so loading a router does not
# import the AR model and vice versa.
KINDS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("evatok.tokenizer", "TokenizerConfig", "AdaptiveTokenizer"),
    "router": ("evatok.router", "RouterConfig", "Router"),
    "ar": ("evatok.ar", "ARConfig", "ARModel"),
    "classifier": ("evatok.classifier", "ClassifierConfig", "VideoClassifier"),
}


class ExportError(ValueError):
    pass


def _classes(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        raise ExportError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    mod_name, cfg_name, model_name = KINDS[kind]
    mod = importlib.import_module(mod_name)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def kind_of(model: torch.nn.Module) -> str:
    for kind, (mod_name, _, model_name) in KINDS.items():
        if type(model).__name__ == model_name and type(model).__module__ == mod_name:
            return kind
    raise ExportError(f"{type(model).__qualname__} is not an exportable evatok model")


def _plain(value: Any) -> Any:
    """Config values as plain Python types (tuples become lists, as YAML/JSON would have them)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ExportError(f"config value {value!r} ({type(value).__name__}) is not a plain type")


def to_payload(model: torch.nn.Module, meta: dict | None = None) -> dict:
    kind = kind_of(model)
    cfg = getattr(model, "config", None)
    if not dataclasses.is_dataclass(cfg):
        raise ExportError(f"{type(model).__name__} has no dataclass `.config` to export")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "kind": kind,
        "config": _plain(dataclasses.asdict(cfg)),
        "state_dict": state,
        "meta": _plain(meta or {}),
    }


# Config fields added after files were written, with the value that reproduces those older files' models
# (a default that changed meaning must not silently change an old model).
LEGACY: dict[str, dict[str, Any]] = {
    "TokenizerConfig": {"query_init": "first"},  # decoder queries seeded from the block's first token
}


def _build_config(cfg_cls: type, data: dict) -> Any:
    data = {**{k: v for k, v in LEGACY.get(cfg_cls.__name__, {}).items() if k not in data}, **data}
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ExportError(f"file has config keys {sorted(unknown)} unknown to {cfg_cls.__name__}")
    # Tuples were written as lists; give tuple-typed fields their tuples back.
    kwargs = {
        k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v
        for k, v in data.items()
    }
    return cfg_cls(**kwargs)


def from_payload(payload: dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError("not an evatok model file (missing or unknown 'format')")
    cfg_cls, model_cls = _classes(payload["kind"])
    model = model_cls(_build_config(cfg_cls, payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.export_meta = dict(payload.get("meta", {}))
    return model.to(map_location).eval()


def save_model(model: torch.nn.Module, f: str | Path | IO[bytes], meta: dict | None = None) -> None:
    """Write ``model`` to a local path or an open binary file (workflows pass storage streams)."""
    torch.save(to_payload(model, meta), f)


def load_payload(f: str | Path | IO[bytes]) -> dict:
    if isinstance(f, (str, Path)) and not Path(f).is_file():
        raise FileNotFoundError(f"model file not found: {f}")
    return torch.load(f, map_location="cpu", weights_only=True)


def load_model(f: str | Path | IO[bytes] | dict, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model written by :func:`save_model` (safe: ``weights_only=True``)."""
    payload = f if isinstance(f, dict) else load_payload(f)
    return from_payload(payload, map_location)
