"""The recipe study's table (docs/recipes.md) from crossval folders: held-out Pearson r per
subject, its mean +- sd and difference from a baseline recipe, mean MAE and SSIM.

    python pipelines/study/table.py STUDY_DIR [--baseline paper]

reads STUDY_DIR/cv-<recipe>/crossval.json (made by pipelines/study/run_study.sh).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics


def load(study: pathlib.Path) -> dict[str, dict]:
    out = {}
    for f in sorted(study.glob("cv-*/crossval.json")):
        doc = json.loads(f.read_text())
        out[f.parent.name[3:]] = ({r["subject"]: r["pearson"] for r in doc["rows"]}
                                  | {"_s": doc["seconds"], "_steps": patch_steps(f.parent),
                                     "_mae": doc["summary"]["mae"]["mean"], "_ssim": doc["summary"]["ssim"]["mean"]})
    return out


def patch_steps(cv: pathlib.Path) -> float:
    """The training budget: training patches x epochs, the mean over the folds."""
    steps = []
    for fold in sorted(cv.glob("fold-*")):
        attrs = json.loads((fold / "patches.zarr" / "zarr.json").read_text())["attributes"]
        cfg = json.loads((fold / "run" / "config.json").read_text())
        steps.append(attrs["n_train"] * cfg["epochs"])
    return statistics.mean(steps)


def table(res: dict[str, dict], baseline: str) -> str:
    subjects = sorted(k for k in res[baseline] if not k.startswith("_"))
    base = res[baseline]
    head = ["recipe", *subjects, "mean +- sd", "vs " + baseline, "worst subject vs " + baseline, "MAE", "SSIM", "patch-steps", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = sorted(res, key=lambda n: (n != baseline, -statistics.mean(res[n][s] for s in subjects)))
    for name in order:
        r = [res[name][s] for s in subjects]
        diff = [a - base[s] for a, s in zip(r, subjects, strict=True)]
        lines.append("| " + " | ".join([
            name, *(f"{v:.3f}" for v in r), f"{statistics.mean(r):.3f} +- {statistics.stdev(r):.3f}",
            f"{statistics.mean(diff):+.3f}", f"{min(diff):+.3f}", f"{res[name]['_mae']:.1f}", f"{res[name]['_ssim']:.3f}", f"{res[name]['_steps'] / 1e3:.0f}k", f"{res[name]['_s']:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=pathlib.Path)
    ap.add_argument("--baseline", default="paper")
    a = ap.parse_args()
    print(table(load(a.study), a.baseline))


if __name__ == "__main__":
    main()
