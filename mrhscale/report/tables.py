"""What the HTML reports show of a result: tables built from result dicts (no stage imports)."""

from __future__ import annotations


def evaluation_tables(m: dict) -> dict:
    """What the HTML report shows: pooled table, per-subject virtual table, AUCs, notes."""
    cols = ("pearson", "spearman", "mae", "psnr", "ssim")
    pooled = {name: {**{c: v.get(c) for c in cols},
                     "pearson vs virtual": v.get("pearson_vs_virtual"),
                     "spearman vs virtual": v.get("spearman_vs_virtual")}
              for name, v in m["pooled"].items() if name != "roc"}
    out = {"Pooled (virtual stain vs single markers)": pooled,
           "Per subject (virtual stain)": {sid: {c: r["virtual"].get(c) for c in cols}
                                           for sid, r in m["per_subject"].items()}}
    if "roc" in m["pooled"]:
        out[f"Detecting '{m['label']}' (pooled)"] = {
            n: {"AUC": r.get("auc"), "direction": r.get("direction"),
                "sensitivity": (r.get("youden") or {}).get("sensitivity"),
                "specificity": (r.get("youden") or {}).get("specificity")}
            for n, r in m["pooled"]["roc"].items()}
    if m.get("uncertainty"):
        out.update(uncertainty_tables(m["uncertainty"], m["per_subject"]))
        out.update(reliability_tables(m["uncertainty"]["pooled"]))
    if m.get("ood"):
        out.update(ood_tables(m["ood"], m["per_subject"]))
    if m["notes"]:
        out["Notes"] = m["notes"]
    return out


def uncertainty_tables(u: dict, per_subject: dict) -> dict:
    """Does the uncertainty rank and size the errors (per subject and pooled), and where is it high."""
    def row(x):
        r = x.get("retention") or {}
        return {"Spearman(unc, |err|)": x.get("spearman_abs_error"), "95% coverage": x.get("coverage_95"),
                "95% width": x.get("interval_width_95"), "x for 95%": x.get("factor_for_95"),
                "mean uncertainty": x.get("mean_uncertainty"), "retention area": r.get("area"),
                "oracle": r.get("oracle_area"), "random": r.get("random_area")}

    rows = {sid: row(r["uncertainty"]) for sid, r in per_subject.items() if "uncertainty" in r}
    rows["pooled"] = row(u["pooled"])
    out = {"Uncertainty vs error": rows}
    labels = {f"{sid}: {name}": {"voxels": v["voxels"], "mean inside": v["mean_inside"],
                                 "mean rest": v["mean_rest"], "ratio": v["ratio"],
                                 "95% coverage inside": v.get("coverage_95_inside")}
              for sid, r in per_subject.items() for name, v in (r.get("uncertainty") or {}).get("by_label", {}).items()}
    if labels:
        out["Uncertainty inside labels vs the rest of the brain"] = labels
    bins = {f"{b['from']:.4g} .. {b['to']:.4g}": {"voxels": b["n"], "95% coverage": b["coverage_95"],
                                                 "95% width": b["interval_width_95"]}
            for b in (u["pooled"].get("by_value") or [])}
    if bins:
        out["95% coverage by predicted value (pooled quartiles)"] = bins
    cal = u.get("calibration") or {}
    if cal:
        out["Calibration (fitted at training)"] = {k: cal.get(k) for k in (
            "factor", "fitted_on", "n", "alpha", "method", "held_out_subjects", "coverage_before", "coverage_after")}
        if cal.get("groups"):
            g = cal["groups"]
            names = g.get("labels", [])
            out["Calibration factor per group"] = {
                (names[i] if i < len(names) else "rest") if g["by"] == "labels" else f"value bin {i + 1}":
                    {"factor": f, "n": n} for i, (f, n) in enumerate(zip(g["factor"], g["n"], strict=True))}
    return out


def reliability_tables(p: dict) -> dict:
    """Coverage and width per tissue, the reliability curve and each brain's risk (pooled)."""
    out = {}
    if p.get("by_group"):
        out["95% coverage and interval width per tissue (pooled)"] = {
            g: {"voxels": v["voxels"], "95% coverage": v["coverage_95"], "95% width": v["interval_width_95"]}
            for g, v in p["by_group"].items()}
    rel = p.get("reliability")
    if rel:
        out["Reliability: observed coverage at each nominal level (pooled)"] = {
            g: {f"{q:g}": c for q, c in zip(rel["levels"], cov, strict=True)} for g, cov in rel["coverage"].items()}
    risk = p.get("risk")
    if risk:
        a = risk["alpha"]
        rows = {sid: {"share outside the 95% interval": x, f"<= {a:g}": x <= a} for sid, x in risk["miss_share"].items()}
        rows["share of subjects within"] = {"share outside the 95% interval": None,
                                            f"<= {a:g}": risk["share_of_subjects_within"]}
        out[f"Risk: each brain's share of voxels outside its 95% interval (at most {a:g}?)"] = rows
    return out


def ood_tables(o: dict, per_subject: dict) -> dict:
    """The out-of-distribution score: overall, and inside each label against the rest."""
    def row(x):
        return {"mean": x.get("mean"), "Spearman(ood, |err|)": x.get("spearman_abs_error"),
                "share above training 99th pct": x.get("share_above_training_99")}

    rows = {sid: row(r["ood"]) for sid, r in per_subject.items() if "ood" in r}
    rows["pooled"] = row(o["pooled"])
    labels = {name: {"voxels": v["voxels"], "mean inside": v["mean_inside"], "mean rest": v["mean_rest"],
                     "ratio": v["ratio"]} for name, v in (o["pooled"].get("by_label") or {}).items()}
    out = {"Out-of-distribution score": rows}
    if labels:
        out["Out-of-distribution score inside labels vs the rest (pooled)"] = labels
    return out


def importance_tables(res: dict) -> dict:
    """The tables the HTML reports show for an importance result."""
    tables = {
        "Setup": {"target": res["target"], "split": res["split"], "patches": res["n_patches"],
                  "repeats": res["repeats"], "baseline MSE": res["baseline_mse"]},
        "Contrast groups (MSE increase when shuffled)": {
            r["name"]: {"rank": r["rank"], "channels": len(r["channels"]), "MSE increase": r["increase"],
                        "std": r["std"], "relative": r["relative"]} for r in res["groups"]},
    }
    if res["channels"]:
        tables["Channels (top 20)"] = {
            r["name"]: {"rank": r["rank"], "MSE increase": r["increase"], "std": r["std"],
                        "relative": r["relative"]} for r in res["channels"][:20]}
    return tables
