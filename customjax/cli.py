"""What the command-line entry points share: flag parsing whose errors are one line (a config typo,
a missing config file, an unknown variant), and the exit codes a scheduler reads.

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


def parse_flags(prog: str, config_flags: Sequence[str] = ("config",)) -> Callable[[list[str]], list[str]]:
    """A ``flags_parser`` for ``absl.app.run``: parses the flags, and on an error (an unknown or
    misspelt config key, a config file that does not exist or fails, a bad flag value) writes
    ``<prog>: <one line>`` to stderr and exits with :data:`EXIT_USAGE`. ``config_flags``: the
    command's ml_collections config flags, loaded here so that their errors surface now."""
    from absl import flags

    def parse(argv: list[str]) -> list[str]:
        try:
            args = flags.FLAGS(argv)
            for name in config_flags:      # a config file that failed to load raises on first use
                if name in flags.FLAGS and flags.FLAGS[name].value is not None:
                    flags.FLAGS[name].value.keys()
            return args
        except flags.Error as e:
            msg = str(e)
        except (OSError, KeyError, AttributeError, ValueError, TypeError) as e:
            msg = describe(e, argv)
        fail(prog, msg)
    return parse


def fail(prog: str, message: str, code: int = EXIT_USAGE):
    """Writes ``<prog>: <message>`` to stderr and exits with ``code``."""
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()
    sys.exit(code)
