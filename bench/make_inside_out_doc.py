"""Write docs/inside-out.md from real output: shapes traced on the meta device, analytic FLOPs per
component, FlopCounterMode totals, and the encoder/decoder comparison.

    python bench/make_inside_out_doc.py [--seq-len 512] [--out docs/inside-out.md]
"""

import argparse
from pathlib import Path

from weightsmith.analysis.dataflow import inside_out_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "inside-out.md"))
    args = parser.parse_args()
    text = inside_out_markdown(batch_size=args.batch_size, seq_len=args.seq_len)
    Path(args.out).write_text(text + "\n")
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
