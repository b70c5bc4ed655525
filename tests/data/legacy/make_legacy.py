"""How the files next to this script were made, with detfocal at commit b82acb6 (before the
engine's stages and callbacks): a straight two-epoch run, and the same run stopped by Ctrl-C
during step 3. ``tests/test_engine.py`` resumes ``interrupted_at_step3.pth`` with today's code
and compares the result with the straight run's final weights.

    cd tests/data/legacy && python make_legacy.py /tmp/legacy
"""
import signal
import sys
from pathlib import Path

import torch

import detfocal
from detfocal.engine import train as train_module

DEMO = Path(__file__).resolve().parents[3] / "configs" / "shapes_retinanet_r18.yaml"


def overrides(shapes_root: str | Path) -> list[str]:
    return [f"data.shapes={{root: {shapes_root}, num_train: 8, num_val: 4, image_size: 64, min_object_size: 6, "
            f"max_objects: 3}}", "model.min_size=64", "model.max_size=64", "model.fpn_channels=16",
            "model.backbone=legacy_tiny", "model.head.num_convs=1", "model.head.norm=none", "train.batch_size=2",
            "train.epochs=2", "train.warmup_iters=2", "train.amp=off", "train.log_interval=1", "data.workers=0",
            "eval.batch_size=4", "eval.interval=5", "train.deterministic=true",
            "data.augment={hflip: 0.5, scale_jitter: [0.8, 1.2]}", "imports=[legacy_tiny_backbone]"]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    detfocal.train(DEMO, out / "full", overrides=overrides(out / "shapes"))
    step = train_module.train_step

    def interrupted_step(*args, **kwargs):
        if kwargs["iteration"] == 2:
            signal.raise_signal(signal.SIGINT)
        return step(*args, **kwargs)

    train_module.train_step = interrupted_step
    try:
        detfocal.train(DEMO, out / "part", overrides=overrides(out / "shapes"))
    except KeyboardInterrupt:
        pass
    torch.save(torch.load(out / "full" / "last.pth", weights_only=True)["model"], "full_run_final_model.pth")
    (out / "part" / "interrupted.pth").replace("interrupted_at_step3.pth")
