"""The CVPR 2025 interactive 3D protocol: a box step, then five corrective clicks, scored per step.

Per case the participant's program runs six times, each a fresh process on `inputs/<case>.npz` writing
`outputs/<case>.npz` (`segs`). Before each of the five click steps the evaluator adds, for every class,
one click at the centre of its largest error: the largest 26-connected component of (prediction != truth)
is found, its Euclidean distance transform (in voxels, the volume border counting as outside) taken, and
the voxel of largest distance (ties: one drawn with seed 42) becomes a foreground click where the class was
missed and a background click where it was over-segmented. Cases without boxes start from the clicks (their
box step scores 0). Scores: the mean over classes of DSC and of NSD at 2 mm (NSD is taken as 0 where the
mean DSC is 0.2 or less), DSC_AUC / NSD_AUC by the trapezoid rule over the five click steps, the final
step's DSC / NSD, and the running time, to be kept under 90 s per class for the whole case.
"""
from __future__ import annotations

import csv
import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt, label as connected_components

from ..io import UNREADABLE, atomic_path
from ..evaluation.metrics import dice_from_counts, surface_dice
from .format import POINT, read_case, write_npz

CLICK_STEPS = 5
NSD_TOLERANCE_MM = 2.0
NSD_MIN_DSC = 0.2
SECONDS_PER_CLASS = 90.0
EDT_MAX_VOXELS = 60_000_000  # above this the error's crop is halved before the distance transform
TIE_SEED = 42


def _edt(component: np.ndarray) -> np.ndarray:
    """Distance of each voxel of `component` (bool, 3D) to the nearest voxel outside it, the border included."""
    coords = np.argwhere(component)
    low, high = coords.min(0), coords.max(0) + 1
    crop = component[tuple(slice(a, b) for a, b in zip(low, high))]
    pad = np.maximum(((high - low) * 0.25).astype(int), 1)
    padded = np.pad(crop, [(p, p) for p in pad])
    halve = padded.size > EDT_MAX_VOXELS
    if halve:  # a huge error: block-max at half resolution, then repeated back
        shape = -(-np.array(padded.shape) // 2) * 2
        padded = np.pad(padded, [(0, s - n) for s, n in zip(shape, padded.shape)])
        padded = padded.reshape(shape[0] // 2, 2, shape[1] // 2, 2, shape[2] // 2, 2).max((1, 3, 5))
    distance = distance_transform_edt(padded)
    if halve:
        distance = distance.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    out = np.zeros(component.shape, dtype=np.float64)
    inner = tuple(slice(p, p + n) for p, n in zip(pad, high - low))
    out[tuple(slice(a, b) for a, b in zip(low, high))] = distance[inner]
    return out * component


def error_click(truth: np.ndarray, pred: np.ndarray) -> tuple[str, POINT] | None:
    """The simulated user's click for one class: ("fg" | "bg", (z, y, x)), or None where `pred` is perfect."""
    error = truth != pred
    if not error.any():
        return None
    components, _ = connected_components(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == sizes.argmax()
    distance = _edt(largest)
    if not distance.any():
        distance = largest.astype(np.float64)
    candidates = np.argwhere(distance == distance.max())
    point = tuple(int(v) for v in candidates[np.random.RandomState(TIE_SEED).choice(len(candidates))])
    return ("fg" if truth[point] else "bg"), point


def nsd_method() -> str:
    """Which NSD `challenge_nsd` computes: the organisers' (DeepMind's `surface-distance` package) or, without
    that package, sam_peft's voxel-boundary NSD."""
    try:
        import surface_distance  # noqa: F401
    except ImportError:
        return "sam_peft voxel boundaries (install surface-distance for the organisers' NSD)"
    return "surface-distance (DeepMind; the organisers' NSD)"


def challenge_nsd(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """NSD at 2 mm as the organisers score it: DeepMind's surfels weighted by their area. Their surfaces lie
    between voxels, ours (`surface_dice`, the fallback) on boundary voxels, which on 3 mm voxels at a 2 mm
    tolerance scores markedly lower (0.43 against 0.56 on the shared CT), so the package is used when
    installed."""
    try:
        import surface_distance
    except ImportError:
        return surface_dice(pred, truth, spacing, NSD_TOLERANCE_MM)
    if not pred.any() or not truth.any():
        return float(pred.any() == truth.any())
    distances = surface_distance.compute_surface_distances(truth, pred, tuple(float(s) for s in spacing))
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, NSD_TOLERANCE_MM))


def class_scores(gts: np.ndarray, segs: np.ndarray, spacing: Sequence[float], with_nsd: bool = True) -> dict:
    """Per class k (1..K of `gts`): DSC and NSD at 2 mm of `segs == k` against `gts == k`."""
    out = {"dsc": [], "nsd": []}
    for k in np.unique(gts[gts > 0]):
        truth, pred = gts == k, segs == k
        out["dsc"].append(float(dice_from_counts((truth & pred).sum(), pred.sum(), truth.sum())))
        out["nsd"].append(challenge_nsd(pred, truth, spacing) if with_nsd else float("nan"))
    return out


def step_scores(gts: np.ndarray, segs: np.ndarray, spacing: Sequence[float]) -> dict:
    """The step's scores: mean DSC, mean NSD (0 where the mean DSC is <= 0.2), and the per-class values."""
    per_class = class_scores(gts, segs, spacing)
    dsc = float(np.mean(per_class["dsc"]))
    return {"dsc": dsc, "nsd": float(np.mean(per_class["nsd"])) if dsc > NSD_MIN_DSC else 0.0,
            "class_dsc": per_class["dsc"], "class_nsd": per_class["nsd"]}


def auc(values: Sequence[float]) -> float:
    """Trapezoid area over the last five steps (the clicks) at unit spacing: 4.0 for a perfect series."""
    y = np.asarray(values[-CLICK_STEPS:], dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2).sum())


def _add_clicks(case_path: Path, gts: np.ndarray, segs: np.ndarray, clicks: list[dict], order: list[list]) -> None:
    """One error click per class into `clicks` / `clicks_order`, then the input file rewritten with them."""
    for k in range(len(clicks)):
        click = error_click(gts == k + 1, segs == k + 1)
        order[k].append(None if click is None else click[0])
        if click is not None:
            clicks[k][click[0]].append(list(click[1]))
    with np.load(case_path, allow_pickle=True) as data:
        kept = {key: data[key] for key in ("imgs", "gts", "spacing", "boxes", "class_names") if key in data.files}
    write_npz(case_path, **kept, clicks=np.array(clicks, dtype=object),
              clicks_order=np.array(order, dtype=object), prev_pred=segs.astype(np.uint8))


Predict = Callable[[Path, Path], None]  # (inputs folder, outputs folder) -> writes outputs/<case>.npz


def command_runner(command: str | Sequence[str]) -> Predict:
    """A participant's program as a fresh process per step: `command` with {inputs} / {outputs} filled in."""
    parts = shlex.split(command) if isinstance(command, str) else list(command)

    def run(inputs: Path, outputs: Path) -> None:
        subprocess.run([p.format(inputs=inputs, outputs=outputs) for p in parts], check=False)

    return run


def evaluate_case(case_file: Path, predict: Predict, work: Path, gts_file: Path | None = None) -> dict:
    """Run the six steps of one case through `predict` in `work/inputs` -> `work/outputs`; its record."""
    inputs, outputs = work / "inputs", work / "outputs"
    for folder in (inputs, outputs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    case_path = inputs / case_file.name
    shutil.copy(case_file, case_path)
    case = read_case(case_path)
    gts = read_case(gts_file).gts if gts_file is not None else case.gts
    if gts is None:
        raise ValueError(f"{case_file}: no 'gts' to score against (give the ground-truth folder)")
    classes = int(gts.max())
    clicks, order = [{"fg": [], "bg": []} for _ in range(classes)], [[] for _ in range(classes)]
    steps, times = [], []
    segs = np.zeros(gts.shape, dtype=np.uint8)
    for step in range(CLICK_STEPS + 1):
        if step == 0 and case.boxes is None:  # clicks only: the box step scores 0
            steps.append({"dsc": 0.0, "nsd": 0.0, "class_dsc": [0.0] * classes, "class_nsd": [0.0] * classes})
            times.append(0.0)
            continue
        if step > 0:
            _add_clicks(case_path, gts, segs, clicks, order)
        start = time.perf_counter()
        predict(inputs, outputs)
        times.append(time.perf_counter() - start)
        out = outputs / case_file.name
        segs = read_case_segs(out, gts.shape)
        steps.append(step_scores(gts, segs, case.spacing))
    total = float(sum(times))
    return {"case": case_file.name, "classes": classes, "class_names": case.class_names,
            "dsc": [s["dsc"] for s in steps], "nsd": [s["nsd"] for s in steps],
            "class_dsc": [s["class_dsc"] for s in steps], "class_nsd": [s["class_nsd"] for s in steps],
            "dsc_auc": auc([s["dsc"] for s in steps]), "nsd_auc": auc([s["nsd"] for s in steps]),
            "dsc_final": steps[-1]["dsc"], "nsd_final": steps[-1]["nsd"], "times": times, "total_time": total,
            "seconds_per_class": total / classes, "within_budget": total <= SECONDS_PER_CLASS * classes,
            "clicks": clicks, "clicks_order": order}


def read_case_segs(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The step's prediction; a missing or malformed output counts as empty, as the evaluator counts it."""
    try:
        with np.load(path, allow_pickle=True) as data:
            segs = np.asarray(data["segs"]).astype(np.uint8)
    except (OSError, KeyError, ValueError, *UNREADABLE):
        return np.zeros(shape, dtype=np.uint8)
    return segs if segs.shape == tuple(shape) else np.zeros(shape, dtype=np.uint8)


CSV_COLUMNS = ("CaseName", "TotalRunningTime", *(f"RunningTime_{i}" for i in range(1, 7)), "DSC_AUC", "NSD_AUC",
               "DSC_Final", "NSD_Final", *(f"DSC_{i}" for i in range(1, 7)), *(f"NSD_{i}" for i in range(1, 7)),
               "num_class", "runtime_upperbound")


def _csv_row(record: dict) -> dict:
    row = {"CaseName": record["case"], "TotalRunningTime": record["total_time"], "DSC_AUC": record["dsc_auc"],
           "NSD_AUC": record["nsd_auc"], "DSC_Final": record["dsc_final"], "NSD_Final": record["nsd_final"],
           "num_class": record["classes"], "runtime_upperbound": SECONDS_PER_CLASS * record["classes"]}
    for i in range(CLICK_STEPS + 1):
        row[f"RunningTime_{i + 1}"], row[f"DSC_{i + 1}"], row[f"NSD_{i + 1}"] = (
            record["times"][i], record["dsc"][i], record["nsd"][i])
    return row


def evaluate_protocol(cases: str | Path, predict: Predict, output: str | Path, gts: str | Path | None = None,
                      work: str | Path | None = None) -> dict:
    """Score `predict` on every `<cases>/*.npz` under the protocol; write metrics.csv (the organisers'
    columns), metrics.json (per step and per class) and dice_vs_interaction.png to `output`."""
    cases, output = Path(cases), Path(output)
    files = sorted(cases.glob("*.npz")) if cases.is_dir() else []
    if not files:
        raise ValueError(f"cases folder {cases} holds no challenge .npz files")
    work = (Path(work) if work is not None else output / "work").resolve()  # absolute: a docker -v needs it
    records = []
    for file in files:
        records.append(evaluate_case(file, predict, work, None if gts is None else Path(gts) / file.name))
        print(f"{file.name}: DSC per step {np.round(records[-1]['dsc'], 4).tolist()}, "
              f"{records[-1]['seconds_per_class']:.1f} s per class", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = {key: float(np.mean([r[key] for r in records]))
               for key in ("dsc_auc", "nsd_auc", "dsc_final", "nsd_final", "seconds_per_class")}
    summary["dsc_per_step"] = np.mean([r["dsc"] for r in records], 0).tolist()
    summary["nsd_per_step"] = np.mean([r["nsd"] for r in records], 0).tolist()
    summary["within_budget"] = all(r["within_budget"] for r in records)
    summary["nsd"] = nsd_method()
    result = {"summary": summary, "cases": records}
    output.mkdir(parents=True, exist_ok=True)
    with atomic_path(output / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with atomic_path(output / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_row(r) for r in records)
    plot_interaction(records, output / "dice_vs_interaction.png")
    return result


def plot_interaction(records: list[dict], path: str | Path) -> None:
    """Mean DSC and NSD against the interaction step (box, click 1..5), one line per case and their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = ["box", *(f"click {i}" for i in range(1, CLICK_STEPS + 1))]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, key in zip(axes, ("dsc", "nsd")):
        for record in records:
            axis.plot(steps, record[key], color="0.75", linewidth=0.8)
        axis.plot(steps, np.mean([r[key] for r in records], 0), color="C0", marker="o", linewidth=2, label="mean")
        axis.set_title(f"{key.upper()} per interaction ({len(records)} case{'s' * (len(records) > 1)})")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[0].legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
