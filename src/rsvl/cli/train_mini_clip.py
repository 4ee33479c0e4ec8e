"""``rsvl train mini-clip``: train the heads of rsvl's built-in mini-clip on UCM-Captions.

A thin wrapper of :func:`rsvl.train.mini_clip.run_training`, and the only command-line
entry of that trainer. ``rsvl train mini-clip-dense`` then trains the dense head and its
learned "other" query on every pixel label (:func:`rsvl.train.mini_clip_pixels.train_dense_other`). Only the ``train`` split is trained on; the ``val`` numbers, the
settings and this command line go into ``card.json`` next to the heads.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rsvl.console import emit_json, state


def register(train_app: typer.Typer) -> None:
    train_app.command("mini-clip")(mini_clip)
    train_app.command("mini-clip-dense")(mini_clip_dense)


def mini_clip(
    data: Path = typer.Option(..., "--data", help="Folder with ucm.json and images/ (UCM-Captions)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output heads file (.safetensors); card.json is written next to it."),
    aid: Path = typer.Option(None, "--aid", help="AID folder: its train images of the trained classes join stage 1; "
                             "zero-shot on its val images and held-out classes is reported."),
    aid_per_class: int = typer.Option(None, "--aid-per-class", min=1, help="AID train images per class in stage 1 (default 192: all)."),
    cache: Path = typer.Option(None, "--cache", help="Tower feature cache (default ~/.cache/rsvl/mini-clip)."),
    semseg: Path = typer.Option(
        None, "--semseg", help="Also measure dense quality on this folder (loveda/, potsdam/, vaihingen/; evaluation only)."
    ),
    card: Path = typer.Option(None, "--card", help="Where to write the card (default: card.json next to --out)."),
    seed: int = typer.Option(None, "--seed", help="Random seed of the first head (default 0)."),
    seeds: int = typer.Option(None, "--seeds", min=1, help="Global heads trained with consecutive seeds and averaged."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs of the global (image/text) heads."),
    dense_epochs: int = typer.Option(None, "--dense-epochs", min=0, help="Epochs of the dense head (0: skip)."),
    mosaics: int = typer.Option(None, "--mosaics", min=1, help="Synthetic train mosaics for the dense head."),
    val_mosaics: int = typer.Option(None, "--val-mosaics", min=1, help="Synthetic val mosaics (dense check)."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (val metrics, settings) on stdout."),
) -> None:
    """Train mini-clip's heads (frozen towers; features cached, so retraining takes minutes)."""
    # imported when the command runs, since every CLI module is imported when `rsvl` starts
    # lazy: the trainer pulls in torch, the towers and the eval protocols (seconds)
    from rsvl.train.mini_clip import TrainConfig, format_command, run_training

    defaults = TrainConfig()
    options = {
        "data": data, "aid": aid, "aid_per_class": aid_per_class, "out": out, "cache": cache, "semseg": semseg, "card": card, "seed": seed,
        "seeds": seeds, "epochs": epochs, "dense_epochs": dense_epochs, "mosaics": mosaics,
        "val_mosaics": val_mosaics, "threads": threads,
    }
    config = TrainConfig(
        seed=defaults.seed if seed is None else seed,
        n_seeds=defaults.n_seeds if seeds is None else seeds,
        epochs=defaults.epochs if epochs is None else epochs,
        dense_epochs=defaults.dense_epochs if dense_epochs is None else dense_epochs,
        n_mosaics=defaults.n_mosaics if mosaics is None else mosaics,
        n_val_mosaics=defaults.n_val_mosaics if val_mosaics is None else val_mosaics,
        aid_per_class=defaults.aid_per_class if aid_per_class is None else aid_per_class,
    )
    res = run_training(data, out, config=config, cache_dir=cache, semseg=semseg, card=card, threads=threads,
                       quiet=state.quiet or as_json, command=format_command(options), aid=aid)
    if as_json:
        emit_json({"val": res["val"], "semseg": res.get("semseg"), "heads": str(out),
                   "card": res["card_path"], "command": res["command"], "config": res["config"]})
        return
    state.notice(f"wrote {out} and {res['card_path']}")
    v = res["val"]
    typer.echo(f"val zero-shot top-1 {v['zero_shot_top1']:.2f} %, retrieval mean recall {v['mean_recall']:.2f}")
    if "aid_val_top1" in v:
        typer.echo(f"AID zero-shot top-1 (15 classes): val {v['aid_val_top1']:.2f} %, held-out classes "
                   f"{v.get('aid_heldout_top1', float('nan')):.2f} % "
                   f"({v.get('aid_heldout_top1_among_heldout', float('nan')):.2f} % among them)")
    for name, r in (res.get("semseg") or {}).items():
        typer.echo(f"{name}: mIoU {r['miou']:.2f} (majority-class guess {r['majority_miou']:.2f})")


def mini_clip_dense(
    heads: Path = typer.Option(..., "--heads", help="Heads to start from (e.g. src/rsvl/assets/mini-clip/heads.safetensors); "
                               "their image and text heads are kept."),
    ucm: Path = typer.Option(..., "--ucm", help="UCM-Captions folder (train scenes for the mosaics)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output heads file (.safetensors); card.json is updated next to it."),
    aid: Path = typer.Option(None, "--aid", help="AID folder (its train scenes join the mosaics; held-out classes never)."),
    nwpu: Path = typer.Option(None, "--nwpu", help="NWPU VHR-10 COCO json (instance masks: each class against the rest)."),
    pixels: Path = typer.Option(None, "--pixels", help="A `rsvl data semseg-split` folder: train/ is trained on, val/ is scored."),
    cache: Path = typer.Option(None, "--cache", help="Tower feature cache (default ~/.cache/rsvl/mini-clip)."),
    card: Path = typer.Option(None, "--card", help="Where to write the card (default: card.json next to --out)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs over the pixel crops."),
    mosaics: int = typer.Option(1600, "--mosaics", min=0, help="Train mosaics of UCM/AID scenes."),
    val_mosaics: int = typer.Option(200, "--val-mosaics", min=0, help="Val mosaics of UCM/AID val scenes."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (val numbers, settings) on stdout."),
) -> None:
    """Train mini-clip's dense head LSeg-style on every pixel label, with a learned "other" class."""
    # lazy: the trainer pulls in torch, the towers and the eval protocols (seconds)
    from rsvl.train.mini_clip_pixels import PixelTrainConfig, train_dense_other

    parts = ["rsvl", "train", "mini-clip-dense", "--heads", str(heads), "--ucm", str(ucm), "--out", str(out)]
    for flag, value in (("--aid", aid), ("--nwpu", nwpu), ("--pixels", pixels), ("--epochs", epochs),
                        ("--mosaics", mosaics), ("--val-mosaics", val_mosaics), ("--seed", seed)):
        if value is not None:
            parts += [flag, str(value)]
    defaults = PixelTrainConfig()
    cfg = PixelTrainConfig(epochs=defaults.epochs if epochs is None else epochs, seed=seed)
    res = train_dense_other(heads, out, ucm=ucm, aid=aid, nwpu=nwpu, pixels=pixels, config=cfg, cache_dir=cache,
                            n_mosaics=mosaics, n_val_mosaics=val_mosaics, card=card, command=" ".join(parts),
                            threads=threads, quiet=state.quiet or as_json)
    if as_json:
        emit_json({k: res[k] for k in ("val_crops", "val_crops_before", "config", "command", "card_path")}
                  | {"semseg_val": res.get("semseg_val")})
        return
    state.notice(f"wrote {out} and {res['card_path']}")
    for name, r in res["val_crops"].items():
        typer.echo(f"{name} val crops: mIoU {r['miou']:.2f}, pixel accuracy {r['pixel_acc']:.2f}")
    for name, r in (res.get("semseg_val") or {}).items():
        typer.echo(f"{name} (rsvl eval ovss): mIoU {r['miou']:.2f}, pixel accuracy {r['pixel_acc']:.2f} "
                   f"(majority-class guess: {r['majority_miou']:.2f}, {r['majority_pixel_acc']:.2f})")
