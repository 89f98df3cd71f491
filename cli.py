"""The ``leantune`` command line (also ``python -m leantune``).

Each sub-command is a small function taking the parsed arguments. User mistakes raise a
``LeantuneError``; ``main`` turns it into one line ``leantune: error: WHERE: WHAT`` and the
contract's exit status (2 usage/config, 3 data, 4 model/checkpoint/adapter, 5 gate, 1 other).
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from leantune.base import LeantuneError, UsageError

PROG = "leantune"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as one contract line and exit status 2."""

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


def cmd_generate(args):
    import torch

    from leantune.peft_core.checkpoint import load_model
    from leantune.peft_core.generate import generate
    from leantune.peft_core.tokenizer import StreamDecoder, Tokenizer

    if (args.prompt is None) == (args.chat is None):
        raise UsageError("generate", "give exactly one of --prompt TEXT or --chat TEXT")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens", "must be at least 1")
    if not (0.0 < args.top_p <= 1.0) or args.temperature < 0:
        raise UsageError("--top-p/--temperature", "top-p must be in (0, 1], temperature >= 0")
    tok = Tokenizer.from_dir(args.model_dir)
    torch.manual_seed(args.seed)
    model = load_model(args.model_dir, dtype=torch.float32,
                       quant=None if args.quant == "none" else args.quant)
    if args.adapter:
        from leantune.peft_core.adapters import load_adapter  # adapters land with their issue

        load_adapter(model, args.adapter)
    if args.chat is not None:
        text = tok.apply_chat_template([{"role": "user", "content": args.chat}],
                                       add_generation_prompt=True)
        ids = tok.encode(text)
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
    if not ids:
        raise UsageError("--chat" if args.chat is not None else "--prompt",
                         "the prompt is empty after tokenization (and the chat template)")
    stream = _is_tty(sys.stdout)
    decoder = StreamDecoder(tok, skip_special_tokens=True)

    def on_tokens(step):
        if stream and step[0] is not None and step[0] not in tok.eos_token_ids:
            sys.stdout.write(decoder.push(step[0]))
            sys.stdout.flush()

    new = generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, eos_token_ids=tok.eos_token_ids,
                   pad_token_id=tok.pad_token_id, on_tokens=on_tokens)[0]
    if stream:
        sys.stdout.write(decoder.flush() + "\n")
    else:
        print(tok.decode([t for t in new if t not in tok.eos_token_ids], skip_special_tokens=True))


def cmd_train(args):
    from leantune.train.config import load_config
    from leantune.train.loop import train

    cfg = load_config(args.config, args.set or [])
    result = train(cfg, resume=args.resume, log=_log)
    if result.interrupted:
        sys.exit(130)
    if _rank0():
        _log(f"trained {result.steps} steps (final loss {result.final_loss:.4f}); "
             f"adapter in {result.out_dir / 'adapter'}")


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
    from leantune.peft_core.adapters import cmd_merge as merge

    merge(args)


def cmd_demo(args):
    from leantune.demo import run_demo

    run_demo(out=args.out, quick=args.quick, log=_log)


def _log(msg):
    print(msg, flush=True)


def _rank0() -> bool:
    """False in the processes of a torchrun launch other than rank 0."""
    return os.environ.get("RANK", "0") == "0"


# -- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="leantune: lean LoRA / QLoRA fine-tuning")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    s = sub.add_parser("import-gguf", help="a Llama-family GGUF file to a Hugging Face folder")
    s.add_argument("file")
    s.add_argument("out_dir")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.set_defaults(func=cmd_import_gguf)

    s = sub.add_parser("quantize", help="write a bitsandbytes-format 4-bit checkpoint")
    s.add_argument("model_dir")
    s.add_argument("out_dir")
    s.add_argument("--quant", default="nf4", choices=["nf4", "fp4"])
    s.add_argument("--blocksize", type=int, default=64)
    s.add_argument("--no-double-quant", action="store_true")
    s.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("generate", help="generate text (greedy by default)")
    s.add_argument("model_dir")
    s.add_argument("--adapter")
    s.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"])
    s.add_argument("--prompt")
    s.add_argument("--chat")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_generate)

    for name, func, text in (("train", cmd_train, "fine-tune (writes the output folder)"),
                             ("eval", cmd_eval, "evaluate base, prompted and tuned; write the report")):
        s = sub.add_parser(name, help=text)
        s.add_argument("config")
        s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config key (repeatable)")
        if name == "train":
            s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        else:
            s.add_argument("--adapter", action="append", metavar="[LABEL=]DIR",
                           help="adapter(s) to evaluate (default: OUT/adapter)")
        s.set_defaults(func=func)

    s = sub.add_parser("merge", help="fold an adapter into the base and save a plain checkpoint")
    s.add_argument("model_dir")
    s.add_argument("adapter_dir")
    s.add_argument("out_dir")
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--quant", default="none", choices=["none", "nf4", "fp4"],
                   help="re-quantize the merged weights and report the error")
    s.set_defaults(func=cmd_merge)

    from leantune.train.curation import add_data_parser

    add_data_parser(sub)
    from leantune.bench.e2e import add_bench_parser

    add_bench_parser(sub)

    s = sub.add_parser("demo", help="the embedded default: fine-tune SmolLM2, evaluate, report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            raise UsageError(PROG, "give a sub-command (see 'leantune --help')")
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
