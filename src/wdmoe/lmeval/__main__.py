"""``python -m wdmoe.lmeval ARGS``: lm-eval's own CLI with the model ``wdmoe`` and the offline tasks.

lm-eval 0.4.13 only knows models that were imported (it has no plugin entry points), so this
registers the adapter, writes the local task YAMLs into a temporary folder passed as
``--include_path`` (unless the command gives its own: then write them there first with
``python -m wdmoe.lmeval --write-tasks FOLDER [DATA_DIR]``), and hands the arguments to
``lm_eval``'s entry point.
"""

import logging
import shutil
import sys
import tempfile
from pathlib import Path

from wdmoe.lmeval.tasks import go_offline, write_tasks

log = logging.getLogger("wdmoe.lmeval")


def with_include_path(argv: list[str], folder: Path) -> list[str]:
    """``argv`` plus ``--include_path folder`` when it runs or lists tasks and names no folder itself."""
    if not argv or any(a in ("-h", "--help") for a in argv):
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        log.warning(
            "--include_path given: the wdmoe_* tasks are found only if written there "
            "(python -m wdmoe.lmeval --write-tasks FOLDER)"
        )
        return argv
    return [*argv, "--include_path", str(folder)]


def show_wdmoe_logs() -> None:
    """lm-eval configures only its own logger; the adapter's latency summary is logged under wdmoe."""
    logger = logging.getLogger("wdmoe")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-8s [%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def write_tasks_cmd(args: list[str]) -> None:
    """``--write-tasks FOLDER [DATA_DIR]``: the task YAMLs, for lm-eval's ``--include_path FOLDER``."""
    if not 1 <= len(args) <= 2:
        raise SystemExit("usage: python -m wdmoe.lmeval --write-tasks FOLDER [DATA_DIR]")
    names = write_tasks(Path(args[0]), Path(args[1]) if len(args) == 2 else None)
    print(f"wrote {', '.join(names)} into {args[0]} (lm_eval --include_path {args[0]})")


def main(argv: list[str] | None = None) -> None:
    go_offline()
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--write-tasks"]:
        return write_tasks_cmd(args[1:])
    from lm_eval.__main__ import cli_evaluate

    import wdmoe.lmeval.adapter  # noqa: F401  (registers the model "wdmoe")

    show_wdmoe_logs()
    folder = Path(tempfile.mkdtemp(prefix="wdmoe-lmeval-tasks-"))
    try:
        args = with_include_path(args, folder)
        if "--include_path" in args and str(folder) in args:
            write_tasks(folder)
        sys.argv = ["lm_eval", *args]
        cli_evaluate()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
