"""The ``wdmoe`` typer app: every command registered under its name, in the order `--help` lists
them. Each command lives in its own module; they share :mod:`wdmoe.cli.common` only."""

import typer

from wdmoe.cli.cell import cell_app
from wdmoe.cli.dashboard import dashboard_cmd
from wdmoe.cli.demo import demo
from wdmoe.cli.eval import eval_cmd
from wdmoe.cli.generate import generate
from wdmoe.cli.load import load_cmd
from wdmoe.cli.model import model_app
from wdmoe.cli.plan import plan_cmd
from wdmoe.cli.report import report_cmd, reproduce_cmd
from wdmoe.cli.runtime import cluster_cmd, device_cmd, serve_bs_cmd, stats_cmd
from wdmoe.cli.sweep import sweep_cmd

app = typer.Typer(help="WDMoE: wireless distributed Mixture-of-Experts LLMs.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(cell_app, name="cell")
app.command("report")(report_cmd)
app.command("reproduce")(reproduce_cmd)
app.command("sweep")(sweep_cmd)
app.command("cluster")(cluster_cmd)
app.command("serve-bs")(serve_bs_cmd)
app.command("stats")(stats_cmd)
app.command(
    "device",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)(device_cmd)
app.command("generate")(generate)
app.command("demo")(demo)
app.command("eval")(eval_cmd)
app.command("load")(load_cmd)
app.command("plan")(plan_cmd)
app.command("dashboard")(dashboard_cmd)


def main() -> None:
    app()
