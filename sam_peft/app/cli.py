"""`sam-peft app`: argument parser and runner, wired in by sam_peft/cli.py."""
from __future__ import annotations

import argparse
import os
import typing

from ..data.options import WINDOWS, parse_window
from ..evaluation.cli import add_model_arguments, load_model
from ..models.options import DEFAULT_ADAPTER, DEFAULT_MODEL
from .options import MAX_UPLOAD_MB

if typing.TYPE_CHECKING:
    from .state import AppModel


def add_app_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "app", help="interactive web app: click organs on a CT, propagate, export labels (needs the app extra)",
        description="Serve the gradio app. It binds to 127.0.0.1 unless --host says otherwise; --share makes a "
        "public gradio link. Only uploaded files and the bundled example are ever read.",
    )
    add_model_arguments(parser, bundled_default=True)
    parser.add_argument("--label-map", help="organs offered and their output ids: preset or JSON/YAML file "
                        "(default: the adapter's training label map, else totalsegmentator)")
    parser.add_argument("--window", default="abdomen", type=parse_window,
                        help=f"CT window the model was trained with: {', '.join(WINDOWS)} or LEVEL,WIDTH in HU")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 serves every network "
                        "this machine is on: only when you mean it)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest upload accepted")
    return parser


def load_app_model(args: argparse.Namespace) -> AppModel:
    """The base, with --adapter, or by default the bundled adapter for that base when it is installed."""
    from .state import AppModel

    model, adapter = load_model(args)
    if adapter:
        note = f"{args.model} + adapter {adapter}"
    elif args.model == DEFAULT_MODEL:  # the page says why lone clicks fail
        why = "--no-adapter" if args.no_adapter else f"{DEFAULT_ADAPTER} is not installed"
        note = f"{args.model} without an adapter ({why}): it answers boxes well, single clicks poorly"
    else:
        note = f"{args.model} without an adapter"
    app = AppModel.create(model, note, args.window, args.label_map)
    app.warm_up()
    return app


def run_app(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a medical-image tool reports nothing home
    try:
        from .app import build_app
    except ImportError as error:
        raise ValueError(f"the web app needs gradio: pip install 'sam_peft[app]' ({error})") from error
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    app = load_app_model(args)
    print(f"model: {app.note}")
    build_app(app, args.max_upload_mb).queue().launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=f"{args.max_upload_mb}mb")
