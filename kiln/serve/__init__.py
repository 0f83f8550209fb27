"""``kiln serve``: an artifact behind an HTTP server (FastAPI and uvicorn) with dynamic batching.

    kiln serve model.kiln --port 8000 --max-batch 8 --max-delay-ms 5
    python -m kiln.serve model.kiln ...        # the same, on a deploy-only install (kiln-runtime[serve])

    from kiln.serve import create_app, ServeOptions
    app = create_app(kiln.runtime.load("model.kiln"), ServeOptions(max_batch=16))  # an ASGI app

It stands on :mod:`kiln.runtime` alone, never on the compiler. This package's ``__init__``
imports nothing heavy, so the CLI can build its parser from :mod:`kiln.serve.options`;
FastAPI, uvicorn and prometheus_client (the ``serve`` extra) load with :mod:`kiln.serve.app`.
"""

from __future__ import annotations

from typing import Any

from kiln.serve.options import ServeOptions, add_serve_arguments, options_from_args

__all__ = ["ServeOptions", "add_serve_arguments", "create_app", "options_from_args", "serve"]


def create_app(model: Any, options: ServeOptions | None = None, *, name: str | None = None) -> Any:
    """The FastAPI app serving ``model`` (see :func:`kiln.serve.app.create_app`)."""
    from kiln.serve.app import create_app as create

    return create(model, options, name=name)


def serve(artifact: str, options: ServeOptions) -> None:
    """Load ``artifact`` and serve it until SIGTERM (which drains) or Ctrl-C."""
    try:
        from kiln.serve.app import run_server
    except ImportError as e:
        from kiln.errors import KilnError

        raise KilnError(f"kiln serve needs the serve extra ({e.name} is missing): "
                        "pip install 'kiln-compiler[serve]' (or 'kiln-runtime[serve]')") from None
    import kiln.runtime

    model = kiln.runtime.load(artifact, threads=options.threads, trusted_keys=options.trust)
    run_server(model, options, name=str(artifact))
