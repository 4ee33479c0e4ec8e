"""Resolve a model card to a checkpoint file on this machine.

Order: an explicit path given by the user, else rsvl's cache
(``$RSVL_CACHE/<card name>/<filename>``, default ``~/.cache/rsvl``), else the Hugging Face
cache (a file another tool already downloaded at the same revision), else a download.

Downloads are written under a temporary name next to their final place, checked against the
card's sha256 when it has one, and only then renamed: an interrupted or corrupt download never
sits under the final name. With ``RSVL_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``), or when the
network fails, :class:`~rsvl.errors.WeightsNotFoundError` says which file to fetch, from where,
and exactly where to put it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import huggingface_hub

from rsvl.errors import WeightsChecksumError, WeightsNotFoundError
from rsvl.io import atomic_path
from rsvl.models.cards import ModelCard

#: the installed rsvl package (bundled weights are relative to it)
_PACKAGE = Path(__file__).resolve().parents[1]

_TRUE = {"1", "true", "yes", "on"}
_CHUNK = 1 << 20


def cache_root() -> Path:
    """Root of rsvl's weights cache: ``$RSVL_CACHE`` or ``~/.cache/rsvl``."""
    env = os.environ.get("RSVL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rsvl"


def cache_path(card: ModelCard) -> Path:
    """Where ``card``'s checkpoint lives (or must be placed) in rsvl's cache."""
    return cache_root() / card.name / card.source.filename


def is_offline() -> bool:
    """True when ``RSVL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("RSVL_OFFLINE", "HF_HUB_OFFLINE")
    )


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


def _fetch_instructions(card: ModelCard) -> str:
    src = card.source
    target = cache_path(card)
    if src.unpublished:
        return (
            f"{src.unpublished} Then pass --weights PATH, or place the file as {target} "
            "(set RSVL_CACHE to use another cache folder)."
        )
    if src.bundled:
        return (
            f"The file ships with rsvl ({src.bundled} inside the package): reinstall rsvl, "
            "or pass --weights PATH to use a copy elsewhere."
        )
    if src.archive_member:
        get = f"Download {src.url}, extract {src.archive_member} from it and save it as {target}"
    else:
        get = f"Download {src.repo_filename} from {src.download_url} and save it as {target}"
    return (
        f"{get}, or pass --weights PATH to use a copy elsewhere, or run "
        f"`rsvl fetch {card.name}` on a machine with network access and copy "
        f"{cache_root() / card.name} here (set RSVL_CACHE to use another cache folder)."
    )


def _missing(card: ModelCard, why: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"Weights of model {card.name!r} ({card.source.filename}) are not available: {why}.",
        hint=_fetch_instructions(card),
    )


# --------------------------------------------------------------------------------------------
# checksum bookkeeping for cached files
# --------------------------------------------------------------------------------------------


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_marker(path: Path, digest: str) -> None:
    try:
        _marker(path).write_text(f"{digest} {path.stat().st_size}\n")
    except OSError:  # a read-only cache still works, it is just re-hashed next time
        pass


def _marker_ok(path: Path, expected: str) -> bool:
    try:
        digest, size = _marker(path).read_text().split()
        return digest == expected and int(size) == path.stat().st_size
    except (OSError, ValueError):
        return False


def _check_cached(card: ModelCard, path: Path, *, remember: bool = True) -> Path:
    """Verify a cached file once against the card's sha256 (files placed by hand included);
    ``remember`` writes the ``.sha256`` marker so the next load skips the hash."""
    if card.sha256 is None or _marker_ok(path, card.sha256):
        return path
    digest = sha256_file(path)
    if digest != card.sha256:
        raise WeightsChecksumError(
            f"{path} does not match model {card.name!r}: sha256 {digest}, expected {card.sha256}.",
            hint=f"Delete it and run `rsvl fetch {card.name}`, or pass --weights PATH to load a "
            "different file on purpose.",
        )
    if remember:
        _write_marker(path, digest)
    return path


# --------------------------------------------------------------------------------------------
# lookups that never touch the network
# --------------------------------------------------------------------------------------------


def _bundled_path(card: ModelCard) -> Path | None:
    if not card.source.bundled:
        return None
    path = _PACKAGE / card.source.bundled
    return path if path.is_file() else None


def _hf_cached_path(card: ModelCard) -> Path | None:
    """The file in the Hugging Face cache, if some tool already downloaded it (no network)."""
    src = card.source
    if not src.hf_repo:
        return None
    try:
        found = huggingface_hub.try_to_load_from_cache(
            src.hf_repo, src.repo_filename, revision=src.revision or "main"
        )
    except Exception:  # a malformed cache must not break loading
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _local_path(card: ModelCard) -> Path | None:
    bundled = _bundled_path(card)
    if bundled is not None:
        return bundled
    if not trained_weights_published(card) and not card.source.unpublished:
        return None  # the card's file is not the model's weights
    cached = cache_path(card)
    if cached.is_file():
        return _check_cached(card, cached)
    hf = _hf_cached_path(card)
    if hf is not None:  # never write into Hugging Face's cache
        return _check_cached(card, hf, remember=False)
    return None


def trained_weights_published(card: ModelCard) -> bool:
    """False when no trained checkpoint of the model is published: the card's source says so
    (``unpublished``), or its file is only what training starts from (RSPrompter's cards
    name SAM ViT-B; ``metadata["trained_weights_published"]`` is False)."""
    return not card.source.unpublished and card.metadata.get("trained_weights_published", True) is not False


def is_available_offline(card: ModelCard) -> bool:
    """True when the checkpoint a task loads is on this machine (bundled, in rsvl's or HF's
    cache); never for a card whose trained weights are unpublished and only --weights serves."""
    if _bundled_path(card) is not None:
        return True
    if not trained_weights_published(card):
        return bool(card.source.unpublished) and cache_path(card).is_file()
    return cache_path(card).is_file() or _hf_cached_path(card) is not None


#: what :func:`weights_state` returns
WEIGHTS_STATES = ("bundled", "cached", "download", "bring your own")


def weights_state(card: ModelCard) -> str:
    """Where a task gets ``card``'s weights on this machine: ``bundled`` (ships with rsvl),
    ``cached`` (already here), ``download`` (``rsvl fetch`` or the first use downloads it),
    ``bring your own`` (nothing published: a trained file must be given with --weights)."""
    if card.source.bundled:
        return "bundled"
    if is_available_offline(card):
        return "cached"
    return "download" if trained_weights_published(card) else "bring your own"


def _bring_your_own(card: ModelCard) -> WeightsNotFoundError:
    if card.source.unpublished:
        return _missing(card, "its authors publish no weights, so there is nothing to download")
    return WeightsNotFoundError(
        f"{card.name}: no trained checkpoint of this model is published, so there is nothing to "
        f"download (the card's {card.source.filename} is only what training starts from).",
        hint=f"Train one (`rsvl train {card.tasks[0] if card.tasks else '--help'}`) or get one from "
        "the model's authors, and pass it with --weights PATH.",
    )


# --------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------


def _download_to(card: ModelCard, dest: Path) -> None:
    """Download ``card``'s checkpoint and write it to ``dest`` (a temporary name).

    This is the only function that touches the network; tests replace it.
    """
    src = card.source
    workdir = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        if src.hf_repo:
            got = huggingface_hub.hf_hub_download(
                repo_id=src.hf_repo,
                filename=src.repo_filename,
                revision=src.revision,
                local_dir=workdir,
            )
            shutil.move(got, dest)
        elif src.url:
            raw = workdir / "download"
            with urllib.request.urlopen(src.url, timeout=60) as resp, open(raw, "wb") as out:
                shutil.copyfileobj(resp, out, _CHUNK)
            if src.archive_member:
                _extract_member(raw, src.archive_member, dest)
            else:
                shutil.move(raw, dest)
        else:  # bundled weights are never downloaded
            raise FileNotFoundError(f"bundled file {src.bundled} is missing from the installation")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy the zip member whose base name is ``member`` (or the only ``*.pt``) to ``dest``."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        matches = [n for n in names if Path(n).name == member]
        if not matches:
            matches = [n for n in names if n.endswith((".pt", ".pth", ".bin", ".safetensors"))]
        if len(matches) != 1:
            raise OSError(
                f"cannot tell which file of the archive is the checkpoint (looked for {member!r}; "
                f"archive holds {names[:10]})"
            )
        with zf.open(matches[0]) as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, _CHUNK)


def fetch(card: ModelCard, *, force: bool = False) -> Path:
    """Make sure ``card``'s checkpoint is in rsvl's cache and return its path.

    Downloads (respecting ``RSVL_OFFLINE``) when it is not already there or ``force`` is set;
    verifies the sha256 when the card pins one; never leaves a partial or corrupt file under
    the final name.
    """
    bundled = _bundled_path(card)
    if bundled is not None:
        return bundled
    if card.source.bundled:
        raise _missing(card, "the file shipped with rsvl is missing; reinstall rsvl")
    if not trained_weights_published(card) and not card.source.unpublished:
        raise _bring_your_own(card)  # the card's download would not be the model's weights
    final = cache_path(card)
    if final.is_file() and not force:
        return _check_cached(card, final)
    if card.source.unpublished:
        raise _bring_your_own(card)
    if is_offline():
        raise _missing(
            card, "offline mode is on (RSVL_OFFLINE / HF_HUB_OFFLINE) and it is not cached"
        )

    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _missing(card, f"cannot create the cache folder {final.parent} ({exc})") from exc
    with atomic_path(final) as tmp:  # a failed or corrupt download never appears as `final`
        try:
            _download_to(card, tmp)
        except WeightsNotFoundError:
            raise
        except Exception as exc:  # network, HTTP, disk, bad archive: all end the same way
            raise _missing(card, f"the download failed ({type(exc).__name__}: {exc})") from exc
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise _missing(card, "the download produced an empty file")
        digest = sha256_file(tmp)
        if card.sha256 is not None and digest != card.sha256:
            raise WeightsChecksumError(
                f"The downloaded {card.source.filename} for model {card.name!r} is corrupt or has "
                f"changed upstream: sha256 {digest}, expected {card.sha256}. Nothing was saved.",
                hint=f"Run `rsvl fetch {card.name}` again; if it keeps failing the file upstream "
                "differs from the pinned one: " + _fetch_instructions(card),
            )
    _write_marker(final, digest)
    return final


def resolve_weights(card: ModelCard, path: str | Path | None = None) -> Path:
    """The checkpoint file to load for ``card``.

    ``path`` (the user's ``--weights``) wins and must exist; a folder is searched for the
    card's file name. Otherwise the bundled file, rsvl's cache, the Hugging Face cache and
    finally a download are tried, in that order.
    """
    if path is not None:
        given = Path(path).expanduser()
        if given.is_dir():
            inside = given / card.source.filename
            if inside.is_file():
                return inside
            raise WeightsNotFoundError(
                f"--weights {given} is a folder without {card.source.filename}.",
                hint="Pass the checkpoint file itself, or place the file in that folder.",
            )
        if not given.is_file():
            raise WeightsNotFoundError(
                f"--weights {given} does not exist.",
                hint="Check the path; to use rsvl's cache instead, drop --weights. "
                + _fetch_instructions(card),
            )
        return given
    local = _local_path(card)
    if local is not None:
        return local
    return fetch(card)


__all__ = [
    "cache_path",
    "cache_root",
    "fetch",
    "is_available_offline",
    "is_offline",
    "resolve_weights",
    "sha256_file",
    "trained_weights_published",
    "weights_state",
]
