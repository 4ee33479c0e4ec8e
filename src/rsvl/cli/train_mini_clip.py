"""``rsvl train mini-clip``: train the heads of rsvl's built-in mini-clip on UCM-Captions.

A thin wrapper of :func:`rsvl.train.mini_clip.run_training`, and the only command-line
entry of that trainer. Only the ``train`` split is trained on; the ``val`` numbers, the
settings and this command line go into ``card.json`` next to the heads.
"""

from __future__ import annotations

from pathlib import Path

import typer

from rsvl.console import emit_json, state


def register(train_app: typer.Typer) -> None:
    train_app.command("mini-clip")(mini_clip)


def mini_clip(
    data: Path = typer.Option(..., "--data", help="Folder with ucm.json and images/ (UCM-Captions)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output heads file (.safetensors); card.json is written next to it."),
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
        "data": data, "out": out, "cache": cache, "semseg": semseg, "card": card, "seed": seed,
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
    )
    res = run_training(data, out, config=config, cache_dir=cache, semseg=semseg, card=card, threads=threads,
                       quiet=state.quiet or as_json, command=format_command(options))
    if as_json:
        emit_json({"val": res["val"], "semseg": res.get("semseg"), "heads": str(out),
                   "card": res["card_path"], "command": res["command"], "config": res["config"]})
        return
    state.notice(f"wrote {out} and {res['card_path']}")
    v = res["val"]
    typer.echo(f"val zero-shot top-1 {v['zero_shot_top1']:.2f} %, retrieval mean recall {v['mean_recall']:.2f}")
    for name, r in (res.get("semseg") or {}).items():
        typer.echo(f"{name}: mIoU {r['miou']:.2f} (majority-class guess {r['majority_miou']:.2f})")
