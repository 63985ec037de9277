"""Prints tools/experiments.sh's variants.json as one table: a row per (impl, shape), a column per
variant, CUDA-graph us (percent of the floor): python3 tools/variant_table.py $OUT/variants.json"""
import json
import sys

runs = json.load(open(sys.argv[1]))
names = list(runs)
cells: dict[tuple[str, str], dict[str, str]] = {}
for name, run in runs.items():
    for r in run["records"] if isinstance(run, dict) else run:
        if r.get("kind") != "kernel" or r.get("graph_us") is None:
            continue
        key = (r["impl"], f"K{r['K']} H{r['H']} T={r['T']}")
        pct = f" ({r['pct_of_floor']:.1f}%)" if r.get("pct_of_floor") else ""
        cells.setdefault(key, {})[name] = f"{r['graph_us']:.2f}{pct}"
print(f"{'impl':<14}{'shape':<24}" + "".join(f"{n:>17}" for n in names))
for (impl, shape), row in cells.items():
    print(f"{impl:<14}{shape:<24}" + "".join(f"{row.get(n, '-'):>17}" for n in names))
