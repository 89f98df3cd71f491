"""The ``leantune`` command line (also ``python -m leantune``).

Each sub-command is a small function taking the parsed arguments. User mistakes raise a
``LeantuneError``; ``main`` turns it into one line ``leantune: error: WHERE: WHAT`` and the
contract's exit status (2 usage/config, 3 data, 4 model/checkpoint/adapter, 5 gate, 1 other).
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from leantune.base import VERSION, LeantuneError, UsageError

PROG = "leantune"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one contract line and exit status 2, and
    shows every option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(self.prog, message)


def _is_tty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


# -- sub-commands -------------------------------------------------------------------------
def cmd_import_gguf(args):
    from leantune.peft_core.checkpoint import resolve_dtype
    from leantune.peft_core.gguf_import import import_gguf

    out = import_gguf(args.file, args.out_dir, dtype=resolve_dtype(args.dtype))
    print(f"wrote {out}")


def cmd_quantize(args):
    from leantune.peft_core.quant_checkpoint import quantize_checkpoint

    out = quantize_checkpoint(args.model_dir, args.out_dir, quant_type=args.quant,
                              blocksize=args.blocksize, double_quant=not args.no_double_quant,
                              compute_dtype=args.compute_dtype)
    print(f"wrote {out}")


def _check_generate_args(args):
    given = [flag for flag, v in (("--prompt", args.prompt), ("--chat", args.chat),
                                  ("--interactive", args.interactive or None)) if v is not None]
    if len(given) != 1:
        raise UsageError("generate", "give exactly one of --prompt TEXT, --chat TEXT or --interactive")
    if args.system is not None and args.prompt is not None:
        raise UsageError("--system", "goes with --chat or --interactive (--prompt is plain text)")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens", "must be at least 1")
    if not (0.0 < args.top_p <= 1.0) or args.temperature < 0:
        raise UsageError("--top-p/--temperature", "top-p must be in (0, 1], temperature >= 0")


def _chat_ids(tok, messages, where) -> list[int]:
    """The token ids of ``messages`` rendered with the chat template, ready for the reply."""
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    if not ids:
        raise UsageError(where, "the prompt is empty after tokenization (and the chat template)")
    return ids


def _reply(args, tok, model, ids) -> str:
    """Generate after ``ids``; streams the text to a terminal, prints it otherwise; returns it."""
    from leantune.peft_core.generate import generate
    from leantune.peft_core.tokenizer import StreamDecoder

    stream = _is_tty(sys.stdout)
    decoder = StreamDecoder(tok, skip_special_tokens=True)

    def on_tokens(step):
        if stream and step[0] is not None and step[0] not in tok.eos_token_ids:
            sys.stdout.write(decoder.push(step[0]))
            sys.stdout.flush()

    new = generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, eos_token_ids=tok.eos_token_ids,
                   pad_token_id=tok.pad_token_id, on_tokens=on_tokens)[0]
    text = tok.decode([t for t in new if t not in tok.eos_token_ids], skip_special_tokens=True)
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
    else:
        print(text, flush=True)
    return text


def _chat_loop(args, tok, model, lines):
    """Multi-turn chat: each line of ``lines`` is a user turn (blank lines skipped) until
    ``/exit`` or the end; every reply is printed and kept in the conversation."""
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    prompt = _is_tty(lines)
    while True:
        if prompt:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        text = line.rstrip("\r\n")
        if not line or text.strip() == "/exit":
            return
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply(args, tok, model, _chat_ids(tok, messages, "--interactive"))
        messages.append({"role": "assistant", "content": reply})


def cmd_generate(args):
    import torch

    from leantune.peft_core.checkpoint import load_model
    from leantune.peft_core.tokenizer import Tokenizer

    _check_generate_args(args)
    tok = Tokenizer.from_dir(args.model_dir)
    torch.manual_seed(args.seed)
    model = load_model(args.model_dir, dtype=torch.float32,
                       quant=None if args.quant == "none" else args.quant)
    if args.adapter:
        from leantune.peft_core.adapters import load_adapter

        load_adapter(model, args.adapter)
    if args.interactive:
        _chat_loop(args, tok, model, sys.stdin)
    elif args.chat is not None:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        _reply(args, tok, model, _chat_ids(tok, system + [{"role": "user", "content": args.chat}], "--chat"))
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
        if not ids:
            raise UsageError("--prompt", "the prompt is empty after tokenization")
        _reply(args, tok, model, ids)


def cmd_train(args):
    from leantune.train.config import load_config
    from leantune.train.loop import train

    cfg = load_config(args.config, args.set or [])
    if args.dry_run:
        from leantune.train.dryrun import dry_run

        plan = dry_run(cfg, log=_log)
        if _LOG["format"] == "json":
            print(json.dumps({"plan": plan.to_dict()}), flush=True)
        return
    if args.resume and args.overwrite:
        raise UsageError("train", "--resume continues the run in the output folder, --overwrite "
                                  "deletes it: give one of them")
    resume = args.resume if args.resume in (False, True) else Path(args.resume)
    result = train(cfg, resume=resume, log=_log, overwrite=args.overwrite, log_format=_LOG["format"])
    if result.interrupted:
        sys.exit(130)
    if _rank0():
        what = "adapter" if cfg.adapter.kind != "none" else "model"
        _log(f"trained {result.steps} steps (final loss {result.final_loss:.4f}); "
             f"{what} in {result.out_dir / what}")


def cmd_eval(args):
    from leantune.eval.runner import run_eval
    from leantune.train.config import load_config

    cfg = load_config(args.config, args.set or [])
    adapters = None
    if args.adapter:
        adapters = {}
        for spec in args.adapter:
            label, sep, path = spec.partition("=")
            if not sep:
                label, path = ("tuned" if not adapters else Path(spec).name), spec
            adapters[label] = Path(path)
    report = run_eval(cfg, adapters=adapters, log=_log)
    _print_summary(report, Path(cfg.train.out))


def _print_summary(report, out_dir):
    primary = report["primary_metric"]
    for label, vals in report["models"].items():
        v = vals.get(primary)
        loss = vals.get("eval_loss")
        _log(f"  {label:>10}: {primary} = {'n/a' if v is None else f'{v:.3f}'}"
             + ("" if loss is None else f", eval_loss = {loss:.3f}"))
    _log(f"report: {out_dir / 'eval' / 'report.md'}")


def cmd_merge(args):
    """``merge "" ADAPTER OUT`` takes the base recorded in the adapter's adapter_config.json."""
    import json

    from leantune.peft_core.adapters import cmd_merge as merge

    if not args.model_dir:
        cfg_path = Path(args.adapter_dir) / "adapter_config.json"
        try:
            base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(str(cfg_path), f"cannot read the adapter's base model ({e}); name MODEL_DIR") from None
        if not isinstance(base, str) or not base:
            raise UsageError(str(cfg_path), "records no base_model_name_or_path; name MODEL_DIR")
        args.model_dir = base
    merge(args)


def cmd_export_gguf(args):
    from leantune.peft_core.gguf_export import export_gguf

    out = export_gguf(args.model_dir, args.out, qtype=args.type)
    print(f"wrote {out}")


def cmd_config(args):
    from leantune.train.config import config_toml

    print(f"# leantune config: every key at its default (leantune config --kind {args.kind});\n"
          "# unknown keys are errors, relative paths are relative to this file's folder\n")
    print(config_toml(args.kind), end="")


def cmd_demo(args):
    from leantune.demo import run_demo

    run_demo(out=args.out, quick=args.quick, log=_log, compute_dtype=args.compute_dtype, rl=args.rl)


_LOG = {"format": "text"}  # --log-format: "json" makes every stdout line a JSON object


def _log(msg):
    print(json.dumps({"message": msg}) if _LOG["format"] == "json" else msg, flush=True)


def _pop_log_format(argv: list) -> tuple[list, str]:
    """``--log-format text|json`` (or ``--log-format=json``), accepted anywhere on the line."""
    rest, fmt, i = [], "text", 0
    while i < len(argv):
        a = argv[i]
        if a == "--log-format" or a.startswith("--log-format="):
            if a == "--log-format":
                if i + 1 >= len(argv):
                    raise UsageError("--log-format", "expected text or json")
                value, i = argv[i + 1], i + 1
            else:
                value = a.split("=", 1)[1]
            if value not in ("text", "json"):
                raise UsageError("--log-format", f"expected text or json, got {value!r}")
            fmt = value
        else:
            rest.append(a)
        i += 1
    return rest, fmt


def _rank0() -> bool:
    """False in the processes of a torchrun launch other than rank 0."""
    return os.environ.get("RANK", "0") == "0"


# -- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="leantune: lean LoRA / QLoRA fine-tuning")
    p.add_argument("--debug", action="store_true", help="show tracebacks (accepted anywhere on the line)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: progress and messages as one JSON object a line on stdout "
                        "(accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    s = sub.add_parser("import-gguf", help="a Llama-family GGUF file to a Hugging Face folder")
    s.add_argument("file", help="the GGUF file")
    s.add_argument("out_dir", help="the Hugging Face folder to write")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights")
    s.set_defaults(func=cmd_import_gguf)

    s = sub.add_parser("quantize", help="write a bitsandbytes-format 4-bit checkpoint")
    s.add_argument("model_dir", help="the model folder to quantize")
    s.add_argument("out_dir", help="the 4-bit checkpoint folder to write")
    s.add_argument("--quant", default="nf4", choices=["nf4", "fp4"], help="4-bit data type")
    s.add_argument("--blocksize", type=int, default=64, help="weights per absmax block")
    s.add_argument("--no-double-quant", action="store_true", help="keep the absmax values in fp32")
    s.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype recorded in the checkpoint")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("generate", help="generate text (greedy by default)")
    s.add_argument("model_dir", help="the base model folder")
    s.add_argument("--adapter", help="an adapter folder to apply")
    s.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"], help="quantize the base on load")
    s.add_argument("--prompt", help="plain text to continue")
    s.add_argument("--chat", help="a user message, wrapped in the chat template")
    s.add_argument("--system", help="a system prompt for --chat or --interactive (through the chat template)")
    s.add_argument("--interactive", action="store_true",
                   help="multi-turn chat: one user turn per line of stdin, until /exit or EOF")
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.set_defaults(func=cmd_generate)

    for name, func, text in (("train", cmd_train, "fine-tune (writes the output folder)"),
                             ("eval", cmd_eval, "evaluate base, prompted and tuned; write the report")):
        s = sub.add_parser(name, help=text)
        s.add_argument("config", help="the TOML config")
        s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config key (repeatable)")
        if name == "train":
            s.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                           help="continue from the newest good checkpoint of the output folder, "
                                "or from the checkpoint folder CHECKPOINT")
            s.add_argument("--overwrite", action="store_true",
                           help="delete the earlier run's checkpoints, metrics and exports in the "
                                "output folder first")
            s.add_argument("--dry-run", action="store_true",
                           help="check config, data and model, probe one micro-batch and print the "
                                "plan (examples, tokens, steps, time a step, peak memory); writes nothing")
        else:
            s.add_argument("--adapter", action="append", metavar="[LABEL=]DIR",
                           help="adapter(s) to evaluate (default: OUT/adapter)")
        s.set_defaults(func=func)

    s = sub.add_parser("merge", help="fold an adapter into the base and save a plain checkpoint")
    s.add_argument("model_dir", help='the base model folder ("" for the base the adapter records)')
    s.add_argument("adapter_dir", help="the adapter folder")
    s.add_argument("out_dir", help="the merged model folder to write")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    s.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"],
                   help="re-quantize the merged weights and report the error")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("export-gguf", help="a (merged) model folder as a GGUF file for llama.cpp")
    s.add_argument("model_dir", help="the dense model folder (merge an adapter first)")
    s.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    s.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"], help="tensor type of the weights")
    s.set_defaults(func=cmd_export_gguf)

    from leantune.train.curation import add_data_parser

    add_data_parser(sub)
    from leantune.bench.e2e import add_bench_parser
    from leantune.serve import add_serve_parser

    add_bench_parser(sub)
    add_serve_parser(sub)

    s = sub.add_parser("config", help="print the full default config as commented TOML")
    s.add_argument("--kind", default="sft", choices=["sft", "dpo", "grpo"],
                   help="the train.objective, with its own keys")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("demo", help="the embedded default: fine-tune SmolLM2, evaluate, report")
    s.add_argument("--out", default="runs/demo", help="the output folder")
    s.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    s.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bf16 on a CPU with native bf16 (avx512_bf16 / AMX) or a GPU, else fp32")
    s.add_argument("--rl", action="store_true",
                   help="then GRPO from the SFT adapter, and SFT against SFT+RL on the held-out split")
    s.set_defaults(func=cmd_demo)
    _fill_help(p)
    return p


def _fill_help(parser):
    """Give an option that lacks help text (from a module's own sub-parser) a short one, so
    that every option shows its default."""
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = action.dest.replace("_", " ")
        for child in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            _fill_help(child)


def _resume_before_config(argv: list[str]) -> list[str]:
    """``train --resume CONFIG.toml``: argparse would take the config for --resume's optional
    CHECKPOINT (a folder) and then miss the config. A regular file or a ``.toml`` name after
    --resume is the config: move it in front."""
    if "train" not in argv:
        return argv
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        nxt = out[i + 1]
        if a == "--resume" and (nxt.endswith(".toml") or Path(nxt).is_file()):
            out[i], out[i + 1] = nxt, a
            break
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    try:
        argv, _LOG["format"] = _pop_log_format(argv)
        args = build_parser().parse_args(_resume_before_config(argv))
        if args.version:
            print(f"{PROG} {VERSION}")
            return 0
        if getattr(args, "func", None) is None:
            raise UsageError(PROG, "give a sub-command (see 'leantune --help')")
        if getattr(args, "model_dir", None):  # org/name: the local Hugging Face cache's snapshot
            from leantune.peft_core.build import resolve_model_dir

            args.model_dir = str(resolve_model_dir(args.model_dir))
        args.func(args)
        return 0
    except LeantuneError as e:
        if debug:
            raise
        if _rank0():  # the same mistake on every rank of a torchrun launch: one line
            _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, OSError) as e:
        if debug:
            raise
        where = getattr(e, "filename", None) or type(e).__name__
        _error(f"{where}: {getattr(e, 'strerror', None) or e}")
        return 1
    except Exception as e:  # anything else: one line, the traceback under --debug
        if debug:
            raise
        _error(f"internal: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 1


_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _error(message: str):
    """The one line ``leantune: error: ...``; line breaks inside the message (a key or a file
    name that holds one) are written escaped, as ``\\n``."""
    message = _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], message)
    print(f"{PROG}: error: {message}", file=sys.stderr)


def entry():
    sys.exit(main())
