"""`koedge run`, `koedge chat`, `koedge validate`: the runtime's commands (runtime imports only)."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import KoedgeError


def chunk_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError("a number of tokens (0 = one call) or 'auto'")
    return int(text)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle folder (has koedge.json)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--prefill-chunk", type=chunk_arg, default="auto", metavar="N|auto",
                        help="prompt tokens per call; auto (default) keeps a call's logits under 64 MiB, 0 = one call")
    parser.add_argument("--no-io-binding", action="store_true", help="feed the KV cache through numpy (reference path)")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail in the timing lines")


def _sampling(args: argparse.Namespace, stop_token_ids: list[int] | None = None):
    from runtime.generate import SamplingConfig

    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop), stop_at_eos=not args.ignore_eos,
                            stop_token_ids=list(stop_token_ids or []))
    config.check()
    return config


def _open(args: argparse.Namespace, open_session: bool = True):
    from runtime.generate import load
    from runtime.session import SessionConfig

    return load(args.bundle, SessionConfig(threads=args.threads), open_session=open_session)


def _generator(lm, args: argparse.Namespace):
    from runtime.generate import Generator

    return Generator(lm, io_binding=not args.no_io_binding, prefill_chunk=args.prefill_chunk)


def _timing(result, verbose: bool) -> str:
    from runtime.memory import MIB, peak_rss

    line = result.timing_line()
    if verbose:
        peak = peak_rss()
        line += f" · prefill {result.prefill_seconds:.2f} s · KV {result.kv_bytes / MIB:.1f} MiB"
        if peak:
            line += f" · peak RSS {peak / MIB:,.0f} MiB"
    return line


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from runtime.generate import end_of_turn_ids, render_chat

    lm = _open(args, open_session=False)
    if args.chat:
        ids = render_chat(lm, [{"role": "user", "content": args.prompt}])
        config = _sampling(args, end_of_turn_ids(lm))
    else:
        ids = lm.encode(args.prompt)
        config = _sampling(args)
    lm.release_encoder()  # one prompt: the encoder goes before the weights come in (a lower peak)
    lm.open_session()
    generator = _generator(lm, args)
    generator.check_prompt(ids)
    if not args.chat:
        _print(args.prompt)
    result = generator.generate(ids, config, on_text=_print)
    _print("\n")
    print(_timing(result, args.verbose), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from runtime.generate import chat_template, end_of_turn_ids, render_chat

    lm = _open(args)
    generator = _generator(lm, args)
    templated = chat_template(lm) is not None
    config = _sampling(args, end_of_turn_ids(lm) if templated else [])
    if templated:
        render_chat(lm, [{"role": "user", "content": "test"}])  # fail now (no jinja2, bad template), not mid-chat
    else:
        print("(this bundle has no chat template: each line continues the text so far)", file=sys.stderr)
    print("(Ctrl-D to quit)", file=sys.stderr)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    transcript: list[int] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if templated:
            messages.append({"role": "user", "content": line})
            ids = render_chat(lm, messages)
        else:
            ids = transcript + lm.encode(line + "\n", add_bos=not transcript)
        if len(ids) + 1 >= generator.context:
            raise KoedgeError(f"the conversation reached the model's context of {generator.context} tokens")
        try:
            result = generator.generate(ids, config, on_text=_print)
        except KeyboardInterrupt:
            _print("\n[stopped]\n")
            generator.cached = []  # the cache may hold a half-finished step
            continue
        _print("\n")
        print(_timing(result, args.verbose), file=sys.stderr)
        messages.append({"role": "assistant", "content": result.text})
        transcript = ids + [token for token in result.tokens if token not in generator.eos]


def cmd_validate(args: argparse.Namespace) -> int:
    from runtime.memory import parse_size
    from runtime.validate import ValidateConfig, describe, validate

    config = ValidateConfig(mem_cap=parse_size(args.mem_cap), prompt_tokens=args.prompt_tokens,
                            new_tokens=args.new_tokens, threads=args.threads, timeout=args.timeout,
                            mechanism=args.mechanism, prefill_chunk=args.prefill_chunk)
    report = validate(args.bundle, config)
    print(report.to_json() if args.json else describe(report))
    if not report.passed and args.json:
        print(f"koedge: {report.verdict}", file=sys.stderr)
    return 0 if report.passed else 2


def add_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="generate text from a prompt, streamed",
                              description="Continue a prompt with a bundle (KV cache through I/O binding) and "
                                          "stream the text; timing on stderr at the end.")
    _add_model_options(run)
    run.add_argument("prompt", help="the prompt text, e.g. 대한민국의 수도는")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    run.set_defaults(func=cmd_run)

    chat = commands.add_parser("chat", help="interactive chat with a bundle (Ctrl-D quits)",
                               description="Talk to a bundle line by line; uses its chat template when it has one "
                                           "and reuses the KV cache of the conversation so far.")
    _add_model_options(chat)
    chat.add_argument("--system", default=None, help="a system message (if the template accepts one)")
    chat.set_defaults(func=cmd_chat)

    check = commands.add_parser("validate", help="run load -> prefill -> decode under an enforced memory cap",
                                description="Run the bundle in a child process whose memory is capped (cgroup, else "
                                            "address-space limit + RSS watchdog); report peak RSS, load time, TTFT "
                                            "and decode speed against the predicted budget. Exit 2 on FAIL.")
    check.add_argument("bundle", help="bundle folder")
    check.add_argument("--mem-cap", required=True, help="memory cap, e.g. 3GiB, 3GB, 2500MB")
    check.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    check.add_argument("--new-tokens", type=int, default=256, help="tokens to decode (default 256)")
    check.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: all cores)")
    check.add_argument("--timeout", type=float, default=900.0, help="seconds before the run counts as FAIL")
    check.add_argument("--mechanism", choices=["auto", "cgroup", "rlimit"], default="auto",
                       help="how the cap is enforced (default: a cgroup when writable, else rlimit + watchdog)")
    check.add_argument("--prefill-chunk", type=chunk_arg, default="auto", metavar="N|auto",
                       help="prompt tokens per call (default auto: a call's logits under 64 MiB; 0 = one call)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_validate)
