"""Label maps: which raw label id is which organ, and the compact organ indices used downstream.

Organ names are the currency of the whole package (prompts, pruning classes, metrics, model cards), so every
source of names goes through `organ_key`: lower-case snake_case (`"Right Kidney"` -> `"right_kidney"`).
A prepared label holds compact indices: 0 is background and k is `organ_names[k - 1]`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

_FLARE22 = (
    "liver", "kidney_right", "spleen", "pancreas", "aorta", "inferior_vena_cava", "adrenal_gland_right",
    "adrenal_gland_left", "gallbladder", "esophagus", "stomach", "duodenum", "kidney_left",
)
_BTCV = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
)
_SYNAPSE8 = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas")
# TotalSegmentator v2 `total` task (class_map_total_v2.json), ids 1..117 in this order.
_TOTALSEGMENTATOR = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
    "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3",
    "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
    "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3",
    "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4",
    "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk",
    "subclavian_artery_right", "subclavian_artery_left", "common_carotid_artery_right",
    "common_carotid_artery_left", "brachiocephalic_vein_left", "brachiocephalic_vein_right",
    "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left",
    "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left",
    "femur_right", "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right",
    "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull", "rib_left_1",
    "rib_left_2", "rib_left_3", "rib_left_4", "rib_left_5", "rib_left_6", "rib_left_7", "rib_left_8",
    "rib_left_9", "rib_left_10", "rib_left_11", "rib_left_12", "rib_right_1", "rib_right_2", "rib_right_3",
    "rib_right_4", "rib_right_5", "rib_right_6", "rib_right_7", "rib_right_8", "rib_right_9", "rib_right_10",
    "rib_right_11", "rib_right_12", "sternum", "costal_cartilages",
)
# TotalSegmentator `total_mr` task (class_map_total_mr.json), ids 1..50 in this order.
_TOTALSEGMENTATOR_MR = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_left", "lung_right", "esophagus", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "sacrum", "vertebrae", "intervertebral_discs",
    "spinal_cord", "heart", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
    "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right",
    "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right",
    "hip_left", "hip_right", "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
)

# Raw id -> organ name; None marks an id that is deliberately background (synapse8 drops 5 BTCV organs).
PRESETS: dict[str, dict[int, str | None]] = {
    "flare22": dict(enumerate(_FLARE22, 1)),
    "btcv": dict(enumerate(_BTCV, 1)),
    "synapse8": {i: (name if name in _SYNAPSE8 else None) for i, name in enumerate(_BTCV, 1)},
    "totalsegmentator": dict(enumerate(_TOTALSEGMENTATOR, 1)),
    "totalsegmentator_mr": dict(enumerate(_TOTALSEGMENTATOR_MR, 1)),
}

# What each preset is, for messages that ask the user to choose one.
PRESET_HELP = ("totalsegmentator (TotalSegmentator CT, class_map_total_v2)",
               "totalsegmentator_mr (TotalSegmentator MR, class_map_total_mr)", "flare22", "btcv", "synapse8")


def organ_key(name: str) -> str:
    """Canonical organ name: lower-case snake_case, so names from any file or folder compare equal."""
    key = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    if not key:
        raise ValueError(f"invalid organ name {name!r}")
    return key


def parse_label_names(labels: Mapping) -> dict[int, str | None]:
    """{id: name} from either the MSD form {"1": "liver"} or the nnU-Net v2 form {"liver": 1}."""
    if all(_is_int(key) for key in labels):
        pairs = [(int(key), name) for key, name in labels.items()]
    elif all(_is_int(value) for value in labels.values()):
        pairs = [(int(value), name) for name, value in labels.items()]
    else:
        raise ValueError(f"label names must map ids to names or names to ids, got {dict(labels)}")
    ids: dict[int, str | None] = {}
    for raw_id, name in pairs:
        if raw_id < 0:
            raise ValueError(f"label id {raw_id} is negative")
        ids[raw_id] = None if name is None or organ_key(str(name)) == "background" else str(name)
    return ids


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


@dataclass(frozen=True)
class LabelMap:
    """Raw label ids -> compact organ indices. Several ids may share one organ; id 0 is always background."""

    name: str
    organ_names: tuple[str, ...]
    index_of_id: Mapping[int, int]  # raw id -> compact index (0 = background)

    @classmethod
    def from_ids(cls, ids: Mapping[int, str | None], name: str) -> LabelMap:
        """Build from {raw id: organ name or None}; organs are ordered by their smallest raw id."""
        organ_names: list[str] = []
        index_of_id = {0: 0}
        for raw_id in sorted(ids):
            if ids[raw_id] is None:
                index_of_id[raw_id] = 0
                continue
            key = organ_key(ids[raw_id])
            if key not in organ_names:
                organ_names.append(key)
            index_of_id[raw_id] = organ_names.index(key) + 1
        if not organ_names:
            raise ValueError(f"label map {name!r} names no organ")
        return cls(name, tuple(organ_names), index_of_id)

    @property
    def dtype(self) -> np.dtype:
        """Smallest dtype that holds every compact index."""
        return np.dtype(np.uint8 if len(self.organ_names) < 256 else np.int16)

    def index(self, organ: str) -> int | None:
        """Compact index of an organ name (any spelling that `organ_key` maps to it), or None."""
        key = organ_key(organ)
        return self.organ_names.index(key) + 1 if key in self.organ_names else None

    def compact(self, raw: np.ndarray, ignore_unknown: bool = False, source: str = "label") -> np.ndarray:
        """Map a raw label array to compact indices with a lookup table; unknown ids raise unless ignored."""
        raw = np.asarray(raw)
        if not np.issubdtype(raw.dtype, np.integer):
            if raw.dtype == bool:
                raw = raw.astype(np.uint8)
            elif not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
                raise ValueError(f"{source}: label values must be integers, got non-integer {raw.dtype} values")
            else:
                raw = raw.astype(np.int64)
        low, high = int(raw.min()), int(raw.max())
        if low < 0:
            raise ValueError(f"{source}: negative label value {low}")
        top = max(self.index_of_id)
        lut = np.full(top + 2, -1, dtype=np.int16)  # the last entry stands for every id above the map
        for raw_id, index in self.index_of_id.items():
            lut[raw_id] = index
        out = lut[np.minimum(raw, top + 1) if high > top else raw]
        unknown = out < 0
        if unknown.any():
            ids = np.unique(raw[unknown])
            if not ignore_unknown:
                shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
                raise ValueError(
                    f"{source}: label ids {shown} are not in the label map {self.name!r} "
                    "(pass ignore_unknown_labels / --ignore-unknown-labels to treat them as background)"
                )
            out[unknown] = 0
        return out.astype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-ready description, recorded in a prepared dataset's metadata."""
        ids = {str(i): (self.organ_names[k - 1] if k else None) for i, k in sorted(self.index_of_id.items()) if i}
        return {"name": self.name, "organ_names": list(self.organ_names), "ids": ids}


def load_label_map(spec: str | Path | Mapping | LabelMap) -> LabelMap:
    """A preset name, a JSON/YAML file ({id: name}, {name: id}, or a dataset.json), a dict, or a LabelMap."""
    if isinstance(spec, LabelMap):
        return spec
    if isinstance(spec, Mapping):
        return LabelMap.from_ids(parse_label_names(spec), "custom")
    if str(spec).lower() in PRESETS:
        return LabelMap.from_ids(PRESETS[str(spec).lower()], str(spec).lower())
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown label map {str(spec)!r}: not a preset ({', '.join(PRESETS)}) nor an existing file")
    try:
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"cannot parse label map file {path}: {error}") from error
    if isinstance(data, Mapping) and isinstance(data.get("labels"), Mapping):
        data = data["labels"]  # an MSD / nnU-Net dataset.json
    if not isinstance(data, Mapping):
        raise ValueError(f"label map file {path} must hold a mapping {{id: name}}, got {type(data).__name__}")
    return LabelMap.from_ids(parse_label_names(data), str(path))
