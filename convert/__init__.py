"""Stage 1: BDD100K labels -> captions -> Hugging Face-style CSVs, real frames as YOLO, generation plans. The BDD100K
vocabulary it reads with lives below it, in vocab/."""
