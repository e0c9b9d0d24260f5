"""Known failures as one line: `Error: ...` and exit status 1, never a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click


def _known_errors() -> tuple[type[BaseException], ...]:
    from diffret.cache.manifest import CacheError

    errors: list[type[BaseException]] = [CacheError, FileNotFoundError, ValueError, PermissionError]
    for mod, names in (
        ("diffret.cache.lock", ["LockError"]),
        ("diffret.generator.checkpoint", ["GeneratorError"]),
        ("diffret.generator.device", ["DeviceError"]),
        ("diffret.generator.trainer", ["TrainingError"]),
    ):
        m = __import__(mod, fromlist=names)
        errors += [getattr(m, n) for n in names]
    if "diffret.extract.stage1" in sys.modules:  # only loaded by `extract`
        from diffret.extract.backbone import BackboneError
        from diffret.extract.checkpoint import CheckpointError
        from diffret.extract.dump import OutputError
        from diffret.extract.stage1 import ExtractError

        errors += [BackboneError, CheckpointError, ExtractError, OutputError]
    return tuple(errors)


@contextmanager
def clear_errors():
    """Turn the project's known failures into a one-line message and exit status 1."""
    try:
        yield
    except click.exceptions.Exit:
        raise
    except Exception as e:
        if isinstance(e, _known_errors()):
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        raise
