"""Every error kpjax raises on purpose, in one place, so callers (and the CLIs' exit statuses) can tell
a user's mistake from a run that failed.

* `UserError` (a ValueError): bad input, config, file, checkpoint or dataset. The message names what
  was given and what was expected; the CLIs print it as one `error:` line and exit with status 2,
  having written nothing.
* `RunFailed` (a RuntimeError): the input was fine but the run did not go through (training diverged,
  a distributed job could not start, images could not be read); exit status 1.

Nothing here imports anything: every layer may raise these.
"""

from __future__ import annotations

from typing import Iterable


class UserError(ValueError):
  """A user's mistake; the message says what was given and what was expected (exit status 2)."""


class RunFailed(RuntimeError):
  """The run itself failed (not a user's mistake); the message says why and what was kept (exit status 1)."""


# ---- Configs -----------------------------------------------------------------------------------

class ConfigFileError(UserError):
  """A config file that does not exist, does not load, or an override that does not fit it."""


class ConfigError(UserError):
  """A config field with a value kpjax cannot use; the message names the field and what it expects."""


# ---- Files and checkpoints ---------------------------------------------------------------------

class TargetExistsError(FileExistsError):
  """An output that already exists and replacing it was not asked for; the message names the flag that asks."""


class CheckpointError(UserError):
  """A checkpoint that is missing, unreadable or not a kpjax model; the message says which and why."""


class SpecMismatch(UserError):
  """Two descriptions of a model disagree (or one is not a model kpjax can build); says which fields."""


class TorchFileError(UserError):
  """A file that is missing, damaged or not a torch.save'd model or state dict; the message says which."""


class UnsafeTorchFileError(TorchFileError):
  """A pickle naming globals outside the allowlist; refused before anything was unpickled."""

  def __init__(self, path: str, names: Iterable[str], allowed: str):
    self.names = sorted(set(names))
    super().__init__(
        f'refusing to read {path}: its pickle needs {", ".join(self.names)}, which '
        f'{"is" if len(self.names) == 1 else "are"} not allowed here: {allowed}. Nothing from the file was run. '
        'If you trust the file, load it in PyTorch and save just the weights: '
        "torch.save(model.state_dict(), 'weights.pth').")


class BackboneError(UserError):
  """A file that is not VGG19's ImageNet state dict, or a network it does not fit; the message says which."""


class ConversionError(UserError):
  """A PyTorch checkpoint or kpjax model that cannot become the requested other one (convert/)."""


class LayoutError(ConversionError):
  """Parameters that do not fit the KPDEM network; the message names keys and shapes and says what to do."""


class StorageAccessError(UserError):
  """A Cloud Storage path kpjax cannot use: the gcs extra missing, no such bucket, no credentials, or
  permission denied; the message names the path, the cause and the fix (kpjax.io.paths)."""


class MetricsFileError(UserError):
  """A metrics.jsonl line that is not a JSON object; the message names the file and line."""


# ---- Data --------------------------------------------------------------------------------------

class ImageError(UserError):
  """An image that cannot be decoded (corrupt, truncated, not an image); the message names it."""


class KeypointSetError(UserError):
  """A keypoint set (kpjax.data.keypoint_sets) that is inconsistent, or a category or sigma it does not have."""


class ImageTooLarge(ImageError):
  """An image with more pixels than the decoder was told to accept (a decompression bomb, or just huge)."""


class CsvFormatError(UserError):
  """A malformed FashionAI CSV file or row; the message says where and what was expected."""


class BuildError(UserError):
  """Bad or missing input data for a dataset build; the message names the file, row and image."""


class DatasetNotFoundError(UserError):
  """The TFDS dataset (or the requested split) is not where the config says; the message says how to build it."""


# ---- Running models ----------------------------------------------------------------------------

class EvaluationError(UserError):
  """Inputs that cannot be scored; the message names the image or file."""


class PredictionError(UserError):
  """A prediction request that cannot run: no images, a category the model lacks, a bad --categories file."""


class ExportError(UserError):
  """A request kpjax.export cannot carry out: bad flags, an existing output, a missing optional package."""


# ---- Runs that fail ----------------------------------------------------------------------------

class TrainingError(RunFailed):
  """Training cannot go on (a diverged loss); the message says why and what is kept."""


class StorageFailed(RunFailed):
  """The storage service kept failing (after the client libraries' retries) during a run; the message names
  the path, the cause and what was kept."""


class DistributedStartupError(RunFailed):
  """The job has several processes but they could not be joined; the message names the environment
  detected, the cause, and what to fix."""
