"""Command-line interface: a thin layer over the functions users import.

    weightsmith prepare RECIPE [--force] [--section.key=value ...]
    weightsmith train RECIPE [--out DIR] [--resume] [--print-config] [--section.key=value ...]
    weightsmith eval RUN_DIR [--data.key=value ... [--out FILE]]
    weightsmith predict RUN_DIR IMAGE [IMAGE ...] [--top-k K] [--json]
    weightsmith generate RUN_DIR --prompt TEXT | --prompts-file FILE [--draft RUN_DIR [--num-draft-tokens K]]
                                 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    weightsmith sample RUN_DIR --n N [--sampler ddim] [--steps S] [--eta E] [--guidance W] [--class C]
                               [--seed S] --out grid.png
    weightsmith export RUN_DIR --format hf|gguf|onnx|peft --out DIR [--dtype f32|f16|bf16|q8_0|q4_0]
    weightsmith quantize RUN_DIR --method int8|int4|gptq-int4 [--group-size 64] --out DIR
    weightsmith import HF_DIR --out RUN [--data.key=value ...]
    weightsmith prune RUN_DIR --method magnitude|wanda --sparsity 0.5|2:4 --out DIR
    weightsmith models [PATTERN]
    weightsmith report RUN_DIR [--out DIR]
    weightsmith compare RUN_DIR RUN_DIR [...] --out DIR
    weightsmith sweep RECIPE --param KEY=SPEC [--param ...] --trials N --out DIR [--metric M] [--prune]
                      [--section.key=value ...]
    weightsmith coord-check RECIPE --widths W [W ...] --base-width W0 --out DIR [--steps S] [--seeds N]
                            [--section.key=value ...]
    weightsmith inspect MODEL [--batch-size B] [--seq-len T] [--dtype D] [--optimizer adamw|sgd] [--json]
                              [--sampler S --steps N --guidance W] [--model.key=value ...]
    weightsmith --version

Dotted overrides (``--section.key=value``) are taken by prepare, train, sweep, coord-check, inspect, import
and eval (``--data.*`` only) only; the other subcommands reject them. Errors a user can cause, bad arguments
included, print one line, ``error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from weightsmith import __version__
from weightsmith.errors import TrainingInterrupted, WeightsmithError

OVERRIDE_COMMANDS = ("prepare", "train", "inspect", "sweep", "coord-check", "import", "eval")

OVERRIDES_HELP = """\
overrides:
  Any recipe field can be set on the command line as --section.key=value (the '=' is required):
  sections are data, model, train, sample (and task). Values are read as TOML (3e-4, 200, true,
  "text"); unknown sections or keys are rejected with the list of valid ones."""

EXAMPLES = {
    "prepare": """\
examples:
  weightsmith prepare recipes/tiny.toml
  weightsmith prepare recipes/tiny.toml --data.tokenizer=char --force""",
    "train": """\
examples:
  weightsmith train recipes/tiny.toml
  weightsmith train recipes/tiny.toml --out runs/tiny --train.lr=3e-4 --train.max_steps=200
  weightsmith train recipes/tiny.toml --model.n_layers=4 --print-config
  weightsmith train recipes/tiny.toml --out runs/tiny --resume""",
    "eval": """\
examples:
  weightsmith eval runs/tiny
  weightsmith eval runs/milton-lora --data.corpus=shakespeare --out runs/milton-lora/shakespeare_eval.json

with --data.* overrides the run is measured on that data with its own tokenizer (forgetting, transfer);
RUN_DIR/eval.json is left as it is""",
    "predict": """\
example:
  weightsmith predict runs/fmnist-resnet shoe.png shirt.jpg --top-k 3""",
    "generate": """\
examples:
  weightsmith generate runs/tiny --prompt "KING." --max-new-tokens 100 --temperature 0.8 --top-k 50
  weightsmith generate runs/tiny --prompts-file prompts.txt --temperature 0
  weightsmith generate runs/big --prompt "KING." --draft runs/tiny --num-draft-tokens 4""",
    "sample": """\
examples:
  weightsmith sample runs/fmnist-ddpm --n 64 --sampler ddim --steps 50 --guidance 2 --out grid.png
  weightsmith sample runs/fmnist-ddpm --n 16 --sampler ddpm --steps 1000 --class 7 --out sneakers.png
  weightsmith sample runs/fmnist-flow --n 64 --sampler heun --steps 25 --out flow.png
the samples are also written as uint8 (N, C, H, W) to grid.npy beside grid.png""",
    "export": """\
examples:
  weightsmith export runs/tiny --format hf --out exports/tiny-hf --dtype bf16
  weightsmith export runs/tiny --format gguf --out exports/tiny-gguf --dtype q8_0
  weightsmith export runs/tiny --format onnx --out exports/tiny-onnx
gguf and onnx need the interop extra: pip install 'weightsmith[interop]'""",
    "quantize": """\
examples:
  weightsmith quantize runs/tiny --method int8 --out runs/tiny-int8
  weightsmith quantize runs/tiny --method gptq-int4 --group-size 128 --out runs/tiny-gptq""",
    "import": """\
examples:
  weightsmith import ~/hf/gpt2 --out runs/gpt2
  weightsmith import ~/hf/llama --out runs/llama-milton --data.corpus=milton --train.seq_len=256
the run's [data] (what eval measures) comes from --data.* overrides; the tokenizer is the model's""",
    "prune": """\
examples:
  weightsmith prune runs/tiny --method wanda --sparsity 0.5 --out runs/tiny-wanda50
  weightsmith prune runs/tiny --method magnitude --sparsity 2:4 --out runs/tiny-mag24""",
    "models": """\
examples:
  weightsmith models
  weightsmith models 'llama*'""",
    "report": """\
examples:
  weightsmith report runs/tiny                    # runs/tiny/report/index.html (self-contained) + report.md
  weightsmith report runs/tiny --out reports/tiny""",
    "compare": """\
example:
  weightsmith compare runs/adamw runs/muon runs/lion --out reports/optimizers""",
    "sweep": """\
examples:
  weightsmith sweep recipes/tiny.toml --param train.lr=log:1e-4:1e-2 --trials 8 --out sweeps/tiny-lr
  weightsmith sweep recipes/tiny.toml --param train.lr=log:1e-4:1e-2 --param model.n_layers=int:1:4 \\
      --param train.schedule=choice:cosine,wsd --trials 20 --prune --out sweeps/tiny --train.max_steps=200
  weightsmith sweep recipes/tiny.toml --param train.lr=log:1e-4:1e-2 --trials 16 --out sweeps/tiny-lr  # resumes
param specs: log:LO:HI (log-uniform float), float:LO:HI, int:LO:HI, choice:A,B,C (values read as TOML)""",
    "coord-check": """\
examples:
  weightsmith coord-check recipes/shakespeare.toml --widths 64 128 256 512 --base-width 64 --out runs/coord \\
      --model.tie_embeddings=false --train.lr=1e-2
  weightsmith coord-check recipes/tiny.toml --widths 32 128 --base-width 32 --steps 3 --seeds 1 --out /tmp/cc \\
      --model.tie_embeddings=false""",
    "inspect": """\
examples:
  weightsmith inspect gpt2 --seq-len 512 --batch-size 8 --dtype bf16
  weightsmith inspect recipes/tiny.toml --json
  weightsmith inspect gpt --model.d_model=256 --model.n_layers=4
  weightsmith inspect recipes/fmnist-flow.toml --sampler heun --steps 25   # FLOPs per sample""",
}
OVERRIDES_NOTE = {
    "prepare": OVERRIDES_HELP + "\n  e.g. --data.vocab_size=512; only the [data] section matters here.",
    "train": OVERRIDES_HELP + "\n  e.g. --train.lr=3e-4 --model.n_layers=4; --print-config shows the result.",
    "sweep": OVERRIDES_HELP + "\n  They apply to every trial, e.g. --train.max_steps=200; --param values win.",
    "coord-check": OVERRIDES_HELP + "\n  They apply at every width; µP needs --model.tie_embeddings=false.",
    "inspect": "overrides:\n  --model.key=value sets a [model] field, e.g. --model.n_layers=4 (no other sections).",
}


class _UsageError(WeightsmithError):
    """A bad command line (unknown flag, missing or invalid argument)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it is None or a flag's False), keeps the examples' line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line (the CLI's rule), not usage + error.

    ``add_subparsers`` makes the subcommand parsers of the same class, so this covers them too.
    """

    def error(self, message: str):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _split_overrides(extra: list[str], command: str) -> list[str]:
    """The unparsed arguments -> dotted overrides, for the subcommands that take them.

    Raises:
        _UsageError: an argument that is not an override, or overrides given to another subcommand.
    """
    bad = [a for a in extra if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        hint = "; overrides look like --train.max_steps=200" if command in OVERRIDE_COMMANDS else ""
        raise _UsageError(f"unrecognized arguments: {' '.join(bad)}{hint} (see 'weightsmith {command} --help')")
    if extra and command not in OVERRIDE_COMMANDS:
        raise _UsageError(f"{command} takes no --section.key overrides; only {', '.join(OVERRIDE_COMMANDS)} take "
                          f"them (got {' '.join(extra)})")
    return extra


def _cmd_prepare(args, overrides) -> int:
    """Data stage only: corpus -> tokenizer -> token shards (cached by content)."""
    from weightsmith.data.prepare import prepare
    from weightsmith.recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides)
    data = prepare(recipe.data, force=args.force)
    print(f"prepared data: {data.directory}")
    print(json.dumps({k: v for k, v in data.manifest.items() if k != "files"}, indent=2))
    return 0


def _cmd_train(args, overrides) -> int:
    """Prepare, train, evaluate and sample into a new run directory."""
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
    """Evaluate a run on its whole validation split -> RUN_DIR/eval.json (printed); with --data.*
    overrides, on that data instead (the run's tokenizer) -> printed, and --out FILE if given."""
    from weightsmith.eval.run import evaluate_on, evaluate_run

    if overrides:
        result = evaluate_on(args.run_dir, overrides, args.out)
    elif args.out is not None:
        raise _UsageError("eval --out is for a measurement on other data (--data.* overrides); without them "
                          "eval writes RUN_DIR/eval.json")
    else:
        result = evaluate_run(args.run_dir)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_predict(args, overrides) -> int:
    """Top-k classes with probabilities for image files, from an image-classifier run."""
    from weightsmith.ship.predict import predict_images

    results = predict_images(args.run_dir, args.images, args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in [] if args.json else results:
        print(f"{r['file']}: " + ", ".join(f"{name} {p:.3f}" for name, p in r["top"]))
    return 0


def _check_generate_args(args) -> None:
    """The one-line errors that need no run directory, so they come before any loading."""
    if args.max_new_tokens < 1:
        raise WeightsmithError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft and args.prompts_file:
        raise WeightsmithError("--draft takes one --prompt, not --prompts-file: speculative decoding runs one "
                               "sequence at a time")
    if args.num_draft_tokens < 1:
        raise WeightsmithError(f"--num-draft-tokens must be >= 1, got {args.num_draft_tokens}")


def _cmd_generate(args, overrides) -> int:
    """Sample text from a run with a KV cache (batched with --prompts-file, speculative with --draft)."""
    from pathlib import Path

    from weightsmith.ship.fuse import fuse_projections
    from weightsmith.ship.generate import generate_text
    from weightsmith.train.checkpoint import load_run

    _check_generate_args(args)
    run = load_run(args.run_dir)
    fuse_projections(run.model)  # inference only: q/k/v and gate/up as one matmul each (same outputs)
    sampling = (args.temperature, args.top_k, args.top_p, args.seed)
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


def _cmd_sample(args, overrides) -> int:
    """Images from a diffusion, flow-matching or VAE run (EMA weights): a PNG grid and a .npy beside it."""
    from weightsmith.ship.sample import sample_run

    r = sample_run(args.run_dir, args.n, args.out, sampler=args.sampler, steps=args.steps, eta=args.eta,
                   guidance=args.guidance, class_id=args.class_id, seed=args.seed)
    print(f"{r['n']} samples ({r['sampler']}, {r['steps']} steps, NFE {r['nfe']} per image) in {r['seconds']:.1f} s "
          f"({r['seconds_per_64']:.1f} s per 64): {r['png']}, {r['npy']}")
    return 0


def _cmd_export(args, overrides) -> int:
    """Export a run to Hugging Face, GGUF (llama.cpp) or ONNX, written atomically."""
    from weightsmith.ship.export import export_run

    out = export_run(args.run_dir, args.format, args.out, args.dtype)
    print(f"exported {args.run_dir} as {args.format} ({args.dtype}) to {out}")
    return 0


def _cmd_quantize(args, overrides) -> int:
    """Weight-only int8 / int4 / GPTQ-int4 quantization into a new run directory."""
    from weightsmith.ship.export import check_new_output
    from weightsmith.ship.quantize import quantize_run

    check_new_output(args.out, "quantize")  # before loading, measuring and quantizing
    result = quantize_run(args.run_dir, args.method, args.out, args.group_size)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_import(args, overrides) -> int:
    """Turn a local Hugging Face directory into a run directory (config, weights, tokenizer, manifest)."""
    from weightsmith.ship.hf_import import import_hf

    out = import_hf(args.hf_dir, args.out, overrides)
    print(f"imported {args.hf_dir} into {out}")
    return 0


def _cmd_prune(args, overrides) -> int:
    """Magnitude or Wanda pruning (unstructured or 2:4) of the block linears into a new run directory."""
    from weightsmith.ship.export import check_new_output
    from weightsmith.ship.prune import prune_run

    check_new_output(args.out, "prune")
    result = prune_run(args.run_dir, args.method, args.sparsity, args.out, n_calibration=args.n_calibration)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_models(args, overrides) -> int:
    """List registered families and presets whose names match PATTERN."""
    from weightsmith.registry import get_preset, list_families, list_models

    families = set(list_families())
    for name in list_models(args.pattern):
        if name in families:
            print(f"{name:20s} family")
        else:
            p = get_preset(name)
            print(f"{name:20s} preset of {p.family}: {p.doc}")
    return 0


def _cmd_report(args, overrides) -> int:
    """A run's report: curves, eval table, events, samples, config (HTML with inlined PNGs, and Markdown)."""
    from weightsmith.report import write_report

    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


def _cmd_compare(args, overrides) -> int:
    """Several runs' curves overlaid, their final numbers and their config differences, as one report."""
    from weightsmith.report import write_compare

    print(f"report: {write_compare(args.run_dirs, args.out)}")
    return 0


def _cmd_sweep(args, overrides) -> int:
    """Hyperparameter search (Optuna TPE): one run directory per trial; resumable; best config written."""
    from weightsmith.sweep import run_sweep

    result = run_sweep(args.recipe, args.param, trials=args.trials, out=args.out, metric=args.metric,
                       direction=args.direction, seed=args.seed, prune=args.prune, overrides=overrides)
    best = result["best"]
    print(f"sweep {args.out}: {len(result['trials'])} trials; best trial {best['number']} "
          f"{result['metric']} {best['value']:.6g} with {best['params']} ({best['run_dir']})"
          if best else f"sweep {args.out}: no trial completed")
    return 0


def _cmd_coord_check(args, overrides) -> int:
    """µP coordinate check: mean |activation| per block against width, standard parametrization vs µP."""
    from weightsmith.train.mup import coord_check

    coord_check(args.recipe, args.out, widths=args.widths, base_width=args.base_width, steps=args.steps,
                seeds=args.seeds, overrides=overrides)
    print(f"coord-check: {args.out}/coord.md, coord.png, coord.json")
    return 0


def _cmd_inspect(args, overrides) -> int:
    """Parameters, FLOPs and memory per module (the model is built on the meta device)."""
    from weightsmith.analysis.inspect import format_report, inspect_model

    report = inspect_model(args.model, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                           optimizer=args.optimizer, overrides=overrides, sampler=args.sampler, steps=args.steps,
                           guidance=args.guidance)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = _Parser(prog="weightsmith", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter,
                     epilog="Run 'weightsmith COMMAND --help' for a command's options, defaults and examples.\n"
                            "prepare, train, sweep, coord-check, inspect and import also take dotted overrides:\n"
                            "--section.key=value, e.g. weightsmith train recipes/tiny.toml --train.lr=3e-4")
    parser.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    def add(name: str, handler: Callable, help_suffix: str = "") -> argparse.ArgumentParser:
        doc = handler.__doc__.strip()
        epilog = "\n\n".join(x for x in (OVERRIDES_NOTE.get(name), EXAMPLES[name]) if x)
        handlers[name] = handler
        return sub.add_parser(name, help=doc[0].lower() + doc[1:].rstrip(".") + help_suffix, description=doc,
                              epilog=epilog, formatter_class=_HelpFormatter)

    p = add("prepare", _cmd_prepare, "; dotted overrides allowed")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")

    p = add("train", _cmd_train, "; dotted overrides allowed")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/RECIPE-TIMESTAMP); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    p = add("eval", _cmd_eval)
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--out", metavar="FILE", help="with --data.* overrides: also write the result to this new file")

    p = add("predict", _cmd_predict)
    p.add_argument("run_dir", help="classifier run directory written by train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files, read with Pillow")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to print per image")
    p.add_argument("--json", action="store_true", help="print the results as JSON")

    p = add("generate", _cmd_generate)
    p.add_argument("run_dir", help="run directory written by train (or quantize)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    src.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, generated as one left-padded batch")
    p.add_argument("--draft", metavar="RUN_DIR", help="draft run directory for speculative decoding (same tokenizer)")
    p.add_argument("--num-draft-tokens", type=int, metavar="K", default=4, help="tokens the draft proposes per round")
    p.add_argument("--max-new-tokens", type=int, metavar="N", default=200,
                   help="exactly this many new tokens (>= 1); past the model's max_seq_len each token is "
                        "conditioned on the last max_seq_len tokens (a sliding window, slower per token)")
    p.add_argument("--temperature", type=float, metavar="T", default=0.8, help="divide the logits by T; 0 = greedy")
    p.add_argument("--top-k", type=int, metavar="K", default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, metavar="P", default=None,
                   help="nucleus sampling: the smallest set with mass >= p")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the sampler (same seed, same text)")

    p = add("sample", _cmd_sample)
    p.add_argument("run_dir", help="run directory of a ddpm, flow-matching or vae recipe")
    p.add_argument("--n", type=int, required=True, metavar="N", help="images to generate")
    p.add_argument("--sampler", metavar="NAME", default=None,
                   help="ddpm or ddim (ddpm runs), euler or heun (flow-matching), prior (vae); default: the run's")
    p.add_argument("--steps", type=int, metavar="S", default=None, help="sampler steps (default: the run's)")
    p.add_argument("--eta", type=float, metavar="E", default=None, help="DDIM noise scale: 0 deterministic")
    p.add_argument("--guidance", type=float, metavar="W", default=None,
                   help="classifier-free guidance scale; 1 = conditional without guidance")
    p.add_argument("--class", dest="class_id", type=int, metavar="C", default=None,
                   help="generate only class C (default: every class in turn)")
    p.add_argument("--seed", type=int, metavar="S", default=0, help="seed of the noise (same seed, same images)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="new PNG grid; FILE.npy is written beside it")

    p = add("export", _cmd_export)
    p.add_argument("run_dir", help="run directory written by train (or quantize)")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "onnx", "peft"], help="output format")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory; never overwritten")
    p.add_argument("--dtype", default="f32", help="weights: f32, f16, bf16 (hf, f16 gguf), q8_0, q4_0 (gguf)")

    p = add("quantize", _cmd_quantize)
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--method", required=True, choices=["int8", "int4", "gptq-int4"], help="quantization method")
    p.add_argument("--group-size", type=int, metavar="G", default=64,
                   help="input columns per scale for int4 and gptq-int4")
    p.add_argument("--out", required=True, metavar="DIR", help="new run directory; never overwritten")

    p = add("import", _cmd_import, "; --data/--train/--sample overrides allowed")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face directory: config.json, weights, tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN", help="new run directory; never overwritten")

    p = add("prune", _cmd_prune)
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda"], help="pruning score")
    p.add_argument("--sparsity", required=True, metavar="S", help="fraction of each row to zero (0.5) or 2:4")
    p.add_argument("--n-calibration", type=int, default=128, metavar="N", help="wanda calibration windows")
    p.add_argument("--out", required=True, metavar="DIR", help="new run directory; never overwritten")

    p = add("models", _cmd_models)
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'llama*'")

    p = add("report", _cmd_report)
    p.add_argument("run_dir", help="run directory written by train")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)")

    p = add("compare", _cmd_compare)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="two or more run directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for index.html and the PNGs")

    p = add("sweep", _cmd_sweep, "; dotted overrides allowed")
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("--param", action="append", required=True, metavar="KEY=SPEC",
                   help="a searched field, e.g. train.lr=log:1e-4:1e-2 (repeat for more)")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="total trials in the study (a rerun with the same --out adds only the missing ones)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory: study.db, sweep.json, trial_K/")
    p.add_argument("--metric", default=None, metavar="KEY",
                   help="eval.json key to optimize (default: the task's: val_bpb, val_acc, val_loss...)")
    p.add_argument("--direction", default=None, choices=["minimize", "maximize"],
                   help="default: maximize for *acc*, minimize otherwise")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the TPE sampler")
    p.add_argument("--prune", action="store_true",
                   help="stop trials whose validation rows fall below the median of earlier trials' "
                        "(Optuna MedianPruner)")

    p = add("coord-check", _cmd_coord_check, "; dotted overrides allowed")
    p.add_argument("recipe", help="recipe TOML file (a transformer; its train.lr and optimizer are used)")
    p.add_argument("--widths", type=int, nargs="+", required=True, metavar="W", help="d_model values to try")
    p.add_argument("--base-width", type=int, required=True, metavar="W0", help="µP's base width")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for coord.json, coord.md, coord.png")
    p.add_argument("--steps", type=int, default=4, metavar="S", help="optimizer steps per width")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds averaged per width")

    p = add("inspect", _cmd_inspect, "; --model.key=value overrides allowed")
    p.add_argument("model", help="preset or family name, recipe TOML, or run directory")
    p.add_argument("--batch-size", type=int, metavar="B", default=1, help="sequences per step for activation memory")
    p.add_argument("--seq-len", type=int, metavar="T", default=None,
                   help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--dtype", default="float32", help="float32, bf16, fp16... for every byte count")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "sgd-momentum"],
                   help="optimizer whose state is counted")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "euler", "heun"],
                   help="unet only: the sampler of the FLOPs-per-sample line (default: the recipe's, else ddim)")
    p.add_argument("--steps", type=int, metavar="S", default=None, help="unet only: sampler steps (default 50)")
    p.add_argument("--guidance", type=float, metavar="W", default=None,
                   help="unet only: classifier-free guidance w; != 1 doubles the forwards (default 1)")

    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status: 0; 2 for a user
    error (one ``error: ...`` line on stderr); 1 when stdout's reader went away; 130 on Ctrl-C."""
    parser, handlers = build_parser()
    try:
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:  # --help / --version printed their text and asked to exit
            return e.code if isinstance(e.code, int) else 0
        overrides = _split_overrides(extra, args.command)
        code = handlers[args.command](args, overrides)
        sys.stdout.flush()  # a closed pipe (weightsmith models | head) raises here, inside the handler below
        return code
    except TrainingInterrupted as e:  # SIGINT/SIGTERM: the last step is checkpointed; say how to resume
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except WeightsmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader closed the pipe early: the recipe in Python's signal docs. Point stdout at devnull so
        # the interpreter's final flush cannot fail again, and exit 1 as Python does on EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
