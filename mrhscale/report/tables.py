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
    if m["notes"]:
        out["Notes"] = m["notes"]
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
