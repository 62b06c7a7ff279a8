"""Fake of ``modules/shared_cmd_options.py``: the parsed ``cmd_opts``.

The real module parses ``sys.argv`` (+ ``COMMANDLINE_ARGS``); under pytest that would be pytest's
own argv, so the stub parses :data:`STUB_ARGV` instead: the flags of the verified CPU run in the
host-API research (``--use-cpu all --no-half --precision full``) plus ``--no-prompt-history`` so that
processing never writes ``params.txt``. Tests may change attributes of ``cmd_opts`` freely.
"""
from __future__ import annotations

from modules import cmd_args, paths_internal

STUB_ARGV = ["--use-cpu", "all", "--no-half", "--precision", "full", "--skip-version-check", "--no-prompt-history"]

parser = cmd_args.parser
cmd_opts = parser.parse_args(STUB_ARGV)
cmd_args.apply_path_defaults(cmd_opts, {name: getattr(paths_internal, name) for name in paths_internal._PATH_NAMES})

cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
