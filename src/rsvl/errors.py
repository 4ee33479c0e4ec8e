"""Errors a user can cause.

Every error that a user can trigger (a bad path, an unreadable raster, a wrong band
selection, an unknown model, missing weights, an empty prompt...) is an ``RsvlError``
subclass whose message says what happened *and what to do*. The CLI prints the message on
one line and exits with ``exit_code``; a traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class RsvlError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message} {hint}")


class InputNotFoundError(RsvlError):
    """A file or folder given by the user does not exist."""


class RasterReadError(RsvlError):
    """A file exists but GDAL cannot read it as a raster (corrupt, truncated, wrong format)."""


class BandSelectionError(RsvlError):
    """The requested bands do not exist, or rsvl cannot tell which bands are RGB."""


class NoCRSError(RsvlError):
    """An operation needs a coordinate reference system and the raster has none."""


class GridError(RsvlError):
    """Tile size, overlap, batch size or target GSD are inconsistent."""


class OutputError(RsvlError):
    """An output path cannot be written (exists without --overwrite, bad suffix, no permission)."""


class ResumeError(RsvlError):
    """A partial run cannot be resumed (settings changed, state unreadable)."""


class PredictorError(RsvlError):
    """A predictor returned an array of the wrong shape or type."""


class UnknownModelError(RsvlError):
    """A model name is not in the registry."""


class WeightsNotFoundError(RsvlError):
    """The weights of a model are not available locally and cannot be downloaded."""


class WeightsChecksumError(WeightsNotFoundError):
    """A checkpoint's sha256 differs from the one its model card pins."""


class CheckpointMismatchError(RsvlError):
    """A checkpoint does not match the architecture it is loaded into."""


class PromptError(RsvlError):
    """A text prompt or class list is empty or malformed."""


class DatasetError(RsvlError):
    """A dataset folder or annotation file does not have the expected layout."""


class IndexNotFoundError(InputNotFoundError):
    """No embedding index at the given path."""


class IndexCorruptError(RsvlError):
    """An index folder exists but its files are missing, unreadable or inconsistent."""


class IndexOptionError(RsvlError):
    """An index option (``--index-type``, IVF or HNSW settings) is not one rsvl can build."""


class ModelMismatchError(RsvlError):
    """The model used to query or extend an index is not the one that built it."""


class DeviceError(RsvlError):
    """The requested device (``--device cuda``, ``mps``...) does not exist on this machine."""


class JobError(RsvlError):
    """A scaled run (``rsvl run``) is misconfigured: an unknown task or option, a bad job file."""


class AccessDeniedError(RsvlError):
    """A path given to the service lies outside its allowed roots (``rsvl serve --root``), or
    climbs out of them with ``..`` or a symbolic link."""


class UnauthorizedError(RsvlError):
    """The service wants a bearer token (``rsvl serve --token`` / ``RSVL_TOKEN``) and the
    request carries none or a wrong one."""


class RequestTooLargeError(RsvlError):
    """An upload or an image is larger than the service accepts (bytes or pixels)."""


class JobNotFoundError(InputNotFoundError):
    """No job, layer or job file with the given id on this service."""


class JobStateError(RsvlError):
    """A job cannot do what was asked in its current state (cancel a finished job, download
    the files of a job still running)."""


class CancelledError(RsvlError):
    """Work was cancelled on request (a service job deleted while it ran)."""
