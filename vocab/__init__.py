"""The BDD100K vocabulary, below every stage: label formats, classes, attributes and box geometry (bdd), box layouts
(box_layout), the conditioning layouts a ControlNet can take (layouts) and CLIP's tokenizer for caption lengths
(clip_tokenizer). Imports only core."""
