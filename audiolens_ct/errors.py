"""Every error audiolens-ct raises on purpose, under one base class.

`AudiolensError` means "bad input or environment, explained in the message": the command line prints it as one
line (exit code 2) and never shows a traceback. Any other exception is a bug. The classes keep the built-in base
they had (`ValueError` for bad values, `RuntimeError` for a state), so `except ValueError` in user code still works.
"""

from __future__ import annotations


class AudiolensError(Exception):
    """Base of every error audiolens-ct raises on purpose; the message names the value and the way out."""


class InputError(AudiolensError, ValueError):
    """A bad argument to `prepare`, `trace` or `TraceConfig`: the message names the value."""


class AudioLoadError(AudiolensError, ValueError):
    """An audio file that cannot be read, or a waveform of the wrong shape or rate."""


class DataError(AudiolensError, ValueError):
    """A data source, manifest or track definition that cannot be used as given."""


class PortError(AudiolensError, ValueError):
    """An unknown port name, or a checkpoint no port recognises."""


class CheckpointError(AudiolensError, ValueError):
    """A checkpoint that cannot be loaded: the message names the path, file or key."""


class OutputDirError(AudiolensError, ValueError):
    """An output directory that cannot be created or written to."""


class RunMismatchError(AudiolensError, ValueError):
    """An output directory that holds a run with other settings (or library versions) than the one asked for."""


class RunLockedError(AudiolensError, RuntimeError):
    """Another live process is writing to the output directory."""


class ExactnessError(AudiolensError, RuntimeError):
    """The fast engine disagrees with full TransformerLens forwards on an audited cell."""


class ExecutorError(AudiolensError, RuntimeError):
    """A run's workers cannot be had: Ray missing, a cluster too small, workers unlike the driver, all dead."""


class UnsupportedHookError(AudiolensError, RuntimeError):
    """A hook is set where the fast engine's layers do not call hook points."""


SAMPLE_ERRORS = (AudioLoadError, InputError, DataError)
"""Problems of one sample's data: a data-set run records them in the sample's error record and goes on."""
