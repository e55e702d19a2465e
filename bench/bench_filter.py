"""Filter at full COCO scale (118k images, 860k boxes) vs pycocotools' COCO() load.

Writes a synthetic instances file shaped like COCO's instances_train2017.json (same
counts, ~50-number polygons per box, COCO's category ids) plus a cocoTraffic-style
relabel file, then times in fresh processes, median of --runs:
  baseline: pycocotools.coco.COCO(file)           (load + index only)
  filter:   stages.filter.filter_dataset + writes  (the whole stage's work)
Targets: filter <= 15 s and <= 4 GB peak RSS on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from common import OUT, machine, median, run_child

IMAGES, ANNOTATIONS = 118_287, 860_001
# COCO 2017's 80 category ids and a rough share of boxes (person ~30%, car ~5%, lights ~1.5%).
COCO_IDS = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
]
WEIGHTS = {1: 30.0, 3: 5.1, 10: 1.5, 8: 1.1, 6: 0.7, 4: 1.0, 2: 0.8}
NAMES = {1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 6: "bus", 8: "truck", 10: "traffic light"}


def write_synthetic(path: Path, relabel: Path, seed: int = 0) -> None:
    """Write the JSON as text (fast): json.dumps of 860k dicts would dominate the benchmark's setup."""
    rng = random.Random(seed)
    weights = [WEIGHTS.get(i, 0.8) for i in COCO_IDS]
    categories = ",".join(f'{{"supercategory":"x","id":{i},"name":"{NAMES.get(i, f"class{i}")}"}}' for i in COCO_IDS)
    polygons = [",".join(f"{rng.uniform(0, 640):.2f}" for _ in range(rng.choice([24, 48, 72]))) for _ in range(64)]
    lights = []
    with open(path, "w") as out:
        out.write('{"info":{"description":"synthetic COCO-scale file"},"licenses":[],"images":[')
        out.write(
            ",".join(
                f'{{"license":1,"file_name":"{i:012d}.jpg","coco_url":"http://images.cocodataset.org/train2017/{i:012d}.jpg",'
                f'"height":480,"width":640,"date_captured":"2013-11-14 11:18:45","id":{i}}}'
                for i in range(1, IMAGES + 1)
            )
        )
        out.write('],"annotations":[')
        categories_drawn = rng.choices(COCO_IDS, weights, k=ANNOTATIONS)
        chunks = []
        for ann_id, category in enumerate(categories_drawn, start=1):
            image = rng.randint(1, IMAGES)
            x, y, w, h = rng.uniform(0, 600), rng.uniform(0, 440), rng.uniform(-1, 200), rng.uniform(1, 200)
            chunks.append(
                f'{{"segmentation":[[{polygons[ann_id % 64]}]],"area":{w * h:.3f},"iscrowd":{int(ann_id % 100 == 0)},'
                f'"image_id":{image},"bbox":[{x:.2f},{y:.2f},{w:.2f},{h:.2f}],"category_id":{category},"id":{ann_id}}}'
            )
            if category == 10:
                lights.append({"id": ann_id, "image_id": image, "category_id": rng.choice([92, 93, 94]), "bbox": [x, y, w, h]})
        out.write(",".join(chunks))
        out.write(f'],"categories":[{categories}]}}')
    relabel.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": lights,
                "categories": [
                    {"id": 92, "name": "traffic_light_red"},
                    {"id": 93, "name": "traffic_light_green"},
                    {"id": 94, "name": "traffic_light_na"},
                ],
            }
        )
    )


BASELINE = """
import json, resource, sys, time
t = time.perf_counter()
from pycocotools.coco import COCO
COCO(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
FILTER = """
import json, resource, sys, time
from pathlib import Path
t = time.perf_counter()
from stages.filter import filter_dataset
from trafficdet.io import write_json
from trafficdet.params import FilterParams, load
params = load(FilterParams)
coco, label_map, report = filter_dataset([Path(sys.argv[1])], [Path(sys.argv[2])], params)
out = Path(sys.argv[3])
write_json(out / "labels.json", coco); write_json(out / "label_map.json", label_map); write_json(out / "report.json", report)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": report["images"], "annotations": report["annotations"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    source, relabel = OUT / "instances_synthetic_train.json", OUT / "relabel_synthetic.json"
    if not source.exists():
        write_synthetic(source, relabel)
    baseline = [run_child(BASELINE, str(source)) for _ in range(args.runs)]
    ours = [run_child(FILTER, str(source), str(relabel), str(OUT / "filter")) for _ in range(args.runs)]
    result = {
        "machine": machine(),
        "runs": args.runs,
        "file_mb": round(source.stat().st_size / 2**20),
        "pycocotools_load_s": round(median([r["seconds"] for r in baseline]), 2),
        "pycocotools_peak_rss_mb": round(median([r["peak_rss_mb"] for r in baseline])),
        "filter_s": round(median([r["seconds"] for r in ours]), 2),
        "filter_peak_rss_mb": round(median([r["peak_rss_mb"] for r in ours])),
        "filter_kept_images": ours[0]["images"],
        "filter_kept_annotations": ours[0]["annotations"],
    }
    result["filter_vs_load_ratio"] = round(result["pycocotools_load_s"] / result["filter_s"], 2)
    (OUT / "filter.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
