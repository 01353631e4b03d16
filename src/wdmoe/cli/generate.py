"""``wdmoe generate``: stream an answer here (the model in this process) or from a running BS."""

import sys
from dataclasses import dataclass
from typing import Annotated

import typer

from wdmoe.cli.common import (
    BuildProgress,
    answer_was_served,
    err,
    fail,
    quiet_transformers,
    resolve_token,
    stream_to_stdout,
)
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.policies import POLICIES


def generate(
    prompt: Annotated[str, typer.Argument(help="The user's prompt ('-' reads standard input).")],
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    policy: Annotated[
        str, typer.Option(help=f"Expert selection policy: {', '.join(POLICIES.names())}.")
    ] = "topk",
    top_k: Annotated[int | None, typer.Option("--top-k", help="Router candidates per token.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    chat: Annotated[bool, typer.Option(help="Use the model's chat template.")] = True,
    system: Annotated[str | None, typer.Option(help="System message for chat models.")] = None,
    bs: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running `wdmoe serve-bs`: generate there instead.")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="The BS's token with --bs (default: $WDMOE_TOKEN).")
    ] = None,
    timeout_s: Annotated[
        float | None, typer.Option(help="With --bs: give up on the whole request after this long.")
    ] = None,
    idle_timeout_s: Annotated[
        float, typer.Option(help="With --bs: give up when the BS says nothing for this long (0: never).")
    ] = 60.0,
    tls_cert: Annotated[str | None, typer.Option(help="With --bs: PEM client certificate (mTLS).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="With --bs: PEM key of the client certificate.")] = None,
    tls_ca: Annotated[str | None, typer.Option(help="With --bs: PEM CA that signed the BS (TLS).")] = None,
) -> None:
    """Generate text with wdmoe installed, streaming tokens to the terminal (here, or at a BS)."""
    from wdmoe.generate import generate as run_generate
    from wdmoe.models.install import install
    from wdmoe.models.loading import load_checkpoint
    from wdmoe.policies import make_policy

    quiet_transformers()
    if prompt == "-":
        prompt = sys.stdin.read()
    if bs is not None:
        req = (prompt, max_new_tokens, temperature, top_p, seed, chat, system)
        link = BSLink(bs, token, timeout_s, idle_timeout_s, (tls_cert, tls_key, tls_ca))
        return generate_at_bs(link, *req)
    try:
        chosen = make_policy(policy)
        if max_new_tokens < 1:
            raise fail(ValueError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}"))
        if temperature < 0 or not 0 < top_p <= 1:
            raise fail(
                ValueError(f"--temperature must be ≥ 0 and --top-p in (0, 1], got {temperature}, {top_p}")
            )
        with BuildProgress() as progress:
            net, tok = load_checkpoint(model, progress=progress)
        wm = install(net, chosen)
        if top_k is not None:
            wm.set_top_k(top_k)
        err.print(
            f"[dim]{model} · {wm.adapter.name} · {len(wm.blocks)} MoE layers · "
            f"{wm.num_experts} experts · top-{wm.top_k} · policy {policy}[/]"
        )
        result = run_generate(
            wm,
            tok,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            chat=chat,
            system=system,
            on_text=stream_to_stdout,
        )
    except WdmoeError as e:
        raise fail(e) from e
    sys.stdout.write("\n")
    err.print(
        f"[dim]prompt {result.prompt_tokens} tok · prefill {result.prefill_s:.2f} s · "
        f"{result.new_tokens} new tok at {result.decode_tokens_per_s:.1f} tok/s · "
        f"{result.experts_per_token:.2f} experts/token/layer[/]"
    )


@dataclass(frozen=True)
class BSLink:
    """How `generate --bs` reaches the BS: address, token, deadlines, TLS files (cert, key, ca)."""

    address: str
    token: str | None
    timeout_s: float | None
    idle_s: float
    tls: tuple[str | None, str | None, str | None]

    def check(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be > 0, got {self.timeout_s}")
        if not self.idle_s >= 0:
            raise ConfigError(f"--idle-timeout-s must be ≥ 0 (0: never), got {self.idle_s}")


def generate_at_bs(
    link: BSLink,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    chat: bool,
    system: str | None,
) -> None:
    """`wdmoe generate --bs`: the BS's generate API, the answer streamed as it comes."""
    from wdmoe.runtime import api
    from wdmoe.runtime.client import BSClient
    from wdmoe.runtime.security import TLSFiles

    def queued(position: int) -> None:
        err.print(f"[dim]queued at the BS: place {position} in line…[/]")

    try:
        link.check()
        req = api.GenerateRequest(prompt, max_new_tokens, temperature, top_p, seed, chat, system)
        api.parse_generate(api.encode_generate(req))  # the BS's own checks, before connecting
        tls = TLSFiles.from_options(*link.tls)
        with BSClient(link.address, resolve_token(link.token), tls) as client:
            m = client.generate(req, stream_to_stdout, link.timeout_s, link.idle_s or None, queued)
    except WdmoeError as e:
        raise fail(e) from e
    sys.stdout.write("\n")
    err.print(
        f"[dim]BS {link.address} · prompt {m['prompt_tokens']} tok · "
        f"TTFT {1e3 * (m['ttft_s'] or 0):.0f} ms · "
        f"{m['new_tokens']} new tok · {m['expert_calls']} expert calls, {m['dropped']} dropped, "
        f"{m['fallbacks']} at the BS[/]"
    )
    if not answer_was_served(m):
        raise typer.Exit(code=1)
