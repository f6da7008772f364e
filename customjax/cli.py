"""What the command-line entry points share: flag parsing whose errors are one line (a config typo,
a missing config file, an unknown variant), and the exit codes a scheduler reads.

Logging: warnings only, unless ``--verbosity 0`` (INFO) or ``1`` (DEBUG) is given (:func:`quiet_logs`).

Exit codes: 0 finished; 2 a usage error (bad flags or config, a missing file); 65 training diverged
(non-finite losses past ``train.max_bad_steps``; the last good checkpoint is kept, nothing exported);
75 stopped for a preemption after saving a checkpoint: run the same command again to resume
(``launch/slurm.sbatch`` requeues the job)."""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DIVERGED = 65
EXIT_PREEMPTED = 75


def describe(e: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error met while reading flags and configs: ml_collections' unknown-key
    messages get the flag that named the key, a config file that failed to load its first cause."""
    text = str(e)
    if isinstance(e, (KeyError, AttributeError)):
        text = text.strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
        key = re.match(r"'?([\w.]+)'?", text)
        flag = next((a.split("=")[0] for a in argv if key and a.startswith("--config.")
                     and a.split("=")[0].rsplit(".", 1)[-1] == key.group(1)), None)
        return f"{flag or 'config'}: unknown key {text}"
    missing = re.search(r"No such file or directory: '([^']+)'", text)
    if missing:
        return f"config file {missing.group(1)} does not exist"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[-2:] if len(lines) > 2 else lines) or type(e).__name__


def parse_flags(prog: str, config_flags: Sequence[str] = ("config",), *, usage: str | None = None,
                doc: str | None = None, positionals: Sequence[str] | None = None,
                flag_values=None) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: parses the flags, and on an error (an unknown or
    misspelt config key, a config file that does not exist or fails, a bad flag value) writes
    ``<prog>: <one line>`` to stderr and exits with :data:`EXIT_USAGE`. ``config_flags``: the
    command's ml_collections config flags, loaded here so that their errors surface now.

    ``--help`` (also ``-h``, ``-?``, ``--helpshort``) prints :func:`help_text` (``usage``, ``doc`` and
    the command's own flags) to stdout and exits with :data:`EXIT_OK`; ``--helpfull`` lists every
    module's flags (absl's ``--verbosity``, orbax's, grain's, ...) as well. ``usage``: the usage line
    (default ``python -m <prog> [flags]``); ``doc``: the text under it (default: ``__main__``'s
    docstring). ``positionals``: the names of the command's positional arguments, all required
    (another count is a usage error); ``None``: not checked, whatever follows the flags is passed to
    ``main``. ``flag_values``: the ``FlagValues`` to parse into (default absl's ``flags.FLAGS``;
    another one, as :func:`call` gives, leaves the process's logging alone)."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        fv = flags.FLAGS if flag_values is None else flag_values
        asked = _help_asked(argv, fv)
        if asked:
            sys.stdout.write(help_text(prog, fv, usage=usage, doc=doc, full=asked == "full"))
            sys.stdout.flush()
            sys.exit(EXIT_OK)
        try:
            args = fv(argv)
            for name in config_flags:      # a config file that failed to load raises on first use
                if name in fv and fv[name].value is not None:
                    fv[name].value.keys()
            if flag_values is None:
                quiet_logs()
        except flags.Error as e:
            fail(prog, str(e))
        except (OSError, KeyError, AttributeError, ValueError, TypeError) as e:
            fail(prog, describe(e, argv))
        if positionals is not None and len(args) - 1 != len(positionals):
            got = f"{len(args) - 1}: {' '.join(args[1:])}" if len(args) > 1 else "none"
            want = (f"expected {len(positionals)} positional argument(s) ({' '.join(positionals)})" if positionals
                    else "takes no positional arguments")
            fail(prog, f"{want}, got {got} (usage: {usage or f'python -m {prog} [flags]'})")
        return args
    return parse


_HELP = {"--help": "short", "-help": "short", "--helpshort": "short", "-helpshort": "short", "-?": "short",
         "-h": "short", "--helpfull": "full", "-helpfull": "full"}


def _help_asked(argv: Sequence[str], fv) -> str | None:
    """``"short"`` / ``"full"`` when ``argv`` asks for help before a ``--`` (``-h`` only where the
    command has no flag ``h``), else ``None``."""
    for arg in argv[1:]:
        if arg == "--":
            return None
        kind = _HELP.get(arg)
        if kind and not (arg == "-h" and "h" in fv):
            return kind
    return None


def _own_modules(fv) -> list[str]:
    """The modules whose flags are the command's: ``__main__`` (absl names it by its file) and
    customjax's, not those the libraries define on import (absl's logging, orbax, grain, ...)."""
    import os

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    main = sys.argv[0] if sys.argv else ""
    return [m for m in fv.flags_by_module_dict()
            if m == main or m.split(".")[0] == "customjax"
            or (m.endswith(".py") and os.path.abspath(m).startswith(package))]


def help_text(prog: str, fv=None, *, usage: str | None = None, doc: str | None = None, full: bool = False) -> str:
    """What ``--help`` prints: the usage line, the description (``doc``, default ``__main__``'s
    docstring) and the command's own flags with their help strings; ``full`` adds every other
    module's flags."""
    from absl import flags

    fv = flags.FLAGS if fv is None else fv
    if doc is None:
        doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    lines = [f"usage: {usage or f'python -m {prog} [flags]'}", ""]
    if doc.strip():
        lines += [doc.strip("\n").rstrip(), ""]
    own = _own_modules(fv)
    body = [ln for m in own for ln in fv.module_help(m).splitlines() if ln.startswith(" ")]  # not the module's name
    lines += ["flags:", *(body or ["  (none)"]), ""]
    if full:
        lines += ["flags of the other modules:", fv.get_help(), ""]
    else:
        lines += ["absl's flags (--verbosity 0 for INFO logs, ...) and the libraries': --helpfull", ""]
    return "\n".join(lines)


def call(prog: str, define_flags: Callable, main: Callable, args: Sequence[str], **parse_kw) -> int:
    """Runs a command in this process as ``python -m <prog> *args`` would, on a fresh set of flags
    (absl's global ``flags.FLAGS`` untouched, so that calls do not see each other's values):
    ``define_flags(fv)`` defines its flags on the new ``FlagValues``, :func:`parse_flags` (with
    ``parse_kw``) parses, ``main(argv, fv)`` runs. Returns main's result (``None`` as 0); a usage
    error exits (``SystemExit`` with :data:`EXIT_USAGE`) as on the command line."""
    from absl import flags

    fv = flags.FlagValues()
    define_flags(fv)
    argv = parse_flags(prog, flag_values=fv, **{"config_flags": (), **parse_kw})([prog, *args])
    result = main(argv, fv)
    return EXIT_OK if result is None else result


def quiet_logs() -> None:
    """Warnings and errors only (progress bars and each command's summary lines stay), unless
    ``--verbosity`` (absl's flag: 0 = INFO, 1 = DEBUG) was given: the INFO of orbax, absl and jax is
    a flood a person does not read."""
    import logging

    from absl import flags
    from absl import logging as absl_logging

    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)


def fail(prog: str, message: str, code: int = EXIT_USAGE):
    """Writes ``<prog>: <message>`` to stderr and exits with ``code``."""
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def run(prog: str, define_flags: Callable, main: Callable, config_flags: Sequence[str] = (), **parse_kw) -> None:
    """The ``__main__`` of a command: defines its flags on absl's ``flags.FLAGS`` and runs ``main``
    under :func:`parse_flags` (``parse_kw``: usage, doc, positionals)."""
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags(prog, config_flags, **parse_kw))
