"""Where a model folder's transformer is, checked from the file system alone.

No torch or diffusers here: the command line calls it before importing them, so a mistyped
`--model` is answered at once.
"""

from __future__ import annotations

import json
from pathlib import Path


def checked_transformer_folder(path: Path) -> Path:
    """`path`, if it is a diffusers transformer folder (it has config.json); else FileNotFoundError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; expected a diffusers transformer folder "
                                f"(config.json and the weights), e.g. bench/assets/digits-dit")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json in it, so it is not a diffusers transformer "
                                f"folder (a pipeline folder has model_index.json instead)")
    return path


def pipeline_transformer_folder(path: Path) -> Path:
    """The `transformer/` folder that the pipeline folder at `path` lists in its model_index.json;
    FileNotFoundError or ValueError say what is missing."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{path}: no model_index.json there, so it is not a diffusers pipeline "
                                f"folder (one saved with DiffusionPipeline.save_pretrained)")
    index = json.loads(index_file.read_text())
    if not isinstance(index.get("transformer"), list) or index["transformer"][-1] is None:
        raise ValueError(f"{path}: the pipeline {index.get('_class_name')!r} has no transformer to quantize")
    return checked_transformer_folder(path / "transformer")


def transformer_folder(path: Path) -> Path:
    """The transformer folder of a pipeline folder (it has model_index.json), else `path` itself,
    checked as above."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return pipeline_transformer_folder(path)
    return checked_transformer_folder(path)
