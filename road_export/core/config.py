"""RoadConfig: peft's RoAd configuration, and its `adapter_config.json` form.

The fields, defaults and validation follow `peft.RoadConfig` so that code written against peft reads the same
here, and so that the JSON we write is loaded by `peft.PeftModel.from_pretrained` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from road_export.core.errors import RoadError

RoadVariant = Literal["road_1", "road_2", "road_4"]
VARIANTS: tuple[str, ...] = ("road_1", "road_2", "road_4")
CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "ROAD"


@dataclass
class RoadConfig:
    """Configuration of one RoAd adapter, field for field as `peft.RoadConfig`.

    `target_modules`: a list (exact name or dotted suffix match), a string (full regex match, or "all-linear"),
    or None (the architecture's default targets).
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: list[str] | set[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = set(self.target_modules)
        if self.variant not in VARIANTS:
            raise ValueError(
                f"Invalid variant {self.variant!r} specified. Please choose from road_1, road_2 or road_4"
            )
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 2 != 0:
            raise ValueError(
                f"The group_size must be a positive even number, but got {self.group_size!r}."
            )

    @property
    def peft_type(self) -> str:
        """Always "ROAD", as peft's `RoadConfig.peft_type` (`PeftType.ROAD`)."""
        return PEFT_TYPE

    def params_per_layer(self, out_features: int) -> int:
        """Length of road_theta (and road_alpha) for a layer of this width, as peft lays them out."""
        return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[self.variant]

    def to_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content peft writes for this config."""
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, set):
            data["target_modules"] = sorted(self.target_modules)
        data["peft_type"] = PEFT_TYPE
        data["auto_mapping"] = None
        data["peft_version"] = _peft_version()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "adapter config") -> RoadConfig:
        """A config from `adapter_config.json`'s content (unknown keys ignored, as peft's `from_peft_type` does).

        Raises RoadError naming `source` for another peft_type, a bad variant or an odd group size."""
        peft_type = data.get("peft_type")
        if peft_type != PEFT_TYPE:
            raise RoadError(
                f"{source}: peft_type is {peft_type!r}, not 'ROAD'; road-export only handles RoAd adapters"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as e:
            raise RoadError(f"{source}: {e}") from e

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RoadConfig:
        """Read `adapter_config.json` from an adapter directory (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise RoadError(f"{file}: no such file; an adapter directory holds {CONFIG_NAME}")
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RoadError(f"{file}: not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise RoadError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `adapter_config.json` (peft's layout, `to_dict`) into `directory`; returns the file. Callers that
        must not leave a half-written directory write into `road_export.graph.files.atomic_write`'s temporary path."""
        file = Path(directory) / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return file


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.18.0"
