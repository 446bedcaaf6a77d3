"""``train`` and ``finetune``: a TrainConfig (what to learn) and a Runtime (how to run) in,
a model bundle out. The CLI builds both from its options."""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from mrhscale.errors import MRHError
from mrhscale.io.bundle import model_from_bundle, read_bundle
from mrhscale.nn.model import MRHNet, with_stains
from mrhscale.ops.norm import Normalisation
from mrhscale.options import FINETUNE_DEFAULTS
from mrhscale.stores import resolve
from mrhscale.stores.legacy import stains_of
from mrhscale.training.config import TrainConfig, recipe_config, reconcile
from mrhscale.training.data import read_patch_store_attrs
from mrhscale.training.ensemble import train_ensemble
from mrhscale.training.loop import Runtime, Trainer, run_folder
from mrhscale.training.optim import init_weights

CONFIG_FIELDS = frozenset(f.name for f in fields(TrainConfig))
RUNTIME_FIELDS = frozenset(f.name for f in fields(Runtime))


def split_options(kind: str, config, options: dict, runtime: Runtime | None):
    """(TrainConfig, the options given explicitly, Runtime) from a config or a patch store
    path plus keyword options (TrainConfig or Runtime fields; None = not given)."""
    unknown = set(options) - CONFIG_FIELDS - RUNTIME_FIELDS
    if unknown:
        raise TypeError(f"{kind}() got unknown option(s): {', '.join(sorted(unknown))}")
    rt = runtime or Runtime()
    for k in RUNTIME_FIELDS & set(options):
        if options[k] is not None:
            setattr(rt, k, options[k])
    if isinstance(config, TrainConfig):
        given = {f: getattr(config, f) for f in CONFIG_FIELDS}
    else:
        given = {"patches": config, **{k: v for k, v in options.items() if k in CONFIG_FIELDS}}
    given["patches"] = resolve(given["patches"], "patches")
    given = {k: v for k, v in given.items() if k != "kind"}
    cfg = recipe_config(kind, given, FINETUNE_DEFAULTS if kind == "finetune" else None)
    return cfg, given, rt


def train(config: TrainConfig | str, out_dir: str, *, resume: bool = False,
          runtime: Runtime | None = None, **options) -> dict:
    """Train MRH-Net; returns a summary (paths, per-epoch history, config).

    ``config``: a TrainConfig, or the patch store path with TrainConfig fields as keyword
    options (unset ones take the ``recipe``'s values, "robust" by default, or with
    ``resume`` the checkpointed run's own values); ``members=K`` trains a deep ensemble. Runtime fields (device, workers,
    threads, quiet, ...) may also be given as keywords. ``batch_size`` is global. Raises TrainingInterrupted after
    checkpointing if SIGTERM arrives.
    """
    cfg, given, rt = split_options("train", config, options, runtime)
    out_dir = resolve(out_dir, "--out")
    with run_folder(out_dir):
        cfg = reconcile(cfg, out_dir, resume, given)
        store = read_patch_store_attrs(cfg.patches, rt.context())
        n_ch = len(store["channels"])

        def build():
            m = MRHNet(n_ch, cfg.depth, cfg.width, stains=stains_of(store), aleatoric=cfg.aleatoric)
            init_weights([mod for mod in m.modules() if isinstance(mod, nn.Conv2d)], cfg.init)
            return m

        norm = input_normalisation(cfg.norm, store, cfg.patches)
        how = dict(store=store, build_model=build, stream_norm=norm if norm.per_subject else None, bundle_norm=norm)
        if cfg.members > 1:
            return train_ensemble(cfg, out_dir, rt, resume=resume, **how)
        return Trainer(cfg, out_dir, rt, **how).run(resume)


def input_normalisation(mode: str, store: dict, patches: str) -> Normalisation:
    """The bundle's normalisation: the store's global statistics, or a per-subject mode
    (each brain scaled by its own statistics, the stain by the store's)."""
    norm = Normalisation.from_dict(store["norm"])
    if mode == "global":
        return norm
    if not store.get("subject_norm"):
        raise MRHError(f"--norm {mode}: {patches} has no per-subject statistics (made by an older "
                       "mrhscale); remake it with `mrhscale patches --overwrite`, or train with "
                       "--norm global (the paper's scaling)")
    return Normalisation.subject_mode(mode, len(store["channels"]), norm.target_offset, norm.target_scale)


def finetune(model_path: str, config: TrainConfig | str, out_dir: str, *, resume: bool = False,
             runtime: Runtime | None = None, **options) -> dict:
    """Transfer learning (MRH_training_Trans): fresh Conv4/Conv5 with lr factor 10, base lr 1e-4;
    ``add_stain=True`` keeps the model's heads and adds one per new stain (see
    :func:`finetune_stains`).

    The new bundle keeps the MODEL's input normalisation (the backbone was trained
    with it) and takes the new stain's target scaling from the patch store.
    ``freeze_backbone=True`` trains only the head.
    """
    model_path = resolve(model_path, "model")
    cfg, given, rt = split_options("finetune", config, options, runtime)
    given["base_model"] = cfg.base_model = model_path
    out_dir = resolve(out_dir, "--out")
    with run_folder(out_dir):
        cfg = reconcile(cfg, out_dir, resume, given)
        bundle = read_bundle(cfg.base_model if resume else model_path)
        store = read_patch_store_attrs(cfg.patches, rt.context())
        check_compatible(bundle, store, model_path, cfg.patches)
        return _finetune_run(cfg, bundle, store, out_dir, rt, resume)


def _finetune_run(cfg: TrainConfig, bundle: dict, store: dict, out_dir: str, rt: Runtime, resume: bool):
    arch = bundle["arch"]
    cfg.depth, cfg.width = int(arch["depth"]), int(arch.get("width", 64))
    stains, kept = finetune_stains(cfg, stains_of(bundle), stains_of(store))
    norm = _finetune_norm(cfg, bundle, store, stains, kept)

    def build():
        m = with_stains(model_from_bundle(bundle), stains_of(bundle), stains, kept)
        for t, head in zip(stains, m.stain_heads(), strict=True):
            if t not in kept:
                init_weights(head, cfg.init)  # fresh heads, seeded
            elif t not in stains_of(store):  # no data for it: it stays exactly as it was
                for conv in head:
                    conv.requires_grad_(False)
        return m

    prov = {"base_model": {"path": cfg.base_model, "stains": stains_of(bundle), "target": bundle.get("target"),
                           "provenance": bundle.get("provenance", {})},
            **({"kept_heads": kept} if kept else {})}
    fed = norm.select_stains([stains.index(t) for t in stains_of(store)])  # the store's targets, scaled
    return Trainer(cfg, out_dir, rt, store=store, build_model=build, stream_norm=fed, bundle_norm=norm,
                   extra_provenance=prov, stains=stains).run(resume)


def finetune_stains(cfg: TrainConfig, base: list[str], new: list[str]) -> tuple[list[str], list[str]]:
    """(the finetuned network's stains, those whose heads it keeps from the base).

    Transfer learning (the default) gives the patch store's stains fresh heads on the base's
    backbone; ``add_stain`` keeps every head of the base and adds one per new stain. A kept
    head of a stain the store lacks cannot learn, so the backbone under it must stay frozen.
    """
    if not cfg.add_stain:
        return list(new), []
    added = [t for t in new if t not in base]
    if not added:
        raise MRHError(f"--add-stain: the model already predicts {', '.join(new)}; "
                       "finetune without --add-stain to retrain its head")
    lacking = [t for t in base if t not in new]
    if lacking and not cfg.freeze_backbone:
        raise MRHError(f"--add-stain: {cfg.patches} has no {', '.join(lacking)}, so training the backbone "
                       f"would change the model's {', '.join(lacking)} map unchecked; add --freeze-backbone "
                       f"(or make patches of {','.join(base + added)})")
    return [*base, *added], list(base)


def _finetune_norm(cfg: TrainConfig, bundle: dict, store: dict, stains: list[str], kept: list[str]):
    """The base's input normalisation (the backbone was trained with it); each stain's target
    scaling from where its head learned it: the base's for kept heads the store lacks, else the store's."""
    base, new = Normalisation.from_dict(bundle["norm"]), Normalisation.from_dict(store["norm"])
    b_st, n_st = stains_of(bundle), stains_of(store)
    pairs = [new.stain(n_st.index(t)) if t in n_st else base.stain(b_st.index(t)) for t in stains]
    off = [p.target_offset[0] for p in pairs]
    scale = [p.target_scale[0] for p in pairs]
    return Normalisation(base.mode, list(base.offset), list(base.scale), off, scale,
                         {**base.meta, "target_from": cfg.patches})


def check_compatible(meta: dict, store: dict, model_path: str, patches: str) -> None:
    """The data must feed the model the channels, in the order, and the patch it was trained on."""
    mch, sch = list(meta["channels"]), list(store["channels"])
    if mch != sch:
        missing = [c for c in mch if c not in sch]
        extra = [c for c in sch if c not in mch]
        what = (f"missing {missing[:5]}" if missing else "") + \
               (f"{'; ' if missing else ''}unexpected {extra[:5]}" if extra else "")
        raise MRHError(f"{patches}: channels do not match model {model_path} "
                       f"({len(sch)} vs {len(mch)} channels; {what or 'same names, different order'}); "
                       "extract patches with the model's contrasts")
    mp, sp = meta["patch"], store["patch"]
    for k in ("half", "size", "axis"):
        if k in mp and k in sp and mp[k] != sp[k]:
            raise MRHError(f"{patches}: patch {k}={sp[k]!r} but model {model_path} was trained "
                           f"with {k}={mp[k]!r}; extract patches with the model's patch spec")
