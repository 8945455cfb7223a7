"""Generation plans: scenes for a box-layout ControlNet that move real + synthetic data toward targets.

The command is convert/plan_generation.py; this package holds its parts, each importing only those above it here:

* :mod:`~convert.planning.boxes`: a layout's boxes (:class:`~convert.planning.boxes.Box`), read from real frames,
  mirrored and shifted, their overlaps (IoU, containment) and counts per class;
* :mod:`~convert.planning.targets`: the targets file's schema (config/plan_targets.yaml) and its cells (weather x
  time of day x scene): which frames a target's cell holds, names and order;
* :mod:`~convert.planning.editor`: the layout editor (mirror, remove, move, copy within the real overlaps
  and the containment limit);
* :mod:`~convert.planning.planner`: the real frames and their distribution, the planner and its planned scenes;
* :mod:`~convert.planning.reports`: the plan folder's distribution table (CSV), report (Markdown), plot (PNG) and
  summary (plan.json). Only the plot needs matplotlib, imported when it is drawn.

The files of a plan folder are named here.
"""

PLAN_FILE = "plan.jsonl"  # one scene per line
SUMMARY_FILE = "plan.json"  # inputs, settings, before/after counts
REPORT_FILE = "report.md"
CSV_FILE = "distribution.csv"
PLOT_FILE = "distribution.png"
#: plan.json's format version. 2: a target cell's ``planned`` counts that target's own scenes (1 counted every
#: target's scenes that fit the cell), beside ``other_targets``; ``overlap.containment`` added.
PLAN_VERSION = 2
