"""Command-line interface: a thin layer over the functions users import.

    weightsmith prepare RECIPE [--force] [overrides]
    weightsmith train RECIPE [--out DIR] [--resume] [--print-config] [--section.key=value ...]
    weightsmith eval RUN_DIR
    weightsmith generate RUN_DIR --prompt TEXT | --prompts-file FILE [--draft RUN_DIR [--num-draft-tokens K]]
                                 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    weightsmith export RUN_DIR --format hf|gguf|onnx --out DIR [--dtype f32|f16|bf16|q8_0|q4_0]
    weightsmith quantize RUN_DIR --method int8|int4|gptq-int4 [--group-size 64] --out DIR
    weightsmith models [PATTERN]
    weightsmith inspect MODEL [--batch-size B] [--seq-len T] [--dtype D] [--optimizer adamw|sgd] [--json]
                              [--model.key=value ...]

Errors a user can cause print one line, ``error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from weightsmith.errors import WeightsmithError


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.max_steps=200)")
    return extra


def _cmd_prepare(args, overrides) -> int:
    from weightsmith.data.prepare import prepare
    from weightsmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    data = prepare(recipe.data, force=args.force)
    print(f"prepared data: {data.directory}")
    print(json.dumps({k: v for k, v in data.manifest.items() if k != "files"}, indent=2))
    return 0


def _cmd_train(args, overrides) -> int:
    from weightsmith.config import dump_toml
    from weightsmith.recipe import load_recipe
    from weightsmith.train.loop import train

    if args.print_config:
        recipe = load_recipe(args.recipe, overrides)
        print(dump_toml(recipe.to_tree()), end="")
        return 0
    train(args.recipe, overrides, out=args.out, resume=args.resume)
    return 0


def _cmd_eval(args, overrides) -> int:
    from weightsmith.eval.run import evaluate_run

    result = evaluate_run(args.run_dir)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_generate(args, overrides) -> int:
    from pathlib import Path

    from weightsmith.ship.fuse import fuse_projections
    from weightsmith.ship.generate import generate_text
    from weightsmith.train.checkpoint import load_run

    run = load_run(args.run_dir)
    fuse_projections(run.model)  # inference only: q/k/v and gate/up as one matmul each (same outputs)
    sampling = (args.temperature, args.top_k, args.top_p, args.seed)
    if args.draft and args.prompts_file:
        raise WeightsmithError("--draft takes one --prompt, not --prompts-file: speculative decoding runs one "
                               "sequence at a time")
    if args.num_draft_tokens < 1:
        raise WeightsmithError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")
    try:
        if args.prompts_file:
            from weightsmith.ship.batch import generate_texts

            prompts = [ln for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
            if not prompts:
                raise WeightsmithError(f"--prompts-file {args.prompts_file} has no prompts (one per line)")
            texts = generate_texts(run.model, run.tokenizer, prompts, args.max_new_tokens, *sampling)
            print("\n\n".join(f"=== {i} ===\n{t}" for i, t in enumerate(texts)))
        elif args.draft:
            from weightsmith.ship.speculative import speculative_text

            draft = load_run(args.draft)
            fuse_projections(draft.model)
            if draft.tokenizer.to_json() != run.tokenizer.to_json():
                raise WeightsmithError(f"--draft {args.draft} has a different tokenizer from {args.run_dir}")
            text, stats = speculative_text(run.model, draft.model, run.tokenizer, args.prompt, args.max_new_tokens,
                                           args.num_draft_tokens, *sampling)
            print(text)
            print(f"speculative: acceptance rate {stats['acceptance_rate']:.2f}, "
                  f"{stats['tokens_per_round']:.2f} tokens per target forward, speedup {stats['speedup']:.2f}x")
            print(json.dumps(stats))
        else:
            print(generate_text(run.model, run.tokenizer, args.prompt, args.max_new_tokens, *sampling))
    except ValueError as e:
        raise WeightsmithError(str(e)) from None
    return 0


def _cmd_export(args, overrides) -> int:
    from weightsmith.ship.export import export_run

    out = export_run(args.run_dir, args.format, args.out, args.dtype)
    print(f"exported {args.run_dir} as {args.format} ({args.dtype}) to {out}")
    return 0


def _cmd_quantize(args, overrides) -> int:
    from weightsmith.ship.quantize import quantize_run

    result = quantize_run(args.run_dir, args.method, args.out, args.group_size)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_models(args, overrides) -> int:
    from weightsmith.registry import get_preset, list_families, list_models

    families = set(list_families())
    for name in list_models(args.pattern):
        if name in families:
            print(f"{name:20s} family")
        else:
            p = get_preset(name)
            print(f"{name:20s} preset of {p.family}: {p.doc}")
    return 0


def _cmd_inspect(args, overrides) -> int:
    from weightsmith.analysis.inspect import format_report, inspect_model

    report = inspect_model(args.model, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                           optimizer=args.optimizer, overrides=overrides)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(prog="weightsmith", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable] = {}

    p = sub.add_parser("prepare", help="data stage only: corpus -> tokenizer -> token shards (cached)")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    handlers["prepare"] = _cmd_prepare

    p = sub.add_parser("train", help="prepare, train, evaluate and sample; dotted overrides allowed")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--out", help="run directory (default runs/RECIPE-TIMESTAMP); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    handlers["train"] = _cmd_train

    p = sub.add_parser("eval", help="evaluate a run on its whole validation split -> RUN_DIR/eval.json")
    p.add_argument("run_dir")
    handlers["eval"] = _cmd_eval

    p = sub.add_parser("generate", help="sample text from a run with a KV cache")
    p.add_argument("run_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts-file", help="one prompt per line, generated as one left-padded batch")
    p.add_argument("--draft", help="draft run directory for speculative decoding (same tokenizer)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens the draft proposes per round")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    handlers["generate"] = _cmd_generate

    p = sub.add_parser("export", help="export a run to Hugging Face, GGUF (llama.cpp) or ONNX, atomically")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "onnx"])
    p.add_argument("--out", required=True, help="new output directory; never overwritten")
    p.add_argument("--dtype", default="f32", help="f32, f16, bf16 (hf), q8_0, q4_0 (gguf); default f32")
    handlers["export"] = _cmd_export

    p = sub.add_parser("quantize", help="weight-only int8 / int4 / GPTQ-int4 quantization into a new run directory")
    p.add_argument("run_dir")
    p.add_argument("--method", required=True, choices=["int8", "int4", "gptq-int4"])
    p.add_argument("--group-size", type=int, default=64, help="input columns per scale for int4 (default 64)")
    p.add_argument("--out", required=True, help="new run directory; never overwritten")
    handlers["quantize"] = _cmd_quantize

    p = sub.add_parser("models", help="list registered families and presets")
    p.add_argument("pattern", nargs="?", default="*")
    handlers["models"] = _cmd_models

    p = sub.add_parser("inspect", help="parameters, FLOPs and memory per module (model built on the meta device)")
    p.add_argument("model", help="preset or family name, recipe TOML, or run directory")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16... for every byte count")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd-momentum"])
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    handlers["inspect"] = _cmd_inspect

    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser)
    try:
        return handlers[args.command](args, overrides)
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

