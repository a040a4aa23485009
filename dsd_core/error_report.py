"""One error family on every surface: low-level exceptions translated to :mod:`dsd_core.errors`, and the CLI's
one-line report.

Most problems are caught before loading (:mod:`dsd_core.validation`) and raise the package's errors directly. What
can only happen later -- a disk that fills up while saving, memory that runs out, a damaged file diffusers or PEFT
trips over, a LoRA in a layout the header check cannot read -- arrives as an ``OSError``, ``RuntimeError``,
``SafetensorError``, ``ValueError`` from PEFT, ... :func:`translate` turns the common ones into a
:class:`~dsd_core.errors.DSDError` with the cause and the fix. :func:`report` is what the CLI does with any exception:
one ``error:`` line on stderr (the traceback only with ``-v``) and an exit code.
"""

from __future__ import annotations

import errno
import sys
import traceback

from .errors import DSDError, InputError, ModelFormatError

#: Exit codes: a problem the user can fix, an unexpected failure.
EXIT_USER = 2
EXIT_BUG = 1


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def translate(e: BaseException) -> DSDError | None:
    """The package error for a common low-level exception, or None if it is not one we can explain."""
    if isinstance(e, DSDError):
        return e
    name = type(e).__name__
    module = type(e).__module__ or ""
    text = str(e)
    if isinstance(e, FileExistsError):
        return InputError(_first_line(e))
    if name == "SafetensorError" or "safetensors" in module:
        return ModelFormatError(f"a weights file is not valid safetensors ({_first_line(e)}): it is truncated or "
                                "damaged; download it again.")
    if name == "DecompressionBombError":
        return InputError(f"the image is too large to open safely ({_first_line(e)}); downscale it first.")
    if name == "NoMatchingPeftModuleError" or "target modules" in text and "not found in the base model" in text:
        return ModelFormatError(f"the LoRA does not fit the DSD transformer ({_first_line(e)}); pass the DSD LoRA "
                                "(pytorch_lora_weights.safetensors of primecai/dsd_model) or a LoRA trained for DSD.")
    if isinstance(e, (RuntimeError, ValueError)) and ("size mismatch" in text or "Error(s) in loading state_dict"
                                                      in text):
        first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), _first_line(e))
        return ModelFormatError(f"weights do not fit the model they are loaded into ({first}); the file belongs to "
                                "another model or size, or its config.json does not match: download it again.")
    if name == "OutOfMemoryError" or (isinstance(e, RuntimeError) and ("out of memory" in text.lower() or
                                                                       "can't allocate memory" in text.lower() or
                                                                       "not enough memory" in text.lower())):
        return DSDError(f"ran out of memory ({_first_line(e)}); use a smaller canvas or fewer images, a memory "
                        "preset (--memory / memory=), or a machine with more memory.")
    if isinstance(e, MemoryError):
        return DSDError("ran out of memory; use a smaller canvas or fewer images, a memory preset (--memory / "
                        "memory=), or a machine with more memory.")
    if isinstance(e, AssertionError) and "CUDA" in text:
        return InputError(f"{_first_line(e)}; this PyTorch or machine has no CUDA: use the cpu device.")
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT if hasattr(errno, "EDQUOT") else -1):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return DSDError(f"cannot write{where}: the disk is full; free some space or write to another disk.")
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        return DSDError(f"cannot access{where}: {e.strerror or _first_line(e)}; choose a writable/readable location.")
    if isinstance(e, OverflowError) and "tokenizer" in "".join(traceback.format_tb(e.__traceback__)).lower():
        return ModelFormatError(f"a tokenizer folder is empty or damaged ({_first_line(e)}); download the base's "
                                "tokenizer/ and tokenizer_2/ folders again.")
    return None


def report(e: BaseException, verbose: bool = False, stream=None) -> int:
    """Print ``error: <message>`` for ``e`` (translated when possible) and return the exit code.

    The traceback is printed only when ``verbose``; an unexplained exception says how to see it.
    """
    stream = stream or sys.stderr
    known = translate(e)
    if verbose:
        traceback.print_exception(type(e), e, e.__traceback__, file=stream)
    if known is not None:
        print(f"error: {known}", file=stream)
        return EXIT_USER
    hint = "" if verbose else " (run with -v for the traceback)"
    print(f"error: unexpected {type(e).__name__}: {_first_line(e)}{hint}", file=stream)
    return EXIT_BUG


def reraise_translated(e: BaseException):
    """Raise the translated error (chained to ``e``) if there is one, else re-raise ``e`` unchanged."""
    known = translate(e)
    if known is None or known is e:
        raise e
    raise known from e
