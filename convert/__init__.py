"""Stage 1: BDD100K labels -> captions -> Hugging Face-style CSVs. BDD logic lives once in convert/bdd.py."""
