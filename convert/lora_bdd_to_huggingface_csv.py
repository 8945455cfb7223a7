"""Write the LoRA training CSV (columns image,text) from a folder of images and their caption .txt files.

Usage:
    python convert/lora_bdd_to_huggingface_csv.py --images_path bdd100k/images/100k/train \\
        --captions_path captions/train --output_folder csv --split train [--relative_paths] [--overwrite]

Writes ``<output_folder>/bdd_hf_dataset_lora_<split>.csv`` (rows sorted by image name; paths absolute, or
relative to the CSV's folder with --relative_paths) and ``<output_folder>/unmatched_lora_<split>.txt``
(one '<reason>\\t<file>' line per image or caption without a row). Images and captions pair by base name
(``x.jpg`` with ``x.txt``). Load the CSV with ``datasets.load_dataset("csv", data_files=...)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from convert import hf_csv
from core.cli import run_main
from vocab import bdd

COLUMNS = ("image", "text")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hf_csv.add_common_args(parser)
    parser.add_argument("--split", required=True, help="name in the output file names, e.g. train or val")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    split = hf_csv.check_output_name(args.split, "--split")

    # Inputs, matched by base name; captions read and checked.
    images = bdd.list_images(args.images_path)
    captions = hf_csv.list_captions(args.captions_path)
    result = hf_csv.match_samples(images, captions)
    hf_csv.attach_captions(result)
    hf_csv.require_rows(result, {"images": args.images_path, "captions": args.captions_path})

    # CSV text first, so that a refusal to overwrite happens before anything is written.
    out = hf_csv.prepare_output(args.output_folder)
    csv_path = out / f"bdd_hf_dataset_lora_{split}.csv"
    rows = [(hf_csv.csv_path_value(s.image, out, args.relative_paths), s.caption) for s in result.samples]
    text = hf_csv.csv_text(COLUMNS, rows)
    needs_write = hf_csv.csv_needs_write(csv_path, text, args.overwrite)

    hf_csv.finish(csv_path, text, needs_write, result, out / f"unmatched_lora_{split}.txt")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
