"""The gain evaluation behind ``annotation/evaluate_gain.py``: real-only vs real + synthetic at equal iterations.

* :mod:`~annotation.gain.data`: the three YOLO data sets (items, fingerprints) and the val frames' conditions;
* :mod:`~annotation.gain.design`: the experiment (seeded arms per share, the equal-iteration schedule, training
  lists); pure, no ultralytics;
* :mod:`~annotation.gain.stats`: mean ± spread over seeds, gains paired by seed, their formatting; pure;
* :mod:`~annotation.gain.controls`: the positive and negative controls' and the real curve's arms; pure;
* :mod:`~annotation.gain.curve`: the real-data learning curve and real-equivalents; pure;
* :mod:`~annotation.gain.recipe`: what ultralytics makes of a schedule (optimizer steps, warmup, mosaic); pure;
* :mod:`~annotation.gain.leaks`: val frames kept out of training (file, content, source frame);
* :mod:`~annotation.gain.parallel`: one training per device at once, each in its own process;
* :mod:`~annotation.gain.runner`: one run (its data folder, ultralytics training with the iteration count check,
  evaluation), the settings key, resume and the run lock;
* :mod:`~annotation.gain.report`: gain.csv, gain.md, gain.json, gain.png and the printed summary.

No module imports ultralytics at import time: it is imported inside functions, after
:func:`annotation.yolo_runtime.prepare_offline`.
"""
